"""Nothing silent on disk: checksummed state and events, plans published whole, one writer at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.config import MiningConfig
from hsm.io import ChecksumMismatch, file_sha256
from hsm.mining.events import CorruptEventFile, list_event_files
from hsm.mining.plan import PlanError, RunLocked, load_plan, plan_dir, read_plan_table
from hsm.mining.planner import plan_epoch
from hsm.mining.update import HistoryChanged, OutputError
from hsm.mining.state import read_sample_ids, sample_ids_path, state_path
from hsm.schemas import SchemaError

runner = CliRunner()
MINING = MiningConfig(enabled=True, selector={"k": 3}, dump=True)


@pytest.fixture
def hsm_dir(tmp_path):
    rows = random_rows(np.random.default_rng(5), n_target=16, n_epochs=3, n_ranks=2, max_obs=2)
    write_rows(tmp_path / "hsm", rows)
    return tmp_path / "hsm"


def _flip_in_column(path, column: str, offset_in_chunk: float = 0.6) -> None:
    """Flip 4 bytes inside ``column``'s first data page, keeping the file's size."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    at = chunk.data_page_offset + int((start + chunk.total_compressed_size - chunk.data_page_offset) * offset_in_chunk)
    data = bytearray(path.read_bytes())
    for k in range(4):
        data[at - 2 + k] ^= 0x5A
    path.write_bytes(bytes(data))


def _rewrite_float(path, column: str, row: int, value: float) -> None:
    """Rewrite one stored float64 in place (an uncompressed column): same size, other bytes."""
    table = pq.read_table(path)
    old = np.float64(table.column(column)[row].as_py()).tobytes()
    data = bytearray(path.read_bytes())
    at = data.index(old)
    data[at:at + 8] = np.float64(value).tobytes()
    path.write_bytes(bytes(data))


def test_a_state_rewritten_in_place_is_an_error_and_refold_restores_the_plan(hsm_dir):
    clean = plan_epoch(hsm_dir, 3, MINING, TARGET).plan
    path = state_path(hsm_dir, 2)
    size = path.stat().st_size
    _rewrite_float(path, "mean", 0, -5.0)
    assert path.stat().st_size == size
    with pytest.raises(ChecksumMismatch, match=r"state/epoch=2/state\.parquet: sha256 .*--refold"):
        plan_epoch(hsm_dir, 3, MINING, TARGET)
    refolded = plan_epoch(hsm_dir, 3, MINING, TARGET, refold=True).plan
    assert refolded.equals(clean)


def test_flipped_bytes_in_an_event_page_are_an_error_naming_the_part(hsm_dir):
    plan_epoch(hsm_dir, 3, MINING, TARGET)
    part = list_event_files(hsm_dir, 1)[0]
    size = part.stat().st_size
    _flip_in_column(part, "loss")
    assert part.stat().st_size == size
    # The part was folded into the state of epoch 1: its change is an error, not a quiet refold.
    with pytest.raises(HistoryChanged, match=f"{part.name}: sha256 differs .* epoch 1 was folded(.|\n)*--refold"):
        plan_epoch(hsm_dir, 3, MINING, TARGET)
    with pytest.raises(HistoryChanged):
        plan_epoch(hsm_dir, 3, MINING, TARGET, skip_corrupt=True)  # skipping it would replace history too
    # Replacing the history is explicit; the refold verifies pages.
    with pytest.raises(CorruptEventFile, match=f"{part.name}.*--skip-corrupt"):
        plan_epoch(hsm_dir, 3, MINING, TARGET, refold=True)
    skipped = plan_epoch(hsm_dir, 3, MINING, TARGET, skip_corrupt=True, refold=True)
    assert str(part) in " ".join(map(str, skipped.skipped_files))


def _flip_in_footer(path) -> None:
    """Flip one byte of a column's max statistic in the footer: every page still verifies, the file still opens."""
    meta = pq.ParquetFile(path).metadata
    footer_len = int.from_bytes(path.read_bytes()[-8:-4], "little")
    data = bytearray(path.read_bytes())
    footer = data[-8 - footer_len:-8]
    stats = meta.row_group(0).column(meta.schema.names.index("global_step")).statistics
    needle = np.int64(stats.max).tobytes()
    at = len(data) - 8 - footer_len + footer.index(needle)
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_footer_byte_of_an_unfolded_part_is_an_error_in_plan_and_sql(hsm_dir):
    """Page checksums do not cover the footer; the part's sha256, recorded when it was written, does."""
    part = list_event_files(hsm_dir, 2)[0]
    _flip_in_footer(part)
    pq.ParquetFile(part, page_checksum_verification=True).read()  # still readable: pages verify
    with pytest.raises(CorruptEventFile, match=f"{part.name}: sha256 differs from the one recorded when it was written"):
        plan_epoch(hsm_dir, 3, MINING, TARGET)
    run_dir = hsm_dir.parent
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", "SELECT count(*) FROM events"])
    assert result.exit_code == 2 and part.name in result.output and "_sha256.json" in result.output
    skipped = plan_epoch(hsm_dir, 3, MINING, TARGET, skip_corrupt=True)
    assert str(part) in skipped.skipped_files


def test_a_deleted_event_part_is_an_error_not_a_smaller_log(hsm_dir):
    part = list_event_files(hsm_dir, 1)[-1]
    part.unlink()
    with pytest.raises(CorruptEventFile, match=f"{part.name}: recorded in .*_sha256.json but missing"):
        plan_epoch(hsm_dir, 3, MINING, TARGET)
    result = runner.invoke(app, ["sql", "--run-dir", str(hsm_dir.parent), "-e", "SELECT count(*) FROM events"])
    assert result.exit_code == 2 and "but missing" in result.output


def test_a_part_committed_without_its_ledger_entry_is_page_checked_and_recorded_by_the_next_writer(hsm_dir):
    """A writer killed between the part's rename and its ledger entry: the part is read with page checksums,
    and the rank's next writer (a resume) records it, so later damage to it is caught."""
    from hsm.mining.event_writer import EventWriter
    from hsm.mining.ledger import LEDGER, recorded_digests

    part = list_event_files(hsm_dir, 2)[0]
    ledger = part.parent / LEDGER
    entries = json.loads(ledger.read_text())
    del entries[part.name]
    ledger.write_text(json.dumps(entries))
    clean = plan_epoch(hsm_dir, 3, MINING, TARGET, refold=True).plan  # unrecorded: trusted after page checks
    rank = int(part.parent.name.split("=")[1])
    EventWriter(hsm_dir, run_id="test-run", rank=rank, attempt=1).close()
    assert recorded_digests(part.parent)[part.name] == file_sha256(part)
    assert plan_epoch(hsm_dir, 3, MINING, TARGET, refold=True).plan.equals(clean)
    _flip_in_footer(part)
    with pytest.raises(CorruptEventFile, match=part.name):
        plan_epoch(hsm_dir, 3, MINING, TARGET, refold=True)


def test_flipped_bytes_in_the_id_table_are_an_error(hsm_dir):
    plan_epoch(hsm_dir, 2, MINING, TARGET)
    path = sample_ids_path(hsm_dir, 0)
    _flip_in_column(path, "sample_id")
    with pytest.raises(SchemaError, match=r"sample_ids/epoch=0/sample_ids\.parquet"):
        read_sample_ids(hsm_dir, 1)


def test_a_plan_without_its_manifest_is_an_error_not_no_plan(hsm_dir):
    plan_epoch(hsm_dir, 2, MINING, TARGET)
    (plan_dir(hsm_dir, 2) / "manifest.json").unlink()
    with pytest.raises(PlanError, match="plan without its manifest"):
        load_plan(hsm_dir, 2)
    with pytest.raises(PlanError, match="plan without its manifest"):
        read_plan_table(hsm_dir, 2)


def test_a_failed_dump_publishes_nothing(hsm_dir, tmp_path):
    old = plan_epoch(hsm_dir, 2, MINING, TARGET, dump_dir=tmp_path).manifest
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the dump's directory must go")
    bigger = MiningConfig(enabled=True, selector={"k": 6}, dump=True)
    with pytest.raises(OutputError, match="not_a_dir"):
        plan_epoch(hsm_dir, 2, bigger, TARGET, dump_dir=blocked)
    manifest = json.loads((plan_dir(hsm_dir, 2) / "manifest.json").read_text())
    assert manifest["checksum"] == old["checksum"] == file_sha256(plan_dir(hsm_dir, 2) / "plan.parquet")
    assert manifest["counts"]["hard"] == 3
    assert [p.name for p in (hsm_dir / "plans").iterdir()] == ["epoch=2"]  # no staging left behind


def test_a_second_writer_fails_at_once(hsm_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
                               "l.acquire(); print('held', flush=True); time.sleep(60)", str(hsm_dir / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(RunLocked, match="another hsm plan or training is writing this run"):
            plan_epoch(hsm_dir, 2, MINING, TARGET)
        assert time.perf_counter() - started < 5
        assert not (hsm_dir / "plans").exists()
    finally:
        holder.kill()
        holder.wait()
    plan_epoch(hsm_dir, 2, MINING, TARGET)  # released with its process


def test_the_next_writer_cleans_up_after_a_killed_one(hsm_dir):
    first = plan_epoch(hsm_dir, 2, MINING, TARGET).manifest
    plans = hsm_dir / "plans"
    # A publish killed between its two renames (file systems that cannot swap): the old plan is aside.
    (plans / "epoch=2").rename(plans / ".epoch=2.old-999")
    (plans / ".epoch=3.staging-999").mkdir()
    stale_state = state_path(hsm_dir, 1).with_name(".state.parquet.999.1.tmp")
    stale_state.write_bytes(b"half")
    with pytest.raises(PlanError, match="no plan for epoch 2"):
        read_plan_table(hsm_dir, 2)
    plan_epoch(hsm_dir, 3, MINING, TARGET)
    assert sorted(p.name for p in plans.iterdir()) == ["epoch=2", "epoch=3"]
    assert read_plan_table(hsm_dir, 2)[0]["checksum"] == first["checksum"]
    assert not stale_state.exists()


@pytest.fixture
def run_dir(hsm_dir):
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 3}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (hsm_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return hsm_dir.parent


def test_cli_plan_names_the_corrupt_state_and_refold_repairs_it(run_dir):
    assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2"]).exit_code == 0
    _rewrite_float(state_path(run_dir / "hsm", 1), "mean", 1, 9.0)
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2"])
    assert result.exit_code == 2
    assert "state/epoch=1/state.parquet" in result.output and "--refold" in result.output
    assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2", "--refold"]).exit_code == 0


def test_cli_plan_on_a_missing_run_says_no_such_run(tmp_path):
    result = runner.invoke(app, ["plan", "--run-dir", str(tmp_path / "missing"), "--epoch", "1"])
    assert result.exit_code == 2
    assert "no such run" in result.output and "config.yaml" not in result.output


@pytest.mark.parametrize("text, expected", [("512MB", 512 * 10**6), ("2GiB", 2 << 30), ("1.5KiB", 1536), ("0", None),
                                            ("lots", None), ("-1GB", None)])
def test_memory_limit_is_read_as_a_byte_size(text, expected):
    from hsm.cli.plan import _parse_bytes

    assert _parse_bytes(text) == expected


def test_startup_check_names_a_foreign_file_a_truncated_part_and_an_empty_state(hsm_dir):
    from hsm.mining.checks import RunFileError, check_run_files

    plan_epoch(hsm_dir, 3, MINING, TARGET)
    assert check_run_files(hsm_dir) > 0
    part = list_event_files(hsm_dir, 2)[-1]
    intact = part.read_bytes()
    part.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(RunFileError, match=f"{part.name}: not a readable Parquet file"):
        check_run_files(hsm_dir)
    pq.write_table(pa.table({"x": [1, 2]}), part)  # a foreign Parquet file under a part's name
    with pytest.raises(RunFileError, match=f"{part.name}.*not an hsm event part"):
        check_run_files(hsm_dir)
    # The planner's reader names it too, also when told to skip corrupt parts.
    with pytest.raises(CorruptEventFile, match=part.name):
        plan_epoch(hsm_dir, 3, MINING, TARGET, refold=True)
    part.write_bytes(intact)
    (plan_dir(hsm_dir, 3) / "manifest.json").unlink()  # a resume would otherwise train epoch 3 without a plan
    with pytest.raises(RunFileError, match="plan without its manifest"):
        check_run_files(hsm_dir)
    state_path(hsm_dir, 1).write_bytes(b"")
    with pytest.raises(RunFileError, match=r"state/epoch=1/state\.parquet"):
        check_run_files(hsm_dir)


def test_train_refuses_a_foreign_event_file_before_step_0(tmp_path, make_corpus, demo_overrides):
    out = tmp_path / "out"
    foreign = out / "hsm" / "events" / "epoch=0" / "rank=0" / "part-00000.parquet"
    foreign.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    result = runner.invoke(app, [
        "train", "configs/demo.yaml", *demo_overrides(make_corpus(8, 4, 0)), f"training.output_dir={out}",
        "training.report_to=[]",
    ])
    assert result.exit_code == 2, result.output
    assert "part-00000.parquet" in result.output and "not an hsm event part" in result.output
    assert not (out / "hsm" / "events" / "epoch=0" / "rank=0" / "part-00001.parquet").exists()


def test_an_event_writer_removes_its_ranks_dead_temp_files_only(tmp_path):
    from hsm.io import temp_name
    from hsm.mining.event_writer import EventWriter
    from hsm.mining.events import event_dir

    dead = 2**22 + 7  # above Linux's default pid_max: no live process has it
    part = event_dir(tmp_path, 0, rank=0) / "part-00003.parquet"
    part.parent.mkdir(parents=True)
    stale = part.with_name(f".{part.name}.{dead}.140.tmp")
    stale.write_bytes(b"half a part")
    mine = temp_name(part)  # this process's own, as if in flight on another thread
    mine.write_bytes(b"in flight")
    other_rank = event_dir(tmp_path, 0, rank=1) / f".part-00000.parquet.{dead}.140.tmp"
    other_rank.parent.mkdir(parents=True)
    other_rank.write_bytes(b"rank 1's")
    EventWriter(tmp_path, run_id="r", rank=0).close()
    assert not stale.exists() and mine.exists() and other_rank.exists()
