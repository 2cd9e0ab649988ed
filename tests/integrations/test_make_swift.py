"""The Makefile target that builds ms-swift's venv is one rule: no "overriding recipe" warnings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", [".venv-swift/.installed", ".venv/.installed"])
def test_venv_targets_define_one_recipe(target):
    # -n -B: print every recipe, run none (the sub-make that installs the torchvision shim is dry-run too).
    done = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower(), done.stderr
    venv = target.split("/")[0]
    assert f'cp tools/torchvision_cpu.py "$({venv}/bin/python' in done.stdout  # the shim goes into that venv
