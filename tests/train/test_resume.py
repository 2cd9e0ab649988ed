"""Crash and resume: SIGKILL mid-epoch, resume from the last checkpoint, same plans as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 9  # 24 target + 2 x 6 source slots, batches of 4


def command(corpus: list[str], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hsm.cli.app", "train", "configs/demo.yaml", *corpus,
        f"training.output_dir={out}", "training.num_train_epochs=3", "training.per_device_train_batch_size=4",
        "training.save_strategy=steps", "training.save_steps=3", "training.save_total_limit=null",
        "training.report_to=[]", *extra,
    ]


def plans(run: Path) -> dict[int, list[dict]]:
    return {e: pq.read_table(run / "hsm" / "plans" / f"epoch={e}" / "plan.parquet").to_pylist() for e in (1, 2, 3)}


def test_sigkill_and_resume_gives_the_uninterrupted_plans(tmp_path, mining_run, demo_overrides):
    # The uninterrupted run: the same corpus, config and epochs, trained once in the test process for this test and
    # tests/train/test_training.py (it saves no checkpoints and logs every step: neither changes a plan).
    corpus = demo_overrides(mining_run["corpus"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    straight = mining_run["out"]

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(command(corpus, crashed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = crashed / f"checkpoint-{STEPS_PER_EPOCH + 3}" / "trainer_state.json"  # mid-epoch 1
    deadline = time.time() + 240
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.exists(), "training ended before the mid-epoch checkpoint"
    assert not (crashed / "hsm" / "plans" / "epoch=2").exists(), "killed too late: epoch 1 had finished"
    checkpoints = sorted(crashed.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    last = checkpoints[-1].parent
    # A save killed midway (no trainer_state.json yet): `last` passes over it to the newest complete one.
    half = crashed / f"checkpoint-{int(last.name.split('-')[1]) + 1}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"")
    done = subprocess.run(command(corpus, crashed, "training.resume_from_checkpoint=last"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last}" in " ".join(done.stderr.split()) and half.name in done.stderr

    attempts = {a for p in (crashed / "hsm" / "events").rglob("part-*.parquet") for a in pq.read_table(p, columns=["attempt"]).column("attempt").to_pylist()}
    assert attempts == {0, 1}
    expected, got = plans(straight), plans(crashed)
    for epoch in (1, 2, 3):
        assert [(r["dataset"], r["base_idx"], r["is_hard"], r["weight"], r["n_obs"]) for r in got[epoch]] == \
               [(r["dataset"], r["base_idx"], r["is_hard"], r["weight"], r["n_obs"]) for r in expected[epoch]], epoch
        for a, b in zip(got[epoch], expected[epoch]):
            assert a["score"] == pytest.approx(b["score"], rel=1e-5), (epoch, a["base_idx"])
