"""The event log on disk: exact schema, atomic parts, corrupt parts, attempts."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog import random_rows, write_rows
from hsm.mining.event_reader import read_epoch_events, supersede_attempts
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.mining.events import CorruptEventFile, list_event_files
from hsm.schemas import EVENT_SCHEMA
from oracle import effective_events


def _append(writer, epoch, step, n, offset=0):
    writer.append(EventBatch(
        epoch=epoch, global_step=step, dataset=["tgt"] * n, base_idx=np.arange(offset, offset + n),
        sample_id=[f"tgt:{i}" for i in range(offset, offset + n)], loss=np.linspace(0, 1, n),
        token_acc=np.full(n, 0.5), n_tokens=np.full(n, 12), aug_seed=np.arange(n), drawn_as_hard=np.zeros(n, bool),
    ))


def test_parts_have_the_exact_schema_and_values(tmp_path):
    with EventWriter(tmp_path, run_id="r", rank=3, attempt=2, flush_rows=10) as writer:
        for step in range(5):
            _append(writer, epoch=1, step=step, n=4, offset=4 * step)
    files = list_event_files(tmp_path, 1)
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(f.parent.name == "rank=3" for f in files)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.equals(EVENT_SCHEMA, check_metadata=False)
    assert table.num_rows == 20
    assert table.column("position").to_pylist() == [0, 1, 2, 3] * 5
    assert table.column("global_step").to_pylist() == [s for s in range(5) for _ in range(4)]
    assert set(table.column("attempt").to_pylist()) == {2} and set(table.column("rank").to_pylist()) == {3}
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"


def test_part_numbers_continue_after_a_restart(tmp_path):
    for attempt in range(2):
        with EventWriter(tmp_path, run_id="r", rank=0, attempt=attempt, flush_rows=100) as writer:
            _append(writer, epoch=0, step=0, n=3)
    assert [f.name for f in list_event_files(tmp_path, 0)] == ["part-00000.parquet", "part-00001.parquet"]


def test_background_error_is_raised(tmp_path):
    target = tmp_path / "events" / "epoch=0"
    target.parent.mkdir(parents=True)
    target.write_text("a file where a directory must go")
    writer = EventWriter(tmp_path, run_id="r", rank=0, flush_rows=1)
    _append(writer, epoch=0, step=0, n=2)
    with pytest.raises(OSError):
        writer.close()


def test_temporary_files_are_ignored(tmp_path):
    with EventWriter(tmp_path, run_id="r", rank=0) as writer:
        _append(writer, epoch=0, step=0, n=3)
    (tmp_path / "events/epoch=0/rank=0/.part-00007.parquet.123.tmp").write_bytes(b"half a file")
    assert read_epoch_events(tmp_path, 0).table.num_rows == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_schema"])
def test_corrupt_part_is_refused_or_skipped(tmp_path, damage):
    with EventWriter(tmp_path, run_id="r", rank=0, flush_rows=3) as writer:
        _append(writer, epoch=0, step=0, n=3)
        _append(writer, epoch=0, step=1, n=3, offset=3)
    bad = list_event_files(tmp_path, 0)[1]
    if damage == "truncate":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(300))
    else:
        pq.write_table(pa.table({"loss": [1.0]}), bad)
    with pytest.raises(CorruptEventFile, match="part-00001.parquet"):
        read_epoch_events(tmp_path, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_epoch_events(tmp_path, 0, skip_corrupt=True)
    assert read.table.num_rows == 3
    assert [p.name for p, _ in read.skipped] == ["part-00001.parquet"]
    assert any("part-00001.parquet" in str(w.message) for w in caught)


def test_part_in_the_wrong_epoch_partition_is_refused(tmp_path):
    with EventWriter(tmp_path, run_id="r", rank=0) as writer:
        _append(writer, epoch=0, step=0, n=3)
    src = list_event_files(tmp_path, 0)[0]
    dst = tmp_path / "events/epoch=1/rank=0/part-00000.parquet"
    dst.parent.mkdir(parents=True)
    dst.write_bytes(src.read_bytes())
    with pytest.raises(CorruptEventFile, match="another epoch"):
        read_epoch_events(tmp_path, 1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_supersede_attempts_equals_naive(seed):
    rows = random_rows(np.random.default_rng(seed), n_target=6, n_epochs=2, n_ranks=2, max_obs=2, resume=True)
    if not rows:
        return
    table = pa.Table.from_pylist([dict(r, run_id="r") for r in rows], schema=EVENT_SCHEMA)
    kept = supersede_attempts(table).to_pylist()
    expected = effective_events(rows)
    strip = lambda r: tuple(sorted((k, v) for k, v in r.items() if k != "run_id" and k in rows[0]))  # noqa: E731
    assert sorted(map(strip, kept)) == sorted(map(strip, expected))


def test_resumed_attempt_replaces_earlier_rows_on_disk(tmp_path):
    rows = random_rows(np.random.default_rng(3), n_target=10, n_epochs=1, n_ranks=2, max_obs=2, resume=True)
    write_rows(tmp_path, rows)
    read = read_epoch_events(tmp_path, 0)
    assert read.table.num_rows == len(effective_events(rows))
    assert read.superseded_rows == len(rows) - len(effective_events(rows)) > 0


@pytest.mark.parametrize("copy_to", ["rank=0/part-00009.parquet", "rank=1/part-00000.parquet"])
def test_copied_part_is_never_counted_twice(tmp_path, copy_to):
    rows = random_rows(np.random.default_rng(5), n_target=10, n_epochs=1, n_ranks=1, max_obs=3)
    write_rows(tmp_path, rows, flush_rows=5)
    original = read_epoch_events(tmp_path, 0).table
    source = list_event_files(tmp_path, 0)[1]
    copy = tmp_path / "events/epoch=0" / copy_to
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(source.read_bytes())
    with pytest.raises(CorruptEventFile) as refused:
        read_epoch_events(tmp_path, 0)
    assert source.name in str(refused.value) and copy.name in str(refused.value) and "--skip-corrupt" in str(refused.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = read_epoch_events(tmp_path, 0, skip_corrupt=True).table
    assert any(copy.name in str(w.message) for w in caught)
    key = lambda t: sorted(zip(*(t.column(c).to_pylist() for c in ("attempt", "global_step", "rank", "position", "loss"))))  # noqa: E731
    assert key(kept) == key(original)


def test_parts_sharing_a_step_at_a_flush_boundary_are_not_duplicates(tmp_path):
    # Gradient accumulation: one optimizer step spans micro-batches, and a flush may split it.
    with EventWriter(tmp_path, run_id="r", rank=0, flush_rows=2) as writer:
        for micro in range(2):
            writer.append(EventBatch(
                epoch=0, global_step=0, dataset=["tgt"] * 2, base_idx=np.arange(2), sample_id=["a", "b"],
                loss=np.ones(2), token_acc=np.ones(2), n_tokens=np.ones(2), aug_seed=np.zeros(2),
                drawn_as_hard=np.zeros(2, bool), position_offset=2 * micro))
    assert len(list_event_files(tmp_path, 0)) == 2
    assert read_epoch_events(tmp_path, 0).table.num_rows == 4


def test_append_takes_every_registered_metric_column_and_refuses_others(tmp_path):
    from hsm.metrics import NULLABLE_EVENT_COLUMNS

    base = dict(epoch=0, global_step=0, dataset=["tgt"] * 2, base_idx=np.arange(2), sample_id=["a", "b"],
                loss=np.ones(2), token_acc=np.ones(2), n_tokens=np.ones(2), aug_seed=np.zeros(2),
                drawn_as_hard=np.zeros(2, bool))
    with EventWriter(tmp_path, run_id="r", rank=0) as writer:
        with pytest.raises(TypeError, match="coord_los"):
            writer.append(EventBatch(**base, metrics={"coord_los": np.ones(2)}))  # a typo is not silently dropped
        writer.append(EventBatch(**base, metrics={name: [float(i), np.nan] for i, name in enumerate(NULLABLE_EVENT_COLUMNS)}))
    table = read_epoch_events(tmp_path, 0).table
    assert table.num_rows == 2  # the refused call wrote nothing
    for i, name in enumerate(NULLABLE_EVENT_COLUMNS):
        assert table.column(name).to_pylist() == [float(i), None], name


def test_event_sync_inventory_skips_only_the_local_ranks_own_parts(tmp_path):
    """Rank 0 trusts the inventory it just took of its own parts, and still checks every other rank's bytes."""
    from hsm.train.event_sync import missing_parts, rank_inventory

    hsm_dir = tmp_path / "hsm"
    write_rows(hsm_dir, random_rows(np.random.default_rng(3), n_target=30, n_epochs=1, n_ranks=2, max_obs=2))
    inventories = [rank_inventory(hsm_dir, 0, rank) for rank in (0, 1)]
    assert missing_parts(hsm_dir, 0, inventories) == [] == missing_parts(hsm_dir, 0, inventories, local_rank=0)
    # Rank 1's part on this disk is not what rank 1 logged (same name, other bytes): it must travel.
    part = sorted((hsm_dir / "events" / "epoch=0" / "rank=1").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)
    assert missing_parts(hsm_dir, 0, inventories, local_rank=0) == [(1, part.name)]
