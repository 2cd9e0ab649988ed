"""``hsm sql`` is confined: DuckDB itself cannot write or read a file, nothing outside the run is
followed, every file a view reads has its contract's schema, and a query is bounded in time and
memory and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.io import file_sha256
from hsm.metrics import NULLABLE_EVENT_COLUMNS
from hsm.mining.ledger import record_digests
from hsm.mining.plan import plan_dir
from hsm.mining.queries import connect

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _make_run(root: Path, seed: int = 3) -> Path:
    write_rows(root / "hsm", random_rows(np.random.default_rng(seed), n_target=12, n_epochs=2, n_ranks=1, max_obs=2))
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 3}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (root / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner.invoke(app, ["plan", "--run-dir", str(root), "--epoch", "2"]).exit_code == 0
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def run_copy(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _sql(run_dir, text, *options):
    return runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", text, "--format", "csv", *options])


def _contents(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_connection_itself_cannot_write_or_read_files(run_dir, tmp_path):
    """Past the statement filter, DuckDB has no file access: not the run's own parts, not elsewhere."""
    part = next((run_dir / "hsm" / "events").rglob("part-*.parquet"))
    manifest = plan_dir(run_dir / "hsm", 2) / "manifest.json"
    before = _contents(run_dir)
    con = connect(run_dir)
    for statement in (f"COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",
                      f"COPY (SELECT 1 AS x) TO '{manifest}' (FORMAT csv, QUOTE '')",
                      f"COPY (SELECT 1 AS x) TO '{tmp_path}/x.csv'",
                      f"SELECT sha256(content) FROM read_blob('{manifest}')",
                      f"SELECT * FROM read_parquet('{part}')"):
        with pytest.raises(duckdb.PermissionException):
            con.execute(statement)
    assert con.sql("SELECT count(*) FROM events").fetchall()[0][0] > 0  # the views still read
    con.close()
    assert _contents(run_dir) == before
    assert list(tmp_path.iterdir()) == []


def test_explain_analyze_copy_over_an_event_part_is_refused_and_the_part_unchanged(run_dir):
    part = next((run_dir / "hsm" / "events").rglob("part-*.parquet"))
    before = part.read_bytes()
    copy = f"COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)"
    for text in (f"EXPLAIN ANALYZE {copy}", f"EXPLAIN {copy}", f"SELECT 1; EXPLAIN ANALYZE {copy}; SELECT 2",
                 f"-- a comment\nexplain analyze {copy}"):
        result = _sql(run_dir, text)
        assert result.exit_code == 2 and "EXPLAIN COPY statements are refused" in result.output, result.output
        assert part.read_bytes() == before
    # EXPLAIN of a query still runs.
    result = _sql(run_dir, "EXPLAIN ANALYZE SELECT count(*) FROM events")
    assert result.exit_code == 0 and "analyzed_plan" in result.output, result.output


def test_install_is_named_as_such_and_the_message_lists_every_view(run_dir):
    result = _sql(run_dir, "INSTALL httpfs")
    assert result.exit_code == 2, result.output
    assert "INSTALL statements are refused" in result.output and "LOAD" not in result.output
    listed = re.search(r"views \(([^)]*)\)", result.output.replace("\n", " "))[1]
    assert set(re.split(r",\s*", listed)) == {"events", "events_raw", "measurements", "event_values", "sample_ids", "state",
                                              "plans", "manifests"}


def test_duckdb_temp_folder_is_private_and_removed_and_cwd_tmp_is_not_readable(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "notes.txt").write_text("not the run's")
    result = _sql(run_dir, f"SELECT content FROM read_text('{tmp_path}/.tmp/notes.txt')")
    assert result.exit_code == 2 and "Permission Error" in result.output, result.output
    result = _sql(run_dir, "SELECT current_setting('temp_directory') AS t")
    assert result.exit_code == 0, result.output
    temp = Path(result.output.split()[1])
    assert temp.name.startswith("hsm-sql-") and not temp.is_relative_to(tmp_path)
    assert not temp.exists()  # removed with the connection


def _id_table(path: Path, base_idx_type: pa.DataType = pa.int64()) -> Path:
    """A Parquet file with the id table's column names (``base_idx`` of ``base_idx_type``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"dataset": [TARGET], "base_idx": pa.array([7], base_idx_type),
                             "sample_id": ["someone else's"]}), path)
    return path


def test_a_symlink_out_of_the_run_is_refused(run_copy, tmp_path):
    foreign = _id_table(tmp_path / "elsewhere" / "foreign.parquet")
    link = run_copy / "hsm" / "sample_ids" / "epoch=99" / "sample_ids.parquet"
    link.parent.mkdir()
    link.symlink_to(foreign)
    result = _sql(run_copy, "SELECT count(*) FROM sample_ids")
    assert result.exit_code == 2 and str(link) in result.output and "outside the run" in result.output, result.output


def test_an_events_folder_linked_from_another_run_is_refused(run_copy, tmp_path):
    other = _make_run(tmp_path / "other", seed=9)
    link = run_copy / "hsm" / "events" / "epoch=5"
    link.symlink_to(other / "hsm" / "events" / "epoch=0", target_is_directory=True)
    result = _sql(run_copy, "SELECT count(*) FROM events")
    assert result.exit_code == 2 and str(link) in result.output and "outside the run" in result.output, result.output


def test_an_events_folder_no_ledger_or_state_knows_is_named(run_copy, tmp_path):
    other = _make_run(tmp_path / "other", seed=9)
    copied = run_copy / "hsm" / "events" / "epoch=5"
    shutil.copytree(other / "hsm" / "events" / "epoch=0", copied)
    for ledger in copied.rglob("_sha256.json"):
        ledger.unlink()
    result = _sql(run_copy, "SELECT count(*) FROM events")
    assert result.exit_code == 2 and f"{copied}:" in result.output and "no part ledger" in result.output, result.output
    from hsm.mining.queries import RunConfinementError

    with pytest.raises(RunConfinementError, match="epoch=5"):
        connect(run_copy)


def test_a_file_off_its_schema_is_named(run_copy):
    foreign = _id_table(run_copy / "hsm" / "sample_ids" / "epoch=99" / "sample_ids.parquet", pa.int32())
    result = _sql(run_copy, "SELECT count(*) FROM sample_ids")
    assert result.exit_code == 2 and str(foreign) in result.output, result.output
    assert "column 'base_idx' is int32, expected int64" in result.output


def test_an_event_log_without_the_nullable_columns_reads_them_as_nulls(tmp_path):
    rows = random_rows(np.random.default_rng(5), n_target=10, n_epochs=2, n_ranks=1, max_obs=2)
    write_rows(tmp_path / "hsm", rows)
    for part in (tmp_path / "hsm" / "events").rglob("part-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns([c for c in NULLABLE_EVENT_COLUMNS if c in table.column_names]), part)
        record_digests(part.parent, {part.name: file_sha256(part)})
        assert not set(NULLABLE_EVENT_COLUMNS) & set(pq.read_schema(part).names)
    result = _sql(tmp_path, "SELECT count(*) AS n, count(coord_loss) AS c, count(value) AS v FROM event_values")
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["n,c,v", f"{len(rows)},0,{len(rows)}"]  # no plan yet: value is the loss
    for name in ("difficulty_trend", "dataset_breakdown"):
        result = runner.invoke(app, ["sql", "--run-dir", str(tmp_path), name, "--format", "csv"])
        assert result.exit_code == 0, result.output


def test_a_query_past_its_timeout_is_stopped(run_dir):
    started = time.monotonic()
    result = _sql(run_dir, "SELECT count(*) FROM range(1000000000000)", "--timeout", "1")
    assert result.exit_code == 2 and "--timeout 1 s" in result.output, result.output
    assert time.monotonic() - started < 30


def _memory_bytes(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)\s*([A-Za-z]+)", text.strip()).groups()
    return float(number) * 1024 ** ["bytes", "KiB", "MiB", "GiB", "TiB"].index(unit)


def test_memory_is_limited_below_duckdbs_default(run_dir):
    result = _sql(run_dir, "SELECT current_setting('memory_limit') AS m")
    assert result.exit_code == 0, result.output
    duckdb_default = duckdb.connect().sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert _memory_bytes(result.output.splitlines()[1]) < 0.7 * _memory_bytes(duckdb_default)
    result = _sql(run_dir, "SELECT length(list(range)) FROM range(20000000)", "--memory-limit", "20MB")
    assert result.exit_code == 2 and "Out of Memory" in result.output and "--memory-limit" in result.output
    result = _sql(run_dir, "SELECT 1", "--memory-limit", "lots")
    assert result.exit_code == 2 and "--memory-limit 'lots'" in result.output, result.output


def test_ctrl_c_interrupts_a_running_query_at_once(run_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "hsm.cli.app", "sql", "--run-dir", str(run_dir), "-e",
                                "SELECT count(*) FROM range(1000000000000)"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("hsm-sql-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the private temp folder appears once the views are built
        time.sleep(1.0)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
        process.wait()
    assert time.monotonic() - sent < 10
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert list(tmp_path.glob("hsm-sql-*")) == []


def test_sql_called_as_a_function_with_the_defaults_runs(run_dir, capsys):
    """``hsm demo`` calls ``sql`` directly: the CLI's defaults are plain values, the library's limit the same."""
    from hsm.cli import sql as sql_cli
    from hsm.mining import queries

    assert sql_cli.DEFAULT_MEMORY_LIMIT == queries.DEFAULT_MEMORY_LIMIT
    sql_cli.sql(name="plan_summary", run_dir=run_dir, execute=None, list_queries=False, fmt="csv", limit=30,
                skip_corrupt=False, timeout_s=sql_cli.DEFAULT_TIMEOUT_S, memory_limit=sql_cli.DEFAULT_MEMORY_LIMIT)
    assert capsys.readouterr().out.startswith("epoch,")


def test_reads_dont_need_a_select_keyword_and_pivot_needs_an_in_list(run_dir):
    for text in ("FROM events LIMIT 1", "DESCRIBE events", "SUMMARIZE plans", "WITH e AS (FROM events) SELECT 1",
                 "PIVOT events ON epoch IN (0, 1) USING count(*) GROUP BY dataset"):
        result = _sql(run_dir, text)
        assert result.exit_code == 0, (text, result.output)
    result = _sql(run_dir, "PIVOT events ON epoch USING count(*)")  # creates an ENUM type first
    assert result.exit_code == 2 and "PIVOT statements are refused" in result.output and "IN list" in result.output
