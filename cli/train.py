"""``hsm train``: train from one YAML, with ``KEY=VALUE`` overrides."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import List, Optional

import typer

from hsm.cli.common import console, fail, printed_warnings

__all__ = ["train"]

_WRITE_FAILURES = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                   errno.EROFS: "Read-only file system", errno.EFBIG: "File too large"}


def _nearly_full(directory: Path) -> str | None:
    """"No space left on device" when the file system under ``directory`` has under 1 MiB free
    (torch.save reports a full disk as "unexpected pos" of its zip writer)."""
    import shutil

    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    return f"No space left on device: {free} bytes free" if free < (1 << 20) else None


def _write_failure(error: BaseException) -> str | None:
    """The OS write failure behind ``error`` (its chain, or the text a non-Python writer put in its message)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_FAILURES:
            return _WRITE_FAILURES[seen.errno]
        for text in _WRITE_FAILURES.values():
            if text in str(seen):
                return text
        if "file write failed" in str(seen):  # torch.save's PytorchStreamWriter
            return "file write failed"
        seen = seen.__cause__ or seen.__context__
    return None


def _refuse_early(config: Path, overrides: list[str]) -> None:
    """A locked run or a used folder, refused by rank 0 before torch and transformers load
    (:func:`hsm.train.startup.probe_run`): a second of work instead of the imports and the launcher's rendezvous.
    A config with mistakes is left to the full load below, which reports all of them at once."""
    import os
    import warnings

    from hsm.config import ConfigError
    from hsm.config_load import OVERWRITE_KEY, load_config
    from hsm.layout import RunPaths
    from hsm.mining.plan import RunLocked
    from hsm.train.startup import RunExists, StartRequest, probe_run

    if os.environ.get("RANK", "0") != "0":
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the full load below prints them
            cfg = load_config(config, overrides)
    except ConfigError:
        return
    output_dir, overwrite = cfg.training.get("output_dir"), cfg.training.get(OVERWRITE_KEY, False)
    if not output_dir or not isinstance(overwrite, bool):
        return
    try:
        probe_run(StartRequest(RunPaths.of(output_dir), resume=cfg.training.get("resume_from_checkpoint"),
                               overwrite=overwrite, source=cfg.source))
    except (RunLocked, RunExists) as e:
        raise fail("train", str(e)) from e


def train(
    config: Path = typer.Argument(..., help="Training config YAML."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides with dotted keys."),
) -> None:
    """Fine-tune with hard-sample mining (or plain fusion training when mining is off)."""
    from hsm.config import ConfigError
    from hsm.config_load import load_config

    _refuse_early(config, overrides or [])
    with printed_warnings():
        try:
            cfg = load_config(config, overrides or [], for_training=True)
        except ConfigError as e:
            raise fail("train", str(e)) from e
    from hsm.io import ChecksumMismatch
    from hsm.mining.checks import RunFileError
    from hsm.mining.events import CorruptEventFile
    from hsm.mining.plan import PlanError, RunLocked
    from hsm.mining.update import OutputError
    from hsm.data.records import RecordError
    from hsm.run import RunExists
    from hsm.run import train as run_training

    try:
        summary = run_training(cfg)
    except (ConfigError, RecordError, PlanError, FileNotFoundError, RunFileError, CorruptEventFile, RunLocked,
            OutputError, ChecksumMismatch, RunExists) as e:
        raise fail("train", str(e)) from e
    except OSError as e:  # read-only directory, a file where a directory must go, disk full
        raise fail("train", f"{e.filename or cfg.training.get('output_dir')}: cannot write ({e.strerror or e}); "
                            "choose another training.output_dir or fix the permissions") from e
    except Exception as e:
        failure = _write_failure(e) or _nearly_full(Path(str(cfg.training.get("output_dir"))))
        if failure is None:
            raise
        # A library's own writer (safetensors, torch.save) reports the OS error in its message only.
        out = Path(str(cfg.training.get("output_dir")))
        raise fail("train", f"{out}: cannot write ({failure}) while saving under it ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); free space or choose another training.output_dir, "
                            "then resume from the last whole checkpoint") from e
    from hsm.train import distributed

    trainer = summary["trainer"]
    if trainer.is_world_process_zero():
        _print_summary(summary)
    distributed.destroy_process_group()


def _resumed_step(args) -> int | None:
    """The ``global_step`` of the checkpoint this attempt resumed from (None for a fresh run)."""
    import json

    folder = getattr(args, "resume_from_checkpoint", None)
    if not folder:
        return None
    try:
        return int(json.loads((Path(folder) / "trainer_state.json").read_bytes())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _print_summary(summary: dict) -> None:
    run_dir = Path(summary["output_dir"]).resolve()
    summary = dict(summary, hsm_dir=str(Path(summary["hsm_dir"]).resolve()))
    resumed = _resumed_step(summary["trainer"].args)
    if resumed is not None and resumed >= summary["global_step"]:
        # The Trainer reports a train loss of 0 when it ran no step: say what happened instead.
        console.print(f"\n[bold]hsm train done[/]: resumed at step {resumed}, the run's last ({summary['global_step']} "
                      "steps); nothing left to train (raise training.num_train_epochs or training.max_steps to "
                      "train further)", soft_wrap=True)
    else:
        console.print(f"\n[bold]hsm train done[/]: {summary['global_step']} steps, train loss "
                      f"{summary['train_loss']:.4f}", soft_wrap=True)
    console.print(f"  output:      {run_dir}", soft_wrap=True)
    if summary["mining"]:
        console.print(f"  events:      {summary['hsm_dir']}/events/epoch=E/rank=R/part-*.parquet", soft_wrap=True)
        console.print(f"  plans:       {summary['hsm_dir']}/plans/epoch=E/(plan.parquet, manifest.json)", soft_wrap=True)
        console.print(f"  look into it: hsm sql --run-dir {run_dir} difficulty_trend   (hsm sql --list for more)", soft_wrap=True)
        console.print(f"  report:      hsm report --run-dir {run_dir}", soft_wrap=True)
    args = summary["trainer"].args
    if {"tensorboard", "all"} & set(args.report_to or []):  # only a run that wrote TensorBoard logs
        console.print(f"  tensorboard: tensorboard --logdir {run_dir}", soft_wrap=True)
