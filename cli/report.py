"""``hsm report``: a self-contained HTML page of a mining run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hsm.cli.common import console, fail, printed_warnings

__all__ = ["report"]


def report(
    run_dir: Path = typer.Option(..., "--run-dir", help="The run's output directory (holds hsm/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: RUN_DIR/report.html)."),
    epoch: Optional[int] = typer.Option(None, "--epoch", min=1, help="Plan epoch the galleries show (default: latest)."),
    top: int = typer.Option(12, "--top", min=1, help="Cards in each gallery (hardest and easiest)."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt",
                                      help="Leave damaged event parts out (warned) instead of refusing the run."),
) -> None:
    """Difficulty plots, galleries of the hardest and easiest samples, the data map and label-noise suspects."""
    from hsm.report import ReportError, build_report

    with printed_warnings():
        try:
            result = build_report(run_dir, out, epoch=epoch, top_k=top, skip_corrupt=skip_corrupt)
        except ReportError as e:
            raise fail("report", str(e)) from e
    console.print(f"wrote {result.html}", soft_wrap=True)
    console.print(f"  {result.n_cards} hardest/easiest cards, {result.n_suspects} label-noise suspect(s): "
                  f"{result.suspects_csv}", soft_wrap=True)
