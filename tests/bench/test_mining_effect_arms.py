"""The mining-effect arms added for part 2, run as a user runs them (the smoke preset, one subprocess).

- ``oracle``: its event log holds each target sample's slice hardness (1 for ``ORACLE_SLICES``, 0 else) in place
  of the loss, its plan's hard set comes from those slices only, and its training loss is uniform's in epoch 0
  (the statistic is replaced, not the loss).
- ``fixed_set_60`` and its reference ``uniform_60``: the same reduced step count (the hard and regular sets drawn
  once an epoch), fewer steps than uniform, and the same epoch 0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, N_TRAIN, BATCH = 2, 64, 16


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arms")
    command = [sys.executable, str(ROOT / "bench" / "mining_effect.py"), "--preset", "smoke", "--seeds", "0",
               "--arms", "oracle", "fixed_set_60", "uniform_60", "--jobs", "1", "--out", str(out),
               "--set", "n_val=2", f"epochs={EPOCHS}", f"n_train={N_TRAIN}", f"batch={BATCH}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def _run(work: Path, arm: str) -> dict:
    return json.loads((work / "runs" / f"seed-0-{arm}.json").read_text())


def _hard_ids(work: Path) -> set[str]:
    from bench.mining_effect import ORACLE_SLICES

    slices = json.loads((work / "data-0" / "bbu" / "slices.json").read_text())["train"]
    return {i for i, name in slices.items() if name in ORACLE_SLICES}


def _train_ids(work: Path) -> list[str]:
    lines = (work / "data-0" / "bbu" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.strip()]


@pytest.mark.slow
def test_oracle_logs_the_slice_hardness_and_mines_only_the_hard_slices(work):
    from hsm.mining.event_reader import read_epoch_events
    from hsm.mining.plan import read_plan_table

    hsm_dir = work / "run-0-oracle" / "hsm"
    ids, hard = _train_ids(work), _hard_ids(work)
    assert 0 < len(hard) < len(ids)
    events = read_epoch_events(hsm_dir, 0, columns=["attempt", "epoch", "global_step", "rank", "position", "base_idx", "loss"]).table
    base_idx = events.column("base_idx").to_numpy()
    expected = np.array([1.0 if ids[i] in hard else 0.0 for i in base_idx])
    assert len(base_idx) == N_TRAIN and np.array_equal(events.column("loss").to_numpy(), expected)
    _, plan = read_plan_table(hsm_dir, 1)
    chosen = {ids[i] for i, h in zip(plan.column("base_idx").to_pylist(), plan.column("is_hard").to_pylist()) if h}
    assert chosen and chosen <= hard
    assert len(chosen) >= int(0.2 * N_TRAIN)  # the 20% share, all of it from the hard slices


@pytest.mark.slow
def test_the_oracle_and_compute_saving_arms_share_their_references_epoch_0(work):
    uniform, oracle = _run(work, "uniform"), _run(work, "oracle")
    saving, reference = _run(work, "fixed_set_60"), _run(work, "uniform_60")
    per_epoch = math.ceil(N_TRAIN / BATCH)
    assert uniform["global_step"] == oracle["global_step"] == EPOCHS * per_epoch
    # The oracle replaces the statistic, not the loss: epoch 0 (no plan yet) is uniform's, step for step.
    assert oracle["logged_losses"][:per_epoch] == uniform["logged_losses"][:per_epoch]
    assert oracle["logged_losses"] != uniform["logged_losses"]  # and epoch 1 follows the oracle's plan
    # 20% + 40% of the target, each drawn once an epoch: 13 + 26 draws, ceil(39 / 16) steps an epoch.
    hard, regular = round(800 * N_TRAIN / 4000), round(1600 * N_TRAIN / 4000)
    short = math.ceil((hard + regular) / BATCH)
    assert saving["global_step"] == reference["global_step"] == EPOCHS * short < uniform["global_step"]
    assert saving["logged_losses"][:short] == reference["logged_losses"][:short]
    assert saving["logged_losses"] != reference["logged_losses"]


@pytest.mark.slow
def test_kept_runs_carry_their_hard_sets_slice_mix_once_the_work_directory_is_gone(work, tmp_path):
    """bench/mining_effect_part2.sh keeps each run compact with the slice mix of its last hard set
    (``mining_effect_report --keep``); oracle: the plan's hard rows and slices.json, read here directly."""
    import shutil

    from bench.mining_effect_report import keep_runs, read_run
    from hsm.mining.plan import read_plan_table

    keep = tmp_path / "keep"
    assert set(keep_runs(work, keep)) == {p.name for p in (work / "runs").glob("seed-*.json")}
    slices = json.loads((work / "data-0" / "bbu" / "slices.json").read_text())["train"]
    ids = _train_ids(work)
    _, plan = read_plan_table(work / "run-0-oracle" / "hsm", EPOCHS - 1)
    chosen = [ids[i] for i, h in zip(plan.column("base_idx").to_pylist(), plan.column("is_hard").to_pylist()) if h]
    kept = read_run(keep / "seed-0-oracle.json")
    assert kept["hard_set_mix"]["hard"] == pytest.approx(
        {name: sum(slices[i] == name for i in chosen) / len(chosen) for name in set(slices.values())})
    assert {k: v for k, v in kept.items() if k != "hard_set_mix"} == _run(work, "oracle")  # the run, compact
    assert json.loads((keep / "seed-0-oracle.json").read_text())["sha256"]  # and sealed (read_run checked it)
    assert read_run(keep / "seed-0-uniform.json")["hard_set_mix"] is None  # no plan, no mix
    assert keep_runs(work, keep) == []  # nothing new to keep
    # The work directory gone (only its run files left): a kept mix stays; a run kept only now has none.
    bare = tmp_path / "bare"
    shutil.copytree(work / "runs", bare / "runs")
    assert keep_runs(bare, keep) == [] and read_run(keep / "seed-0-oracle.json") == kept
    assert read_run(keep / "seed-0-oracle.json")["hard_set_mix"] is not None
    fresh = tmp_path / "fresh"
    keep_runs(bare, fresh)
    assert read_run(fresh / "seed-0-oracle.json")["hard_set_mix"] is None
