"""What every stack's run must allow with no flags: ``hsm plan`` rebuilds training's plan, ``hsm report`` renders."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner


def replan_and_report(run: Path, epoch: int) -> str:
    """Delete the run's plan for ``epoch``, rebuild it with ``hsm plan`` (it must equal training's byte for byte in
    content), render ``hsm report`` and return its HTML, which must show every card's image."""
    from hsm.cli.app import app

    plan = run / "hsm" / "plans" / f"epoch={epoch}" / "plan.parquet"
    trained = pq.read_table(plan)
    for path in plan.parent.iterdir():
        path.unlink()
    plan.parent.rmdir()
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", "--run-dir", str(run), "--epoch", str(epoch)])
    assert planned.exit_code == 0, planned.output
    assert pq.read_table(plan).equals(trained)
    reported = runner.invoke(app, ["report", "--run-dir", str(run)])
    assert reported.exit_code == 0, reported.output
    html = (run / "report.html").read_text()
    assert "no record for this sample" not in html and "image not found" not in html and "names no target" not in html
    return html
