"""``hsm plan``: fold pending events and write the plan for one epoch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer
from hsm.cli.common import console, fail, hsm_dir_of, print_table, printed_warnings
from hsm.layout import RunPaths

__all__ = ["plan"]


def _parse_bytes(text: str) -> int | None:
    """``"4GB"`` -> bytes, read by ``pydantic.ByteSize`` (``GB`` = 10**9, ``GiB`` = 2**30); None when it is not a size."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        value = int(TypeAdapter(ByteSize).validate_python(text.strip()))
    except ValidationError:
        return None
    return value if value > 0 else None


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def plan(
    run_dir: Path = typer.Option(..., "--run-dir", help="The run's output directory (holds hsm/)."),
    epoch: int = typer.Option(..., "--epoch", min=1, help="Epoch the plan is for; built from epochs < N."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config YAML (default: RUN_DIR/hsm/config.yaml)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="polars, duckdb or numpy (default: the config's)."),
    num_epochs: Optional[float] = typer.Option(None, "--num-epochs", help="Planned epochs, for activate_after_pct."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compute and print; write nothing."),
    skip_corrupt: bool = typer.Option(
        False, "--skip-corrupt", help="Skip unreadable event parts, and drop duplicated events, with a warning."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite a plan built with other settings, or plan a target the run does not have."
    ),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="Fold epochs that have no events (normally refused: --epoch too far ahead?)."
    ),
    memory_limit: Optional[str] = typer.Option(
        None, "--memory-limit", help="Fold budget, e.g. 4GB or 512MB; a bigger epoch is folded out of core "
        "(spilling to --temp-dir). Default 2GB."
    ),
    temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="Where an out-of-core fold spills (default: TMPDIR)."),
    refold: bool = typer.Option(
        False, "--refold", help="Ignore the stored states and fold every epoch again from the event log."
    ),
) -> None:
    """Update the state from events of epochs < N not yet folded, and write the plan for epoch N."""
    from hsm.io import ChecksumMismatch
    from hsm.mining.engines import ENGINES
    from hsm.mining.events import CorruptEventFile
    from hsm.mining.plan import PlanError, RunLocked
    from hsm.mining.planner import PlanRequest, EmptyEpochs, PlanConflict, plan_epoch
    from hsm.mining.update import OutputError
    from hsm.schemas import SchemaError
    from hsm.mining.state import StateMismatch

    hsm_dir = hsm_dir_of(run_dir)
    if not hsm_dir.is_dir():
        raise fail("plan", f"{run_dir}: no such run (no hsm/ directory); give --run-dir the output_dir of an hsm train run")
    limit_bytes = None
    if memory_limit is not None:
        limit_bytes = _parse_bytes(memory_limit)
        if limit_bytes is None:
            raise fail("plan", f"--memory-limit must be a size such as 4GB or 512MB, got {memory_limit!r}")
    if engine is not None and engine not in ENGINES:
        raise fail("plan", f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    cfg, mining, dataset, num_epochs = _planning_inputs(hsm_dir, config or RunPaths.at(hsm_dir).config, num_epochs)
    stored = _stored_checksum(hsm_dir, epoch)
    with printed_warnings():
        try:
            result = plan_epoch(PlanRequest(
                hsm_dir, epoch, mining, cfg.target_name, engine=engine, num_train_epochs=num_epochs,
                dataset=dataset, skip_corrupt=skip_corrupt, write=not dry_run, dump_dir=run_dir,
                force=force, allow_empty=allow_empty, memory_limit=limit_bytes, temp_directory=temp_dir, refold=refold,
            ))
        except (CorruptEventFile, PlanError, SchemaError, StateMismatch, PlanConflict, EmptyEpochs, OutputError,
                RunLocked, ChecksumMismatch, ValueError) as e:
            raise fail("plan", _without_delete_advice(str(e)) if dry_run else str(e)) from e
        except OSError as e:  # the run's lock file or a directory could not be created (disk full, read-only)
            raise fail("plan", f"{e.filename or hsm_dir}: cannot write ({e.strerror or e}); free space or fix "
                               "the permissions, then re-run") from e
    _print_summary(result, hsm_dir, stored)


def _stored_checksum(hsm_dir: Path, epoch: int) -> str | None:
    """The checksum in the manifest of the plan already stored for ``epoch`` (None: none, or unreadable), so the
    summary can say when a re-plan wrote the same plan again."""
    import json

    manifest = hsm_dir / "plans" / f"epoch={epoch}" / "manifest.json"
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("checksum")
    except (OSError, ValueError, AttributeError):
        return None


def _planning_inputs(hsm_dir: Path, config_path: Path, num_epochs: float | None):
    """The run's config, its enabled mining section, its target's identity and the epochs it planned."""
    from hsm.config import ConfigError
    from hsm.config_load import load_config
    from hsm.io import ChecksumMismatch, read_recorded
    from hsm.mining.plan import DatasetInfo

    try:
        recorded = config_path == RunPaths.at(hsm_dir).config
        if recorded and config_path.is_file():
            read_recorded(config_path)  # the run's own config, as training wrote it
        cfg = load_config(config_path, interpolate=not recorded)
    except (ConfigError, ChecksumMismatch) as e:
        raise fail("plan", str(e)) from e
    mining = cfg.custom.hard_sample_mining
    if mining is None or not mining.enabled:
        raise fail("plan", f"{config_path}: custom.hard_sample_mining.enabled is not true; nothing to plan")
    if cfg.target_name is None:
        raise fail("plan", f"{config_path}: custom.fusion_config.target.name is required (the dataset to mine)")
    dataset = None
    dataset_file = RunPaths.at(hsm_dir).dataset_info
    if dataset_file.is_file():
        dataset = _run_json(dataset_file, lambda d: DatasetInfo(str(d["target"]["name"]), int(d["target"]["size"]),
                                                                  d["target"].get("fingerprint")))
    run_info = RunPaths.at(hsm_dir).run_info  # the epochs training really ran (max_steps may drive them)
    if num_epochs is None and run_info.is_file():
        num_epochs = _run_json(run_info, lambda d: float(d["num_train_epochs"]))
    if num_epochs is None and "num_train_epochs" in cfg.training:
        num_epochs = float(cfg.training["num_train_epochs"])
    return cfg, mining, dataset, num_epochs


def _run_json(path: Path, pick):
    """``pick(content)`` of a JSON file training wrote, its sha256 record checked; any damage exits naming the file."""
    from hsm.io import ChecksumMismatch, read_recorded

    try:
        return pick(json.loads(read_recorded(path)))
    except ChecksumMismatch as e:
        raise fail("plan", str(e)) from e
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, a missing key, a wrong type
        raise fail("plan", f"{path}: not the file hsm train writes ({type(e).__name__}: {e}); restore it, or "
                           "remove it to plan without it") from e


def _without_delete_advice(message: str) -> str:
    """A dry run must not advise deleting hsm/state: drop the "; delete ..." advice, say what a dry run did."""
    kept = re.split(r";\s*delete\b", message, maxsplit=1)[0]
    return f"{kept} (--dry-run: nothing was changed; a dry run plans from the stored state as it is)"


def _print_summary(result, hsm_dir: Path, stored: str | None = None) -> None:
    from hsm.mining.planner import unobserved_target_note

    m = result.manifest
    head = "[bold]dry run[/] (nothing written)" if not result.written else f"wrote {hsm_dir / 'plans' / f'epoch={result.epoch}'}"
    if result.written and stored is not None:
        head += " (the same plan as the one stored before)" if stored == m["checksum"] else " (it replaced another plan)"
    console.print(f"hsm plan epoch {result.epoch}: {head}")
    folded = ", ".join(map(str, result.folded_epochs)) or "none (state up to date)"
    console.print(f"  folded epochs: {folded}; state after epoch {m['state_epoch']}; engine {m['engine']}")
    if result.skipped_files:
        console.print(f"  [yellow]skipped {len(result.skipped_files)} corrupt part(s)[/]")
    trigger = "[green]applies[/]" if m["triggered"] else "[yellow]not applied[/]"
    console.print(f"  mode {m['mode']} on {m['metric']}: {trigger} ({m['trigger_reason']})")
    if m.get("no_signal"):
        console.print(f"  [yellow]no signal[/]: every eligible {m['metric']} score is equal, so nothing is marked hard "
                      "and the epoch is drawn as without a plan")
    counts = m["counts"]
    regular = counts["eligible"] - counts["hard"]
    print_table(
        ["pool", "samples", "mean", "p50", "p90"],
        [["hard", str(counts["hard"]), *(_fmt(m["scores"]["hard"][k]) for k in ("mean", "p50", "p90"))],
         ["regular", str(regular), *(_fmt(m["scores"]["regular"][k]) for k in ("mean", "p50", "p90"))]],
        right={"samples", "mean", "p50", "p90"},
    )
    extra = f", regular drawn {counts['regular_drawn']}" if m["mode"] == "fixed_set" else ""
    console.print(f"  weights {_fmt(m['weights']['min'])}..{_fmt(m['weights']['max'])}, default {m['default_weight']}{extra}")
    note = unobserved_target_note(result.epoch, m)
    if note:
        console.print(f"  [yellow]{note}[/]", soft_wrap=True)
    if result.churn is not None:
        c = result.churn
        console.print(
            f"  churn vs epoch {result.epoch - 1}: kept {c['kept']}, added {c['added']}, removed {c['removed']}, "
            f"jaccard {c['jaccard']:.3f}"
        )
    suspects = m.get("suspects")
    if suspects is not None:
        listed = ", ".join(suspects["sample_ids"][:10]) + (", ..." if suspects["count"] > 10 else "")
        console.print(f"  label-noise suspects kept out of the hard set: {suspects['count']}"
                      + (f" ({listed})" if listed else ""), soft_wrap=True)
    if result.written:
        console.print(f"  checksum {m['checksum'][:16]}")
