"""Label-noise suspects: the data map against a naive loop, DuckDB's suspects.sql, and the planner."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.config import MiningConfig
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.mining.suspects import data_map, epoch_metrics, read_epoch_metrics
from oracle import _ceil_decimal

runner = CliRunner()


def test_a_tie_cannot_flood_the_suspects():
    # 51 samples over 3 epochs with the same value every epoch (a metric with no signal): none is a suspect.
    rows = [(i, e, 1.0) for i in range(51) for e in range(3)]
    assert not data_map(_per_epoch(rows)).is_suspect.any()
    # Three clear top samples above 48 tied ones: the three, never the tied group.
    rows = [(i, e, 2.0 if i < 3 else 1.0) for i in range(51) for e in range(3)]
    assert set(data_map(_per_epoch(rows)).base_idx[data_map(_per_epoch(rows)).is_suspect].tolist()) == {0, 1, 2}


def naive_data_map(rows: list[tuple[int, int, float]], min_epochs: int = 3, top_frac: float = 0.1):
    """Slow obvious version of hsm.mining.suspects.data_map over (base_idx, epoch, value) rows."""
    by_sample: dict[int, dict[int, float]] = {}
    for i, e, x in rows:
        by_sample.setdefault(i, {})[e] = x
    stats = {i: (statistics.fmean(v.values()), statistics.pstdev(v.values()), len(v)) for i, v in by_sample.items()}
    mapped = {i: s for i, s in stats.items() if s[2] >= min_epochs}
    if not mapped:
        return {}, set()
    means = [s[0] for s in mapped.values()]
    variabilities = [s[1] for s in mapped.values()]
    low, high = np.quantile(means, 1 / 3), np.quantile(means, 2 / 3)
    v_high, v_median = np.quantile(variabilities, 2 / 3), np.quantile(variabilities, 0.5)
    regions, suspects = {}, set()
    for i, (mean, variability, _) in mapped.items():
        if variability > v_high:
            regions[i] = "ambiguous"
        elif mean >= high:
            regions[i] = "hard"
        elif mean <= low:
            regions[i] = "easy"
        else:
            regions[i] = "medium"
        # The top by count: at most ceil(top_frac * n) mapped means are >= this one (a tie never floods it).
        in_top = sum(1 for m in means if m >= mean) <= _ceil_decimal(top_frac, len(means))
        if in_top and variability <= v_median:
            suspects.add(i)
    return regions, suspects


def _per_epoch(rows):
    return pa.table({
        "base_idx": pa.array([r[0] for r in rows], pa.int64()),
        "sample_id": pa.array([f"s{r[0]}" for r in rows]),
        "epoch": pa.array([r[1] for r in rows], pa.int32()),
        "value": pa.array([r[2] for r in rows], pa.float64()),
    })


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 5), st.integers(0, 16).map(lambda v: v / 4)),
                min_size=0, max_size=80, unique_by=lambda r: (r[0], r[1])))
def test_data_map_matches_naive_loop(rows):
    dm = data_map(_per_epoch(rows))
    regions, suspects = naive_data_map(rows)
    got_regions = {int(i): r for i, r in zip(dm.base_idx, dm.region) if r is not None}
    assert got_regions == regions
    assert set(dm.base_idx[dm.is_suspect].tolist()) == suspects


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(5)
    rows = random_rows(rng, n_target=40, n_epochs=4, n_ranks=2, max_obs=2)
    # A sample drawn in every epoch stays at the top with the same loss: a planted suspect.
    epochs_seen = {}
    for r in rows:
        if r["dataset"] == TARGET:
            epochs_seen.setdefault(r["base_idx"], set()).add(r["epoch"])
    planted = min(i for i, seen in epochs_seen.items() if len(seen) == 4)
    for r in rows:
        if r["dataset"] == TARGET and r["base_idx"] == planted:
            r["loss"] = 9.0
    write_rows(tmp_path / "hsm", rows)
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 5}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (tmp_path / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path, planted


def test_sql_suspects_agree_with_python(run_dir):
    run_dir, planted = run_dir
    assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "4"]).exit_code == 0
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "suspects", "--format", "json"])
    assert result.exit_code == 0, result.output
    from_sql = {row["base_idx"] for row in json.loads(result.output)}
    dm = data_map(read_epoch_metrics(run_dir / "hsm", range(4), TARGET, "loss"))
    assert from_sql == set(dm.base_idx[dm.is_suspect].tolist())
    assert planted in from_sql


def test_exclude_suspects_keeps_them_out_of_the_hard_set(run_dir):
    run_dir, planted = run_dir
    hsm_dir = run_dir / "hsm"
    plain = plan_epoch(PlanRequest(hsm_dir, 4, MiningConfig(enabled=True, selector={"k": 5}), TARGET, write=False))
    excluded = plan_epoch(PlanRequest(hsm_dir, 4, MiningConfig(enabled=True, selector={"k": 5}, exclude_suspects=True),
                          TARGET, write=False))
    hard_before = set(plain.plan.filter(plain.plan.column("is_hard")).column("base_idx").to_pylist())
    assert planted in hard_before  # the highest score: hard without the option
    suspects = excluded.manifest["suspects"]["base_idx"]
    assert planted in suspects and excluded.manifest["suspects"]["count"] == len(suspects)
    plan = excluded.plan.to_pydict()
    for idx, is_hard, weight in zip(plan["base_idx"], plan["is_hard"], plan["weight"]):
        if idx in suspects:
            assert not is_hard and weight == 1.0
    assert sum(plan["is_hard"]) == 5  # the hard set is refilled from the next hardest
    assert plain.manifest["suspects"] is None


def test_epoch_metrics_token_acc_is_one_minus():
    events = pa.table({"dataset": ["t", "t", "t", "x"], "base_idx": pa.array([0, 0, 1, 0], pa.int64()),
                       "sample_id": ["a", "a", "b", "z"], "epoch": pa.array([0, 0, 0, 0], pa.int32()),
                       "loss": pa.array([1.0, 3.0, 2.0, 9.0], pa.float32()),
                       "token_acc": pa.array([0.5, 0.25, 1.0, 0.0], pa.float32())})
    loss = epoch_metrics(events, "t", "loss").to_pydict()
    assert loss["value"] == [2.0, 2.0]
    acc = epoch_metrics(events, "t", "token_acc").to_pydict()
    assert acc["value"] == [pytest.approx(0.625), 0.0]


def _write_metric_run(root, metric: str):
    """4 epochs of target events with every metric column; sample 0 stays hardest by ``metric`` and flat."""
    from hsm.mining.event_writer import EventBatch, EventWriter

    rng = np.random.default_rng({"loss": 1, "token_acc": 2, "loss_sum": 3, "det_f1": 4}[metric])
    hsm_dir = root / "hsm"
    with EventWriter(hsm_dir, run_id="r", rank=0, attempt=0) as writer:
        for epoch in range(4):
            draws = [i for i in range(30) for _ in range(int(rng.integers(1, 3)))]
            draws = [draws[k] for k in rng.permutation(len(draws))]
            for step, start in enumerate(range(0, len(draws), 4)):
                idx = draws[start:start + 4]
                n_tokens = rng.integers(5, 60, len(idx))
                loss = rng.uniform(0.1, 2.0, len(idx)) * 0.8 ** epoch
                acc = rng.uniform(0.3, 1.0, len(idx))
                loss_sum = [float(a * b) if rng.random() > 0.15 else None for a, b in zip(loss, n_tokens)]
                det_f1 = [float(a) if rng.random() > 0.5 else None for a in rng.uniform(0.2, 1.0, len(idx))]
                for k, i in enumerate(idx):
                    if i == 0:  # the planted suspect, by whichever metric the plan uses
                        loss[k], acc[k], loss_sum[k], n_tokens[k], det_f1[k] = 5.0, 0.05, 500.0, 100, 0.02
                writer.append(EventBatch(
                    epoch=epoch, global_step=epoch * 1000 + step, dataset=[TARGET] * len(idx), base_idx=idx,
                    sample_id=[f"t{i}" for i in idx], loss=loss.tolist(), token_acc=acc.tolist(),
                    n_tokens=n_tokens.tolist(), aug_seed=[0] * len(idx), drawn_as_hard=[False] * len(idx),
                    metrics={"loss_sum": loss_sum, "det_f1": det_f1}))
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 5}, "metric": metric},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (hsm_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner.invoke(app, ["plan", "--run-dir", str(root), "--epoch", "4"]).exit_code == 0
    return hsm_dir


@pytest.mark.parametrize("metric", ["loss", "token_acc", "loss_sum", "det_f1"])
def test_one_suspect_list_for_sql_report_and_csv(tmp_path, metric):
    import csv

    from hsm.report import build_report

    hsm_dir = _write_metric_run(tmp_path, metric)
    dm = data_map(read_epoch_metrics(hsm_dir, range(4), TARGET, metric))
    expected = {int(i): float(m) for i, m, s in zip(dm.base_idx, dm.mean, dm.is_suspect) if s}
    assert 0 in expected
    result = runner.invoke(app, ["sql", "--run-dir", str(tmp_path), "suspects", "--format", "json"])
    assert result.exit_code == 0, result.output
    from_sql = json.loads(result.output)
    assert {row["base_idx"] for row in from_sql} == set(expected)
    assert all(row["metric"] == metric and row["mean"] == pytest.approx(expected[row["base_idx"]], abs=1e-4)
               for row in from_sql)
    report = build_report(tmp_path, tmp_path / "report.html")
    rows = list(csv.DictReader(report.suspects_csv.open(newline="")))
    assert [int(r["base_idx"]) for r in rows] == [row["base_idx"] for row in from_sql]
    assert {r["metric"] for r in rows} == {metric}
    label = {"token_acc": "1 - token_acc", "det_f1": "1 - det_f1"}.get(metric, metric)
    assert f"per-epoch mean {label} (the plan's metric" in report.html.read_text()


def test_sql_suspects_are_not_flooded_by_a_tie(tmp_path):
    rows = [dict(r, loss=1.0) for r in random_rows(np.random.default_rng(5), n_target=40, n_epochs=4, n_ranks=2,
                                                    max_obs=2)]
    write_rows(tmp_path / "hsm", rows)
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 5}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (tmp_path / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner.invoke(app, ["plan", "--run-dir", str(tmp_path), "--epoch", "4"]).exit_code == 0
    result = runner.invoke(app, ["sql", "--run-dir", str(tmp_path), "suspects", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == []
    assert not data_map(read_epoch_metrics(tmp_path / "hsm", range(4), TARGET, "loss")).is_suspect.any()
