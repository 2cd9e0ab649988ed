"""``hsm sql`` reads the run's views and nothing else: hostile statements fail with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.mining.plan import manifest_digest, plan_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_rows(root / "hsm", random_rows(np.random.default_rng(3), n_target=12, n_epochs=2, n_ranks=1, max_obs=2))
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 3}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (root / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner.invoke(app, ["plan", "--run-dir", str(root), "--epoch", "2"]).exit_code == 0
    return root


def _sql(run_dir, text):
    return runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", text, "--format", "csv"])


def _files(root):
    return sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("statement, message", [
    ("COPY (SELECT 1) TO '{tmp}/x.csv'", "COPY statements are refused"),
    ("COPY (SELECT * FROM events_raw LIMIT 1) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)", "COPY statements are refused"),
    ("ATTACH '{tmp}/x.db'", "ATTACH statements are refused"),
    ("INSTALL httpfs", "statements are refused"),
    ("LOAD httpfs", "statements are refused"),
    ("SET enable_external_access = true", "SET statements are refused"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("SELECT 1; COPY (SELECT 1) TO '{tmp}/y.csv'", "COPY statements are refused"),
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ("SELECT * FROM glob('/root/*')", "Permission Error"),
    ("SELECT * FROM read_text('/etc/hostname')", "Permission Error"),
    ("SELECT * FROM read_parquet('{tmp}/*.parquet')", "Permission Error"),
])
def test_hostile_statements_fail_and_change_nothing(run_dir, tmp_path, statement, message):
    part = next((run_dir / "hsm" / "events").rglob("part-*.parquet"))
    before = _files(run_dir)
    result = _sql(run_dir, statement.format(tmp=tmp_path, part=part))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert _files(run_dir) == before
    assert list(tmp_path.iterdir()) == []
    assert _sql(run_dir, "SELECT count(*) AS n FROM events").exit_code == 0


def test_views_and_shipped_queries_still_read_the_run(run_dir):
    result = _sql(run_dir, "SELECT count(*) FILTER (WHERE is_hard) AS hard FROM plans")
    assert result.exit_code == 0 and result.output.split() == ["hard", "3"], result.output
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "plan_summary", "--format", "csv"])
    assert result.exit_code == 0, result.output


def test_a_torn_plan_is_refused_not_shown(tmp_path):
    write_rows(tmp_path / "hsm", random_rows(np.random.default_rng(4), n_target=12, n_epochs=2, n_ranks=1, max_obs=2))
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 3}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (tmp_path / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner.invoke(app, ["plan", "--run-dir", str(tmp_path), "--epoch", "2"]).exit_code == 0
    # The pair a kill between two renames used to leave: a manifest (itself intact) whose plan is another.
    path = plan_dir(tmp_path / "hsm", 2) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["checksum"] = "0" * 64
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    result = _sql(tmp_path, "SELECT count(*) FROM plans")
    assert result.exit_code == 2 and "plans/epoch=2/plan.parquet: sha256" in result.output


def test_a_flipped_byte_in_an_event_part_is_named_not_shown(tmp_path):
    write_rows(tmp_path / "hsm", random_rows(np.random.default_rng(6), n_target=12, n_epochs=2, n_ranks=1, max_obs=2))
    part = next((tmp_path / "hsm" / "events").rglob("part-*.parquet"))
    data = bytearray(part.read_bytes())
    chunk = next(c for c in (pq.ParquetFile(part).metadata.row_group(0).column(i) for i in range(18))
                 if c.path_in_schema == "loss")
    # The last bytes of the loss column's data page (DuckDB reads Parquet without verifying page checksums).
    data[chunk.data_page_offset + chunk.total_compressed_size - 2] ^= 0x5A
    part.write_bytes(bytes(data))
    result = _sql(tmp_path, "SELECT sum(loss) FROM events")
    assert result.exit_code == 2 and part.name in result.output, result.output


def test_an_edited_manifest_is_refused(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    path = plan_dir(copy / "hsm", 2) / "manifest.json"
    path.write_text(path.read_text().replace('"hard": 3', '"hard": 4'))
    result = _sql(copy, "SELECT counts.hard FROM manifests")
    assert result.exit_code == 2 and "manifest_sha256" in result.output, result.output
