"""Non-finite metric values are not observations: every engine, in memory and out of core, against the oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.config import MiningConfig
from hsm.io import write_json_atomic
from hsm.mining.engines import ENGINES
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.mining.state import find_states, read_state_info
from oracle import full_state
from test_planner import assert_state_matches, state_rows


def strict_loads(text: str):
    """``json.loads`` that refuses NaN and Infinity (strict JSON)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def poisoned(rows: list[dict], rng: np.random.Generator, share: float, metric: str) -> list[dict]:
    """A copy of ``rows`` with a ``share`` of their ``metric`` values NaN, +inf or -inf."""
    out = []
    for r in rows:
        if rng.random() < share:
            r = dict(r, **{metric: float(rng.choice([math.nan, math.inf, -math.inf]))})
        out.append(r)
    return out


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), metric=st.sampled_from(["loss", "token_acc"]), out_of_core=st.booleans())
def test_nonfinite_values_are_not_observations(tmp_path_factory, seed, metric, out_of_core):
    rng = np.random.default_rng(seed)
    rows = poisoned(random_rows(rng, n_target=8, n_epochs=3, n_ranks=2, max_obs=3), rng, 0.25, metric)
    mining = MiningConfig.model_validate({"enabled": True, "start_epoch": 0, "metric": metric, "selector": {"k": 3}})
    expected = full_state(rows, metric=metric, decay=mining.ema_decay, aggregate=mining.aggregate)
    if not expected:
        return
    bad = [r for r in rows if r["epoch"] == 2 and not math.isfinite(r[metric])]
    for engine in ENGINES:
        hsm_dir = tmp_path_factory.mktemp(engine) / "hsm"
        write_rows(hsm_dir, rows)
        result = plan_epoch(PlanRequest(hsm_dir, 3, mining, TARGET, engine=engine, memory_limit=1 if out_of_core else None))
        last = find_states(hsm_dir)[-1]
        assert_state_matches(state_rows(hsm_dir, last), expected, engine)
        assert result.manifest["counts"]["nonfinite"] == len(bad)
        stats = read_state_info(hsm_dir, last).epoch_stats
        for epoch in stats:
            assert stats[epoch]["n_nonfinite"] == sum(1 for r in rows if r["epoch"] == epoch and not math.isfinite(r[metric]))
        strict_loads((hsm_dir / "plans" / "epoch=3" / "manifest.json").read_text())


def test_one_nan_does_not_stick_and_inf_does_not_win(tmp_path):
    rows = random_rows(np.random.default_rng(11), n_target=6, n_epochs=3, n_ranks=1, max_obs=2)
    rows = [dict(r, loss=1.0) if r["dataset"] == TARGET else r for r in rows]
    target_rows = [r for r in rows if r["dataset"] == TARGET]
    nan_at = next(r for r in target_rows if r["epoch"] == 0)
    inf_at = next(r for r in target_rows if r["epoch"] == 0 and r["base_idx"] != nan_at["base_idx"])
    nan_at["loss"], inf_at["loss"] = math.nan, math.inf
    for r in target_rows:  # a clear hardest sample, observed finitely
        if r["base_idx"] == 5:
            r["loss"] = 3.0
    write_rows(tmp_path / "hsm", rows)
    result = plan_epoch(PlanRequest(tmp_path / "hsm", 3, MiningConfig(enabled=True, start_epoch=0, selector={"k": 1}), TARGET))
    scores = dict(zip(result.plan.column("base_idx").to_pylist(), result.plan.column("score").to_pylist()))
    assert all(math.isfinite(v) for v in scores.values())
    hard = result.plan.filter(result.plan.column("is_hard")).column("base_idx").to_pylist()
    assert hard == [5]  # not the sample with +inf


def test_plan_summary_counts_nonfinite_and_json_is_strict(tmp_path):
    rows = random_rows(np.random.default_rng(2), n_target=10, n_epochs=2, n_ranks=1, max_obs=2)
    last_epoch = [r for r in rows if r["epoch"] == 1]
    last_epoch[0]["loss"], last_epoch[1]["loss"] = math.nan, -math.inf
    write_rows(tmp_path / "hsm", rows)
    import yaml

    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 3}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (tmp_path / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    assert runner.invoke(app, ["plan", "--run-dir", str(tmp_path), "--epoch", "2"]).exit_code == 0
    result = runner.invoke(app, ["sql", "--run-dir", str(tmp_path), "plan_summary", "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["nonfinite"] == 2 and row["no_signal"] is False


def test_json_files_are_strict(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}}, path)
    assert strict_loads(path.read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_an_epoch_of_only_nonfinite_values_changes_nothing(tmp_path, engine):
    rows = random_rows(np.random.default_rng(4), n_target=6, n_epochs=2, n_ranks=1, max_obs=2)
    rows = [dict(r, loss=math.nan) if r["epoch"] == 1 else r for r in rows]
    write_rows(tmp_path / "hsm", rows)
    mining = MiningConfig(enabled=True, start_epoch=0, selector={"k": 2})
    plan_epoch(PlanRequest(tmp_path / "hsm", 2, mining, TARGET, engine=engine))
    expected = full_state([r for r in rows if r["epoch"] == 0], metric="loss", decay=mining.ema_decay, aggregate="ema")
    got = state_rows(tmp_path / "hsm", 1)
    assert_state_matches({k: v for k, v in got.items()}, expected, engine)
