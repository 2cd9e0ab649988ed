"""Which ``checkpoint-N`` folder a resumed training starts from.

The Trainer writes a checkpoint's weights, optimizer, scheduler and RNG state first and
``trainer_state.json`` last, so a save killed midway leaves a ``checkpoint-N`` without a
readable ``trainer_state.json`` whose ``global_step`` is ``N``. Such a folder is not
complete; resuming from it fails deep inside the Trainer ("Can't find a valid
checkpoint"). :func:`resolve_resume` checks the folder asked for before anything is
loaded or written, and ``resume_from_checkpoint: last`` picks the newest complete one.

hsm's own files need nothing from the checkpoint: the events logged after its step are
superseded by the resumed attempt's (:func:`hsm.mining.event_reader.supersede_attempts`)
and the plans are rebuilt at the epoch ends that follow. They do need the checkpoint to be
the run's own: events are flushed before every checkpoint, so a checkpoint at step ``N``
of this run finds the run's event log reaching ``global_step >= N - 1`` (steps count from
0 there). A checkpoint past the log is another run's (the ``checkpoint-N`` folders a run
replaced with ``training.overwrite_output_dir`` leaves behind): resuming from it would
continue one run's weights in another run's log, so it is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from hsm.config import ConfigError
from hsm.io import open_parquet
from hsm.layout import RunPaths

__all__ = ["LAST", "checkpoint_problem", "complete_checkpoints", "foreign_checkpoint_problem", "last_logged_step",
           "resolve_resume"]

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
        foreign = foreign_checkpoint_problem(complete[-1], output_dir)
        if foreign is not None:
            raise ConfigError(source, [f"training.resume_from_checkpoint: {LAST}: {foreign}"])
        skipped = [p.name for p in _newer_folders(output_dir, complete[-1])]
        if skipped:
            warnings.warn(f"hsm: resuming from {complete[-1]}; newer {', '.join(skipped)} incomplete (a save killed "
                          "midway?), left as they are", stacklevel=2)
        return str(complete[-1])
    problem = checkpoint_problem(Path(value))
    if problem is not None:
        raise ConfigError(source, [f"training.resume_from_checkpoint: {value}: not a complete checkpoint "
                                   f"({problem}); {newest}"])
    foreign = foreign_checkpoint_problem(Path(value), output_dir)
    if foreign is not None:
        raise ConfigError(source, [f"training.resume_from_checkpoint: {foreign}"])
    return str(value)


def last_logged_step(hsm_dir: str | Path) -> int | None:
    """The highest ``global_step`` in the run's event log; None when it has no readable event part.

    Naive equivalent: ``max(e.global_step for e in every event of the run)``; only the
    highest epoch's parts are read (epochs follow the steps). A part that cannot be read is
    passed over here: the start-up file checks name it.
    """
    root = RunPaths.at(hsm_dir).events_root
    epochs = sorted((int(p.name[len("epoch="):]) for p in root.glob("epoch=*") if p.name[len("epoch="):].isdigit()),
                    reverse=True) if root.is_dir() else []
    for epoch in epochs:
        steps = []
        for part in sorted(root.glob(f"epoch={epoch}/rank=*/part-*.parquet")):
            try:
                column = open_parquet(part).read(columns=["global_step"]).column("global_step")
            except (pa.ArrowException, OSError, KeyError):
                continue
            if len(column):
                steps.append(pc.max(column).as_py())
        if steps:
            return int(max(steps))
    return None


def foreign_checkpoint_problem(checkpoint: Path, output_dir: str | Path) -> str | None:
    """Why the complete ``checkpoint`` cannot be this run's (None when it can be, or when ``output_dir`` has no log).

    This run flushed its events before writing any of its checkpoints, so a checkpoint
    of it at ``global_step`` ``N`` finds the log reaching step ``N - 1``.
    """
    logged = last_logged_step(RunPaths.of(output_dir).root)
    if logged is None:
        return None
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_bytes())["global_step"]
    if logged >= step - 1:
        return None
    hsm_dir = RunPaths.of(output_dir).root
    return (f"{checkpoint} is at step {step}, but the event log of {hsm_dir} ends at step {logged + 1}: the checkpoint "
            f"was not written by this run (a run replaced with training.overwrite_output_dir=true leaves its "
            f"checkpoint-N folders behind). Move the other run's checkpoint-N folders out of {Path(output_dir)} and "
            "resume from this run's own, or start a fresh run")


def _newer_folders(output_dir: Path, newest: Path) -> list[Path]:
    step = int(_NAME.match(newest.name).group(1))
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for s, p in sorted(found) if s > step]
