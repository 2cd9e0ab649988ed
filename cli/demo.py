"""``hsm demo``: the embedded demo, end to end on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

from hsm.cli.common import console
from hsm.layout import RunPaths

__all__ = ["demo", "packaged_demo_config"]


def packaged_demo_config() -> Path:
    """The demo config shipped inside the package (``hsm/cli/demo.yaml``, a copy of ``configs/demo.yaml``
    that a test keeps equal), so ``hsm demo`` runs from an installed wheel, outside the repository."""
    from importlib.resources import files

    return Path(str(files("hsm.cli") / "demo.yaml"))


def demo(
    out: Path = typer.Option(Path("demo_run"), "--out", help="Where the corpus and the run go."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="Demo config (default: the one shipped with hsm, equal to configs/demo.yaml)."),
) -> None:
    """Synthesize the corpus, train with mining on, show the difficulty trend with hsm sql, write the report."""
    from hsm.cli.sql import DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT_S, sql
    from hsm.cli.train import train
    from hsm.data.synth import synthesize

    config = config if config is not None else packaged_demo_config()
    run = out / "run"
    if run.exists():
        if not RunPaths.of(run).run_info.is_file():
            raise typer.BadParameter(f"{run} exists and is not an hsm run; choose another --out", param_hint="--out")
        # A demo starts fresh: an earlier demo's log (maybe of another hsm or demo config) is not resumed.
        shutil.rmtree(run)
        console.print(f"removed the previous demo run {run}")
    synthesize(out / "data")
    console.print(f"corpus written to {out / 'data'}")
    train(config, [f"custom.fusion_config.target.train_jsonl={(out / 'data/bbu/train.jsonl').resolve()}",
                   f"custom.fusion_config.target.val_jsonl={(out / 'data/bbu/val.jsonl').resolve()}",
                   f"custom.fusion_config.sources.0.train_jsonl={(out / 'data/lvis/train.jsonl').resolve()}",
                   f"custom.fusion_config.sources.1.train_jsonl={(out / 'data/coco/train.jsonl').resolve()}",
                   f"training.output_dir={(out / 'run').resolve()}"])
    for query in ("plan_summary", "difficulty_trend", "hard_set_churn"):
        console.print(f"\n[bold]$ hsm sql --run-dir {out / 'run'} {query}[/]")
        sql(name=query, run_dir=out / "run", execute=None, list_queries=False, fmt="table", limit=30,
            skip_corrupt=False, timeout_s=DEFAULT_TIMEOUT_S, memory_limit=DEFAULT_MEMORY_LIMIT)
    from hsm.cli.report import report

    console.print(f"\n[bold]$ hsm report --run-dir {out / 'run'}[/]")
    report(run_dir=out / "run", out=None, epoch=None, top=12)
