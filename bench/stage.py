"""Stage an older tree's ``hsm`` as one importable package (for before/after benchmark runs).

No hsm import here: the benchmarks import it before pointing ``sys.path`` at a staged tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def stage_impl(tree: Path, workdir: Path, name: str = "before-impl") -> Path:
    """``tree``'s hsm as one importable package under ``workdir/name`` (older trees kept sql/ and cli/ beside it)."""
    staged = workdir / name
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(tree / "hsm", staged / "hsm")
    for outside in ("sql", "cli"):
        if (tree / outside).is_dir():
            shutil.copytree(tree / outside, staged / "hsm" / outside, dirs_exist_ok=True)
    return staged
