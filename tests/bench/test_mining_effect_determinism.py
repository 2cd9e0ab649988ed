"""A mining-effect run is reproducible: the smoke preset twice, in fresh processes, gives the same numbers.

Each repetition is ``bench/mining_effect.py`` as a user runs it (uniform and the ``loss`` arm,
whose epoch 1 follows a plan built from epoch 0's events), in its own work directory; the
run JSONs must agree to 3 decimals on every val metric and per-image row, the mean training
loss must be the same float, and the mining arm's per-sample training losses in the event logs
must be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "mining_effect.py"), "--preset", "smoke", "--seeds", "0",
               "--arms", "loss", "--jobs", "1", "--out", str(out), "--set", "n_val=2", "epochs=2", "--no-report"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # --no-report (bench/mining_effect_part2.sh): the runs are written, no table of them is printed.
    assert "Verdict" not in result.stdout and "AP50" not in result.stdout and "done" in result.stdout


def _losses(run_dir: Path, epochs: int) -> np.ndarray:
    from hsm.mining.event_reader import read_epoch_events

    parts = []
    for epoch in range(epochs):
        table = read_epoch_events(run_dir / "hsm", epoch, columns=["attempt", "epoch", "global_step", "rank", "position", "loss"]).table
        order = np.lexsort((table.column("position").to_numpy(), table.column("global_step").to_numpy()))
        parts.append(table.column("loss").to_numpy()[order])
    return np.concatenate(parts)


@pytest.mark.slow
def test_smoke_preset_twice_gives_the_same_numbers(tmp_path):
    for name in ("a", "b"):
        _run(tmp_path / name)
    for arm in ("uniform", "loss"):
        first, second = (json.loads((tmp_path / name / "runs" / f"seed-0-{arm}.json").read_text()) for name in "ab")
        assert first["global_step"] == second["global_step"] == 8
        assert first["supervised_tokens"] == second["supervised_tokens"]
        assert first["train_loss"] == second["train_loss"]  # the mean of every step's loss, bit for bit
        for slice_name, metrics in first["val"].items():
            for key, value in metrics.items():
                assert round(value, 3) == round(second["val"][slice_name][key], 3), (arm, slice_name, key)
        assert first["images"] == second["images"]
        assert first["commit"] == second["commit"] and first["command"].startswith("python bench/mining_effect.py")
        # The vector ISA is pinned (bench/mining_effect.py PINNED_ISA): torch dispatched to its AVX2 kernels.
        assert first["isa"]["ATEN_CPU_CAPABILITY"] == "avx2" and first["isa"]["MKL_CBWR"] == "AVX2"
        if " avx2 " in Path("/proc/cpuinfo").read_text():
            assert first["isa"]["cpu_capability"] == second["isa"]["cpu_capability"] == "AVX2"
    # Per-sample training losses of the mining arm (uniform runs keep no event log).
    a, b = (_losses(tmp_path / name / "run-0-loss", 2) for name in "ab")
    assert len(a) == 2 * 64 and np.array_equal(a, b)
