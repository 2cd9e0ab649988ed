"""A ``checkpoint-N`` folder as the Trainer leaves it after a whole save, for tests that only resolve checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["complete_checkpoint"]


def complete_checkpoint(output_dir: Path, step: int) -> Path:
    """``output_dir/checkpoint-STEP`` with weights and a ``trainer_state.json`` of that step (the weights' bytes
    are never read by what these tests exercise)."""
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path
