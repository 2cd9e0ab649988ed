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
    _damaged_samples_table_is_named(run, runner, app)
    return html


def _damaged_samples_table_is_named(run: Path, runner: CliRunner, app) -> None:
    """``samples.parquet`` is a recorded run file: rot of the same size, a cut, a lost record, the file deleted, and
    the file deleted with its record each stop the report with a message naming it (never a report built from other
    samples, nor one whose cards all say "no record"); the restored file reports again."""
    from hsm.io import checksum_record_path

    samples = run / "hsm" / "samples.parquet"
    record = checksum_record_path(samples)
    assert record.is_file() and checksum_record_path(run / "hsm" / "config.yaml").is_file()
    good, good_record = samples.read_bytes(), record.read_bytes()
    rot = bytearray(good)
    rot[len(rot) // 2] ^= 0x01
    cases = ((bytes(rot), True), (good[: len(good) // 2], True), (good, False), (None, True), (None, False))
    for damaged, keep_record in cases:
        if damaged is None:
            samples.unlink()
        else:
            samples.write_bytes(damaged)
        if not keep_record:
            record.unlink()
        result = runner.invoke(app, ["report", "--run-dir", str(run)])
        assert result.exit_code == 2 and "samples.parquet" in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
        samples.write_bytes(good)
        record.write_bytes(good_record)
    assert runner.invoke(app, ["report", "--run-dir", str(run)]).exit_code == 0
