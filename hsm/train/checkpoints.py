"""Which ``checkpoint-N`` folder a resumed training starts from.

The Trainer writes a checkpoint's weights, optimizer, scheduler and RNG state first and
``trainer_state.json`` last, so a save killed midway leaves a ``checkpoint-N`` without a
readable ``trainer_state.json`` whose ``global_step`` is ``N``. Such a folder is not
complete; resuming from it fails deep inside the Trainer ("Can't find a valid
checkpoint"). :func:`resolve_resume` checks the folder asked for before anything is
loaded or written, and ``resume_from_checkpoint: last`` picks the newest complete one.

hsm's own files need nothing from the checkpoint: the events logged after its step are
superseded by the resumed attempt's (:func:`hsm.mining.event_reader.supersede_attempts`)
and the plans are rebuilt at the epoch ends that follow.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from hsm.config import ConfigError

__all__ = ["LAST", "checkpoint_problem", "complete_checkpoints", "resolve_resume"]

LAST = "last"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# One of these holds the model's weights (full model, sharded index, or a PEFT adapter).
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None when it is one).

    Complete: ``trainer_state.json`` (the Trainer's last write) parses and its
    ``global_step`` equals the ``N`` of ``checkpoint-N``, and a weights file is there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    match = _NAME.match(folder.name)
    state = folder / "trainer_state.json"
    try:
        step = json.loads(state.read_bytes()).get("global_step")
    except FileNotFoundError:
        return "no trainer_state.json (a save killed before its end?)"
    except (OSError, ValueError, AttributeError) as e:
        return f"unreadable trainer_state.json ({type(e).__name__}: {e}; a save killed while writing it?)"
    if match is not None and step != int(match.group(1)):
        return f"trainer_state.json says global_step {step}, the folder's name step {match.group(1)}"
    if not any((folder / name).is_file() for name in _WEIGHTS):
        return "no model weights file (model.safetensors or similar)"
    return None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, by step ascending."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if checkpoint_problem(p) is None]


def resolve_resume(output_dir: str | Path, value: str | None, source: str = "<config>") -> str | None:
    """The checkpoint folder to resume from, checked before anything is loaded or written.

    Args:
        output_dir: the run's ``training.output_dir`` (where ``last`` looks).
        value: ``training.resume_from_checkpoint``: None (a fresh run), ``last`` (the newest
            complete ``checkpoint-N`` of ``output_dir``; newer incomplete ones are named in a
            warning and left alone) or a checkpoint folder.
        source: the config file, for the error.

    Raises:
        ConfigError: on ``training.resume_from_checkpoint``: the folder is not a complete
            checkpoint, or ``last`` finds none; the message names the newest complete one.
    """
    if value is None or value == "":
        return None
    output_dir = Path(output_dir)
    complete = complete_checkpoints(output_dir)
    newest = (f"the newest complete one is {complete[-1]}: resume with training.resume_from_checkpoint={LAST} "
              f"(or that path)" if complete else f"{output_dir} holds no complete checkpoint-N; start a fresh run")
    if str(value) == LAST:
        if not complete:
            raise ConfigError(source, [f"training.resume_from_checkpoint: {LAST}: {output_dir} holds no complete "
                                       "checkpoint-N folder; start a fresh run (without resume_from_checkpoint)"])
        skipped = [p.name for p in _newer_folders(output_dir, complete[-1])]
        if skipped:
            warnings.warn(f"hsm: resuming from {complete[-1]}; newer {', '.join(skipped)} incomplete (a save killed "
                          "midway?), left as they are", stacklevel=2)
        return str(complete[-1])
    problem = checkpoint_problem(Path(value))
    if problem is not None:
        raise ConfigError(source, [f"training.resume_from_checkpoint: {value}: not a complete checkpoint "
                                   f"({problem}); {newest}"])
    return str(value)


def _newer_folders(output_dir: Path, newest: Path) -> list[Path]:
    step = int(_NAME.match(newest.name).group(1))
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for s, p in sorted(found) if s > step]
