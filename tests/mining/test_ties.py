"""Ties and no signal through the real planner: every engine, the CLI summary, the plan as the sampler sees it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.config import MiningConfig
from hsm.mining.engines import ENGINES
from hsm.mining.plan import load_plan
from hsm.mining.planner import PlanRequest, plan_epoch
from oracle import tie_key

MINING = [
    {"selector": {"mode": "top_k", "k": 3}},
    {"selector": {"mode": "threshold", "threshold": 0.0}},
    {"mode": "fixed_set", "hard_sample_size": 3, "regular_sample_size": 2, "target_epoch_size": 5},
    {"mode": "dynamic", "hard_pool_frac": 0.3, "metric": "loss"},
]


def tied_rows(loss: float | None = 1.5) -> list[dict]:
    """A real two-epoch log in which every observation has the same loss (a metric with no signal)."""
    rows = random_rows(np.random.default_rng(3), n_target=12, n_epochs=2, n_ranks=2, max_obs=3)
    return [dict(r, loss=loss) for r in rows]


@pytest.mark.parametrize("fields", MINING)
def test_all_equal_scores_plan_nothing_hard_in_every_engine(tmp_path, fields):
    rows = tied_rows()
    mining = MiningConfig.model_validate({"enabled": True, "start_epoch": 0, "seed": 7, **fields})
    plans = {}
    for engine in ENGINES:
        hsm_dir = tmp_path / engine / "hsm"
        write_rows(hsm_dir, rows)
        result = plan_epoch(PlanRequest(hsm_dir, 2, mining, TARGET, engine=engine))
        m = result.manifest
        assert m["no_signal"] is True and m["triggered"] is True
        assert m["counts"]["hard"] == 0 and m["counts"]["regular_drawn"] == 0
        assert m["default_weight"] == 1.0 and m["weights"] == {"min": 1.0, "max": 1.0}
        plan = load_plan(hsm_dir, 2)
        assert not plan.is_hard.any()
        assert not plan.triggered  # the sampler draws the epoch as without a plan
        plans[engine] = pq.read_table(hsm_dir / "plans" / "epoch=2" / "plan.parquet")
    first = plans["polars"]
    assert all(first.equals(p) for p in plans.values())


def test_one_different_score_is_a_signal(tmp_path):
    rows = tied_rows()
    for r in rows:
        if r["dataset"] == TARGET and r["base_idx"] == 4:
            r["loss"] = 2.0
    mining = MiningConfig.model_validate({"enabled": True, "start_epoch": 0, "selector": {"k": 3}})
    write_rows(tmp_path / "hsm", rows)
    result = plan_epoch(PlanRequest(tmp_path / "hsm", 2, mining, TARGET))
    assert result.manifest["no_signal"] is False
    hard = set(result.plan.filter(result.plan.column("is_hard")).column("base_idx").to_pylist())
    # Sample 4 by its score; the two others among the tied by the seeded hash of their ids.
    ids = {r["base_idx"]: r["sample_id"] for r in rows if r["dataset"] == TARGET}
    tied = sorted((i for i in ids if i != 4), key=lambda i: (tie_key(mining.seed, ids[i]), ids[i]))
    assert hard == {4, *tied[:2]}


def test_plan_summary_says_no_signal(tmp_path):
    write_rows(tmp_path / "hsm", tied_rows())
    config = {"custom": {"hard_sample_mining": {"enabled": True, "start_epoch": 0, "selector": {"k": 3}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (tmp_path / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["plan", "--run-dir", str(tmp_path), "--epoch", "2"])
    assert result.exit_code == 0, result.output
    assert "no signal" in result.output
