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
from hsm.mining.planner import plan_epoch
from hsm.mining.suspects import data_map, epoch_metrics, read_epoch_metrics

runner = CliRunner()


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
    top = np.quantile(means, 1 - top_frac)
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
        if mean >= top and variability <= v_median:
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
    plain = plan_epoch(hsm_dir, 4, MiningConfig(enabled=True, selector={"k": 5}), TARGET, write=False)
    excluded = plan_epoch(hsm_dir, 4, MiningConfig(enabled=True, selector={"k": 5}, exclude_suspects=True),
                          TARGET, write=False)
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
