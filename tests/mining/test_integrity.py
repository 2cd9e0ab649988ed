"""Nothing silent on disk: checksummed state and events, plans published whole, one writer at a time."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from lock_holder import lock_held
from hsm.cli.app import app
from hsm.config import MiningConfig
from hsm.io import ChecksumMismatch, file_sha256
from hsm.mining.events import CorruptEventFile, list_event_files
from hsm.mining.plan import PlanError, RunLocked, load_plan, plan_dir, read_plan_table
from hsm.mining.planner import PlanRequest, plan_epoch
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
    clean = plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET)).plan
    path = state_path(hsm_dir, 2)
    size = path.stat().st_size
    _rewrite_float(path, "mean", 0, -5.0)
    assert path.stat().st_size == size
    with pytest.raises(ChecksumMismatch, match=r"state/epoch=2/state\.parquet: sha256 .*--refold"):
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
    refolded = plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, refold=True)).plan
    assert refolded.equals(clean)


def test_flipped_bytes_in_an_event_page_are_an_error_naming_the_part(hsm_dir):
    plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
    part = list_event_files(hsm_dir, 1)[0]
    size = part.stat().st_size
    _flip_in_column(part, "loss")
    assert part.stat().st_size == size
    # The part was folded into the state of epoch 1: its change is an error, not a quiet refold.
    with pytest.raises(HistoryChanged, match=f"{part.name}: sha256 differs .* epoch 1 was folded(.|\n)*--refold"):
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
    with pytest.raises(HistoryChanged):
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, skip_corrupt=True))  # skipping it would replace history too
    # Replacing the history is explicit; the refold verifies pages.
    with pytest.raises(CorruptEventFile, match=f"{part.name}.*--skip-corrupt"):
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, refold=True))
    skipped = plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, skip_corrupt=True, refold=True))
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
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
    run_dir = hsm_dir.parent
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", "SELECT count(*) FROM events"])
    assert result.exit_code == 2 and part.name in result.output and "_sha256.json" in result.output
    skipped = plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, skip_corrupt=True))
    assert str(part) in skipped.skipped_files


def test_a_deleted_event_part_is_an_error_not_a_smaller_log(hsm_dir):
    part = list_event_files(hsm_dir, 1)[-1]
    part.unlink()
    with pytest.raises(CorruptEventFile, match=f"{part.name}: recorded in .*_sha256.json but missing"):
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
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
    clean = plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, refold=True)).plan  # unrecorded: trusted after page checks
    rank = int(part.parent.name.split("=")[1])
    EventWriter(hsm_dir, run_id="test-run", rank=rank, attempt=1).close()
    assert recorded_digests(part.parent)[part.name] == file_sha256(part)
    assert plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, refold=True)).plan.equals(clean)
    _flip_in_footer(part)
    with pytest.raises(CorruptEventFile, match=part.name):
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, refold=True))


def test_flipped_bytes_in_the_id_table_are_an_error(hsm_dir):
    plan_epoch(PlanRequest(hsm_dir, 2, MINING, TARGET))
    path = sample_ids_path(hsm_dir, 0)
    _flip_in_column(path, "sample_id")
    with pytest.raises(SchemaError, match=r"sample_ids/epoch=0/sample_ids\.parquet"):
        read_sample_ids(hsm_dir, 1)


def test_a_plan_without_its_manifest_is_an_error_not_no_plan(hsm_dir):
    plan_epoch(PlanRequest(hsm_dir, 2, MINING, TARGET))
    (plan_dir(hsm_dir, 2) / "manifest.json").unlink()
    with pytest.raises(PlanError, match="plan without its manifest"):
        load_plan(hsm_dir, 2)
    with pytest.raises(PlanError, match="plan without its manifest"):
        read_plan_table(hsm_dir, 2)


def test_a_failed_dump_publishes_nothing(hsm_dir, tmp_path):
    old = plan_epoch(PlanRequest(hsm_dir, 2, MINING, TARGET, dump_dir=tmp_path)).manifest
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the dump's directory must go")
    bigger = MiningConfig(enabled=True, selector={"k": 6}, dump=True)
    with pytest.raises(OutputError, match="not_a_dir"):
        plan_epoch(PlanRequest(hsm_dir, 2, bigger, TARGET, dump_dir=blocked))
    manifest = json.loads((plan_dir(hsm_dir, 2) / "manifest.json").read_text())
    assert manifest["checksum"] == old["checksum"] == file_sha256(plan_dir(hsm_dir, 2) / "plan.parquet")
    assert manifest["counts"]["hard"] == 3
    assert [p.name for p in (hsm_dir / "plans").iterdir()] == ["epoch=2"]  # no staging left behind


def test_a_second_writer_fails_at_once(hsm_dir):
    with lock_held(hsm_dir / ".lock"):
        started = time.perf_counter()
        with pytest.raises(RunLocked, match="another hsm plan or training is writing this run"):
            plan_epoch(PlanRequest(hsm_dir, 2, MINING, TARGET))
        assert time.perf_counter() - started < 5
        assert not (hsm_dir / "plans").exists()
    plan_epoch(PlanRequest(hsm_dir, 2, MINING, TARGET))  # released with its process


def test_the_next_writer_cleans_up_after_a_killed_one(hsm_dir):
    first = plan_epoch(PlanRequest(hsm_dir, 2, MINING, TARGET)).manifest
    plans = hsm_dir / "plans"
    # A publish killed between its two renames (file systems that cannot swap): the old plan is aside.
    (plans / "epoch=2").rename(plans / ".epoch=2.old-999")
    (plans / ".epoch=3.staging-999").mkdir()
    stale_state = state_path(hsm_dir, 1).with_name(".state.parquet.999.1.tmp")
    stale_state.write_bytes(b"half")
    with pytest.raises(PlanError, match="no plan for epoch 2"):
        read_plan_table(hsm_dir, 2)
    plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
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

    plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
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
        plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET, refold=True))
    part.write_bytes(intact)
    (plan_dir(hsm_dir, 3) / "manifest.json").unlink()  # a resume would otherwise train epoch 3 without a plan
    with pytest.raises(RunFileError, match="plan without its manifest"):
        check_run_files(hsm_dir)
    state_path(hsm_dir, 1).write_bytes(b"")
    with pytest.raises(RunFileError, match=r"state/epoch=1/state\.parquet"):
        check_run_files(hsm_dir)


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


# --- every file checked: id table, folded history, manifest counts, run records ---------------------------------


def _planned_run(run_dir, epoch: int = 3):
    """The run planned through the CLI, with its config and dataset records written as training writes them."""
    from hsm.io import write_recorded

    hsm = run_dir / "hsm"
    write_recorded((hsm / "config.yaml").read_bytes(), hsm / "config.yaml")
    dataset = {"target": {"name": TARGET, "size": 16, "fingerprint": "f" * 64}, "datasets": [{"name": TARGET, "size": 16}]}
    write_recorded(json.dumps(dataset).encode(), hsm / "dataset.json")
    write_recorded(json.dumps({"num_train_epochs": 4.0, "max_steps": 40}).encode(), hsm / "run.json")
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", str(epoch)])
    assert result.exit_code == 0, result.output
    return hsm


def _clear_error(result, *names: str) -> str:
    """Exit 2 with a message naming every one of ``names`` and no traceback."""
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for name in names:
        assert name in text, (name, text)
    return text


def _swap_two_sample_ids(path) -> None:
    """Rewrite the id table as a valid Parquet file with the first two ids exchanged (a relabelling)."""
    table = pq.read_table(path)
    ids = table.column("sample_id").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]
    pq.write_table(table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(ids)), path)


def test_a_relabelled_id_table_is_an_error_in_plan_sql_report_and_startup(run_dir):
    from hsm.mining.checks import RunFileError, check_run_files

    hsm = _planned_run(run_dir)
    path = sample_ids_path(hsm, 0)
    _swap_two_sample_ids(path)
    pq.read_table(path)  # a readable, well-formed table: only the record can tell
    with pytest.raises(SchemaError, match=r"sample_ids/epoch=0/sample_ids\.parquet: sha256 .*--refold"):
        read_sample_ids(hsm, 2)
    with pytest.raises(RunFileError, match=r"sample_ids/epoch=0/sample_ids\.parquet"):
        check_run_files(hsm)
    _clear_error(runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--force"]),
                 "sample_ids/epoch=0/sample_ids.parquet", "--refold")
    _clear_error(runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", "SELECT * FROM plans"]),
                 "sample_ids/epoch=0/sample_ids.parquet")
    _clear_error(runner.invoke(app, ["report", "--run-dir", str(run_dir)]), "sample_ids/epoch=0/sample_ids.parquet")
    assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--refold"]).exit_code == 0
    assert pq.read_table(path).column("sample_id").to_pylist()[:2] != pq.read_table(path).column("sample_id").to_pylist()[1::-1]


def test_a_flipped_id_table_byte_is_an_error_never_a_decode_traceback(run_dir):
    hsm = _planned_run(run_dir)
    path = sample_ids_path(hsm, 1)
    data = bytearray(path.read_bytes())
    for at in range(4, len(data) - 8, max(1, (len(data) - 12) // 40)):  # 40 single-byte flips across the file
        damaged = bytearray(data)
        damaged[at] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(SchemaError, match=r"sample_ids/epoch=1/sample_ids\.parquet"):
            read_sample_ids(hsm, 2)
    path.write_bytes(bytes(data))
    assert read_sample_ids(hsm, 2).num_rows > 0


def test_a_folded_part_rewritten_with_its_ledger_is_refused_by_plan_until_refold(run_dir):
    """The ledger updated too: only the state's record of what it folded still knows the old bytes."""
    from hsm.mining.ledger import LEDGER

    hsm = _planned_run(run_dir)
    part = list_event_files(hsm, 1)[0]
    table = pq.read_table(part)
    pq.write_table(table.set_column(table.schema.get_field_index("loss"), "loss",
                                    pa.array(np.full(table.num_rows, 99.0, np.float32))), part)
    ledger = part.parent / LEDGER
    ledger.write_text(json.dumps({**json.loads(ledger.read_text()), part.name: file_sha256(part)}))
    states = {e: state_path(hsm, e).read_bytes() for e in (1, 2)}
    plan = (plan_dir(hsm, 3) / "plan.parquet").read_bytes()
    for flags in ([], ["--force"], ["--allow-empty", "--force"], ["--skip-corrupt"]):
        text = _clear_error(runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", *flags]),
                            f"epoch=1/rank=0/{part.name}", "--refold")
        assert "epoch 1 was folded" in text
    _clear_error(runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", "SELECT count(*) FROM events"]), part.name)
    assert {e: state_path(hsm, e).read_bytes() for e in (1, 2)} == states  # the recorded history is untouched
    assert (plan_dir(hsm, 3) / "plan.parquet").read_bytes() == plan
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--refold", "--force"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", "SELECT count(*) FROM events"]).exit_code == 0


def test_a_removed_folded_epoch_is_not_replaced_by_allow_empty(run_dir):
    import shutil

    hsm = _planned_run(run_dir)
    states = {e: state_path(hsm, e).read_bytes() for e in (1, 2)}
    shutil.rmtree(hsm / "events" / "epoch=1")
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3"])
    text = _clear_error(result, "epoch=1/rank=", "now missing", "--refold")
    assert "--allow-empty" not in text  # the advice is the explicit refold, not a flag that would replace history
    _clear_error(runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--allow-empty", "--force"]),
                 "now missing", "--refold")
    assert {e: state_path(hsm, e).read_bytes() for e in (1, 2)} == states


def test_an_event_part_added_after_its_epoch_was_folded_is_folded_in(hsm_dir):
    """A resumed attempt re-logging an epoch's tail adds parts: the normal incremental update, no error."""
    plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
    before = {p.name for p in list_event_files(hsm_dir, 1)}
    rows = [r for r in random_rows(np.random.default_rng(9), n_target=16, n_epochs=2, n_ranks=1, max_obs=1)
            if r["epoch"] == 1][:5]
    write_rows(hsm_dir, [{**r, "attempt": 1} for r in rows])
    assert {p.name for p in list_event_files(hsm_dir, 1)} > before
    result = plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
    assert result.folded_epochs == [1, 2]


def _rewrite_manifest(path, change) -> None:
    """Edit a manifest and recompute its own manifest_sha256, as a careful tamperer would."""
    from hsm.mining.plan import manifest_digest

    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_counts_are_checked_against_the_plan_rows(run_dir):
    hsm = _planned_run(run_dir)
    manifest = plan_dir(hsm, 3) / "manifest.json"
    _rewrite_manifest(manifest, lambda m: m["counts"].update(hard=m["counts"]["hard"] + 1))
    with pytest.raises(PlanError, match=r"manifest\.json: counts\.hard 4 but the plan has 3"):
        read_plan_table(hsm, 3)
    with pytest.raises(PlanError, match="counts.hard"):
        load_plan(hsm, 3)
    _clear_error(runner.invoke(app, ["report", "--run-dir", str(run_dir)]), "manifest.json", "counts.hard")


@pytest.mark.parametrize("name", ["config.yaml", "dataset.json", "run.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "edit"])
def test_damaged_run_records_are_clear_errors_in_plan_and_report(run_dir, name, damage):
    hsm = _planned_run(run_dir, epoch=2)
    path = hsm / name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x80  # also an invalid UTF-8 byte
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # a well-formed edit: a tampered fingerprint, a doubled epoch count, another selector
        data = bytearray(bytes(data).replace(b"f" * 64, b"e" * 64).replace(b"4.0", b"8.0").replace(b"k: 3", b"k: 5"))
    assert bytes(data) != path.read_bytes()
    path.write_bytes(bytes(data))
    _clear_error(runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3"]), str(path))
    assert not plan_dir(hsm, 3).exists()  # nothing planned from it, no tampered fingerprint copied
    if name != "run.json":  # the report reads the config and the dataset record
        _clear_error(runner.invoke(app, ["report", "--run-dir", str(run_dir)]), str(path))


def test_a_record_written_by_hand_or_by_an_older_hsm_is_read_as_it_is(run_dir):
    from hsm.io import checksum_record_path

    hsm = _planned_run(run_dir, epoch=2)
    for name in ("config.yaml", "dataset.json", "run.json"):
        checksum_record_path(hsm / name).unlink()
    assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3"]).exit_code == 0


@pytest.mark.parametrize("name", ["config.yaml", "dataset.json", "run.json"])
def test_one_deleted_record_beside_the_others_is_an_error_not_an_unverified_file(run_dir, name):
    from hsm.io import checksum_record_path

    hsm = _planned_run(run_dir, epoch=2)
    record = checksum_record_path(hsm / name)
    record.unlink()
    (hsm / name).write_bytes((hsm / name).read_bytes().replace(b"4.0", b"8.0"))  # then unnoticed without the rule
    text = _clear_error(runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3"]), str(hsm / name),
                        record.name)
    assert "missing" in text
    assert not plan_dir(hsm, 3).exists()


def test_startup_check_reads_every_part_against_its_ledger_and_state(hsm_dir):
    """Damage that leaves a part a readable event file: each fails the start-up check, naming the part."""
    from hsm.mining.checks import RunFileError, check_run_files
    from hsm.mining.ledger import LEDGER

    plan_epoch(PlanRequest(hsm_dir, 3, MINING, TARGET))
    part = list_event_files(hsm_dir, 1)[0]
    intact = part.read_bytes()
    ledger = part.parent / LEDGER
    entries = ledger.read_text()
    table = pq.read_table(part)
    other = table.set_column(table.schema.get_field_index("loss"), "loss",
                             pa.array(np.full(table.num_rows, 7.0, np.float32)))
    damages = {
        "rewritten": lambda: pq.write_table(other, part),
        "footer byte": lambda: _flip_in_footer(part),
        "removed": part.unlink,
        "rewritten with its ledger": lambda: (pq.write_table(other, part), ledger.write_text(
            json.dumps({**json.loads(entries), part.name: file_sha256(part)}))),
        "rewritten, ledger removed": lambda: (pq.write_table(other, part), ledger.unlink()),
    }
    for what, damage in damages.items():
        damage()
        with pytest.raises(RunFileError, match=part.name):
            check_run_files(hsm_dir)
        part.write_bytes(intact)
        ledger.write_text(entries)
        assert check_run_files(hsm_dir) > 0, what
