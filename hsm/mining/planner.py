"""Between epochs: fold new events into the state, select the hard set, write the plan.

This is the one function both ``hsm plan`` and the training callback call:
:func:`plan_epoch`. The state update is incremental: an epoch is folded only if
its state file is missing or its event files changed since (their digest), and
a fold reads just that epoch's events plus the previous state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import os
import shutil
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hsm.config import MiningConfig, mining_config_hash
from hsm.mining.engines import ENGINES
from hsm.mining.events import (
    CorruptEventFile,
    drop_duplicate_events,
    events_digest,
    list_event_files,
    part_checksums,
    read_epoch_events,
    verified_checksums,
    supersede_attempts,
)
from hsm.io import write_json_atomic
from hsm.mining.plan import (
    DatasetInfo,
    PlanError,
    plan_dir,
    publish_plan,
    read_manifest,
    read_plan_table,
    run_lock,
    stage_plan,
)
from hsm.metrics import difficulty, metric as metric_info
from hsm.schemas import EVENT_SCHEMA, PLAN_SCHEMA, SAMPLE_ID_SCHEMA, SchemaError, check_schema, conform
from hsm.mining.select import rank_order, select_plan
from hsm.mining.suspects import data_map, read_epoch_metrics
from hsm.mining.state import (
    PER_EPOCH_AGGREGATES,
    STATE_VERSION,
    IDX_BITS,
    IDX_MASK,
    StateInfo,
    dataset_codes,
    disk_table,
    encode_keys,
    find_states,
    fold_columns,
    is_committed,
    fold_table,
    read_sample_ids,
    read_state,
    read_state_info,
    sample_ids_path,
    score_of,
    state_path,
    verify_state,
    write_sample_ids,
    write_state,
)
from hsm.mining.trigger import should_apply

__all__ = [
    "PlanResult",
    "PlanConflict",
    "OutputError",
    "EmptyEpochs",
    "plan_epoch",
    "fold_pending",
    "build_plan_table",
    "hard_set",
    "plan_differences",
    "empty_epochs",
    "Folded",
    "event_columns",
    "metric_values",
    "target_rows",
    "id_lookup",
    "metric_column",
    "fold_out_of_core",
    "range_bounds",
    "buckets_for",
    "DEFAULT_MEMORY_LIMIT",
    "stale_mask",
    "stale_scores",
]


class PlanConflict(ValueError):
    """The plan asked for differs from the run's dataset or from the plan it would overwrite."""


class EmptyEpochs(ValueError):
    """Epochs to fold that have no events although earlier epochs do (a plan asked for too far ahead)."""


class OutputError(RuntimeError):
    """A state, plan or dump file could not be written (read-only directory, a file in the way, disk full)."""


_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hsm-state-writer")


@contextlib.contextmanager
def _plain_pages():
    """Allocate without numpy's transparent-huge-page advice while planning.

    numpy advises the kernel to back every large array with huge pages; where the kernel
    compacts memory to find them on the fault (THP ``defrag`` set to ``madvise``, the
    default of many distributions and VMs) a fresh 80 MB array then costs ~170 ms
    instead of ~35 ms on the development VM. The planner allocates a few GB of
    short-lived arrays per 10M-event epoch and reads each a few times, so it gains
    nothing from huge pages. An explicit ``NUMPY_MADVISE_HUGEPAGE`` is left alone.
    """
    from numpy._core import multiarray

    advise = getattr(multiarray, "_set_madvise_hugepage", None)  # numpy's own switch (private, numpy >= 1.20)
    if advise is None or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        yield
        return
    previous = advise(False)
    try:
        yield
    finally:
        advise(previous)


def _writing(path: Path, write, *args, **kwargs):
    """Run ``write(*args, **kwargs)``; an ``OSError`` becomes :class:`OutputError` naming ``path``."""
    try:
        return write(*args, **kwargs)
    except OSError as e:
        raise OutputError(
            f"{path}: cannot write ({e.strerror or e}); make {path.parent} writable or choose another run directory"
        ) from e


@dataclass
class PlanResult:
    """What :func:`plan_epoch` did, for the CLI summary and the training logs."""

    epoch: int
    manifest: dict[str, Any]
    plan: pa.Table
    folded_epochs: list[int] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    churn: dict[str, Any] | None = None
    written: bool = True
    last_events: pa.Table | None = None  # events of the last epoch folded by this call, if any


def _events_root(hsm_dir: Path) -> Path:
    return hsm_dir / "events"


def event_columns(metric: str) -> tuple[str, ...]:
    """The event columns a fold with ``metric`` reads (the rest of the contract is checked, not loaded)."""
    return tuple(dict.fromkeys(("attempt", "epoch", "global_step", "rank", "position", "dataset", "base_idx",
                                "sample_id", "loss", metric_column(metric))))


def metric_column(metric: str) -> str:
    """The event column ``metric`` reads (``hsm.metrics.METRICS``)."""
    return metric_info(metric).column


def metric_values(events: pa.Table, metric: str) -> np.ndarray:
    """The difficulty ``x`` of every event as float64: the column, or ``1 - column`` for accuracies and F1."""
    return difficulty(metric, events.column(metric_column(metric)).to_numpy(zero_copy_only=False))


@dataclass
class Folded:
    """The state after :func:`fold_pending`: the keyed fold table and what produced it."""

    state: pa.Table | None  # FOLD_COLUMNS, sorted by key; None when nothing was logged yet
    info: StateInfo | None
    folded_epochs: list[int] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    last_events: pa.Table | None = None
    reused_epoch: int = -1  # the last epoch whose stored state (and id table) was reused
    new_ids: list[pa.Table] = field(default_factory=list)  # ids of folded epochs, when not written
    pending: Future | None = None  # the last state's write, still running; call wait()

    def wait(self) -> None:
        """Wait for the background write of the last state; raises its error."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


# Bytes a fold needs in memory per event and per state row: 10M events folded in memory
# into a 9.1M-row state peaked at 3.3 GB (events with sample_id strings, the fold's
# temporaries, state in and out, the state written while the plan is built); in 4 key
# ranges at 2.3 GB and faster, so the budget errs towards ranges.
_BYTES_PER_EVENT, _BYTES_PER_STATE_ROW = 160, 200
DEFAULT_MEMORY_LIMIT = 2 << 30
"""Fold budget in bytes above which an epoch is folded out of core (``hsm plan --memory-limit``)."""


@dataclass
class EpochFold:
    """One folded epoch: the new state, the ids of its new samples, and its event statistics."""

    state: pa.Table
    ids: pa.Table
    names: list[str]
    n_events: int
    mean_loss: float | None
    skipped: list[str] = field(default_factory=list)


def buckets_for(files: list[Path], state: pa.Table | None, budget: int) -> int:
    """How many key-range buckets an epoch's fold needs to stay within ``budget`` bytes (1: in memory)."""
    rows = sum(_footer_rows(path) for path in files)
    state_bytes = (state.num_rows if state is not None else rows) * _BYTES_PER_STATE_ROW
    need = rows * _BYTES_PER_EVENT + state_bytes
    if need <= budget:
        return 1
    room = max(budget - state_bytes, budget // 4, 1)
    return max(2, min(math.ceil(rows * _BYTES_PER_EVENT / room), 4096))


def _footer_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError):
        return 0  # unreadable: the reader reports it


def _new_ids(out: pa.Table, names: list[str], sample_id: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Id rows of the samples a fold saw for the first time (``k == n_obs``), from their first event."""
    k, n_obs = out.column("k").to_numpy(), out.column("n_obs").to_numpy()
    new = np.flatnonzero((k > 0) & (k == n_obs))
    keys = out.column("key").to_numpy()[new]
    return pa.table({
        "dataset": pa.DictionaryArray.from_arrays(pa.array((keys >> IDX_BITS).astype(np.int32)), pa.array(names, pa.string())),
        "base_idx": pa.array(keys & IDX_MASK),
        "sample_id": sample_id.take(pa.array(out.column("first_row").to_numpy()[new])),
    })


def _keyed(events: pa.Table, codes: np.ndarray, metric: str) -> pa.Table:
    return pa.table({
        "key": encode_keys(codes, events.column("base_idx").to_numpy()),
        "x": metric_values(events, metric),
        **{c: events.column(c) for c in ("global_step", "rank", "position")},
    })


def range_bounds(sample_keys: list[np.ndarray], n_ranges: int) -> np.ndarray:
    """Upper bounds of ``n_ranges`` key ranges: quantiles of a sample of the keys (ranges may be fewer)."""
    pool = np.sort(np.concatenate(sample_keys)) if sample_keys else np.zeros(0, dtype=np.int64)
    if n_ranges <= 1 or len(pool) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(pool[(np.arange(1, n_ranges) * len(pool)) // n_ranges])


def finite_mean_loss(events: pa.Table) -> float | None:
    """Mean ``loss`` of the training steps' events: ``det_f1`` rows carry NaN loss and do not count."""
    loss = events.column("loss").to_numpy(zero_copy_only=False).astype(np.float64)
    loss = loss[np.isfinite(loss)]
    return float(loss.mean()) if len(loss) else None


def _fold_in_memory(read, epoch: int, state, names: list[str], mining: MiningConfig, fold, *,
                    per_epoch: bool) -> EpochFold:
    events = read.table
    observed = events
    column = events.column(metric_column(mining.metric))
    if column.null_count:
        observed = events.filter(pc.is_valid(column))  # no such tokens: not an observation of this metric
    codes, names = dataset_codes(observed.column("dataset"), names)
    out = fold(state, _keyed(observed, codes, mining.metric), epoch=epoch, ema_decay=mining.ema_decay, per_epoch=per_epoch)
    mean_loss = finite_mean_loss(events)
    return EpochFold(state=out.select(list(fold_columns(mining.aggregate))), ids=_new_ids(out, names, observed.column("sample_id")),
                     names=names, n_events=events.num_rows, mean_loss=mean_loss,
                     skipped=[str(path) for path, _ in read.skipped])


def _footer_spans(part: pq.ParquetFile, columns: tuple[str, ...]) -> dict[str, dict[str, int]] | None:
    """``{column: {"min", "max"}}`` over a part's row groups from its footer statistics; None if any is missing."""
    metadata = part.metadata
    spans = {}
    for name in columns:
        index = part.schema_arrow.get_field_index(name)
        lows, highs = [], []
        for g in range(metadata.num_row_groups):
            stats = metadata.row_group(g).column(index).statistics
            if stats is None or not stats.has_min_max:
                return None
            lows.append(stats.min)
            highs.append(stats.max)
        if not lows:
            return None
        spans[name] = {"min": int(min(lows)), "max": int(max(highs))}
    return spans


_ATTEMPT_KEY = ("global_step", "rank", "attempt")


def fold_out_of_core(
    files: list[Path], epoch: int, state: pa.Table | None, names: list[str], mining: MiningConfig, fold, *,
    n_buckets: int, spill_dir: Path, skip_corrupt: bool = False, per_epoch: bool = False,
) -> EpochFold:
    """Fold one epoch in ``n_buckets`` key ranges, spilling the events to ``spill_dir``.

    Pass 0 reads every part's footer and its dataset, rank, attempt and step columns
    (one part at a time) for the dataset codes, the attempt rule, duplicate parts and the
    bucket bounds; pass 1 streams the parts in record batches and appends each event to
    its key range's Arrow IPC file; pass 2 folds one range at a time with the engine,
    against the matching slice of the key-sorted state. A sample's events all fall in one
    range, so the state equals the in-memory fold's, byte for byte.
    """
    import polars as pl

    columns = event_columns(mining.metric)
    metric = metric_column(mining.metric)
    parts, skipped, spans, sample, new_names = [], [], [], [], set()
    for path in files:
        try:
            part = pq.ParquetFile(path, read_dictionary=["dataset"], page_checksum_verification=True)
            check_schema(part.schema_arrow, EVENT_SCHEMA, str(path))
            bounds_of = _footer_spans(part, ("attempt", "rank", "global_step", "epoch"))
            # The event writer records these spans in the footer; other writers' parts are scanned.
            head = part.read(columns=["dataset", "base_idx"] + (["attempt", "rank", "global_step", "epoch"] if bounds_of is None else []))
        except (SchemaError, pa.ArrowException, OSError) as e:
            if not skip_corrupt:
                raise CorruptEventFile(f"{path}: not readable as events ({e}); re-run with --skip-corrupt to skip it") from e
            warnings.warn(f"hsm: skipping corrupt event file {path}: {e}", stacklevel=2)
            skipped.append(str(path))
            continue
        if head.num_rows and bounds_of is None:
            bounds_of = {c: pc.min_max(head.column(c)).as_py() for c in ("attempt", "rank", "global_step", "epoch")}
        if head.num_rows and bounds_of["epoch"] != {"min": epoch, "max": epoch}:
            raise CorruptEventFile(f"{path}: holds events of another epoch than its partition epoch={epoch}")
        new_names |= {v for c in head.column("dataset").chunks for v in c.dictionary.to_pylist()}
        if head.num_rows:
            spans.append((bounds_of, len(parts)))
        sample.append(head.select(["dataset", "base_idx"]).take(pa.array(np.arange(0, head.num_rows, 101))))
        parts.append((path, part))
        del head
    names = list(names) + sorted(new_names - set(names))
    identity = ["attempt", "global_step", "rank", "position"]
    # Parts that could repeat each other's events (same attempt and rank, overlapping steps): compare rows.
    def group(span: dict) -> tuple | None:
        single = span["attempt"]["min"] == span["attempt"]["max"] and span["rank"]["min"] == span["rank"]["max"]
        return (span["attempt"]["min"], span["rank"]["min"]) if single else None

    for i, (a, a_index) in enumerate(spans):
        for b, b_index in spans[:i]:
            overlap = a["global_step"]["min"] <= b["global_step"]["max"] and b["global_step"]["min"] <= a["global_step"]["max"]
            if overlap and (group(a) is None or group(b) is None or group(a) == group(b)):
                pair = [parts[b_index], parts[a_index]]
                drop_duplicate_events([part.read(columns=identity) for _, part in pair], [p for p, _ in pair], skip=False)
    best = None
    if len({(s_["attempt"]["min"], s_["attempt"]["max"]) for s_, _ in spans}) > 1 or any(
            s_["attempt"]["min"] != s_["attempt"]["max"] for s_, _ in spans):
        # Several attempts (a resumed run): per (global_step, rank), only the highest attempt counts.
        rows = pa.concat_tables([part.read(columns=["attempt", "global_step", "rank"]) for _, part in parts])
        kept = supersede_attempts(rows.append_column("epoch", pa.array(np.zeros(rows.num_rows, np.int32))))
        best = pl.from_arrow(kept.select(_ATTEMPT_KEY)).unique()
        del rows, kept
    del spans

    # Bucket bounds: key quantiles of the state and of a strided sample of the events.
    sampled = pa.concat_tables(sample) if sample else None
    keys = []
    if sampled is not None and sampled.num_rows:
        codes, _ = dataset_codes(sampled.column("dataset"), names)
        keys.append(encode_keys(codes, sampled.column("base_idx").to_numpy()))
    if state is not None and state.num_rows:
        keys.append(state.column("key").to_numpy()[:: max(1, state.num_rows // 100_000)])
    bounds = range_bounds(keys, n_buckets)
    del sample, sampled, keys

    n_events, n_losses, loss_sum = 0, 0, 0.0
    paths = [spill_dir / f"bucket-{b:04d}.arrow" for b in range(len(bounds) + 1)]
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    spill_schema = pa.schema([("key", pa.int64()), ("x", pa.float64()), ("global_step", pa.int64()), ("rank", pa.int32()),
                              ("position", pa.int32()), ("sample_id", pa.string())])
    try:
        for path, part in parts:
            present = [c for c in columns if c in part.schema_arrow.names]
            for batch in part.iter_batches(batch_size=1 << 20, columns=present):
                events = conform(pa.Table.from_batches([batch]), pa.schema([EVENT_SCHEMA.field(c) for c in columns]),
                                 str(path), keep_dictionary=True)
                if best is not None:  # only the events of the kept attempts, in their order
                    keep = pl.from_arrow(events.select(_ATTEMPT_KEY)).with_row_index("row").join(
                        best, on=list(_ATTEMPT_KEY), how="semi").get_column("row").sort()
                    events = events.take(keep.to_arrow())
                n_events += events.num_rows
                loss = events.column("loss").to_numpy(zero_copy_only=False).astype(np.float64)
                loss = loss[np.isfinite(loss)]  # det_f1 rows carry NaN loss: not training steps
                n_losses += len(loss)
                loss_sum += float(loss.sum())
                column = events.column(metric)
                if column.null_count:
                    events = events.filter(pc.is_valid(column))
                codes, known = dataset_codes(events.column("dataset"), names)
                keyed = _keyed(events, codes, mining.metric).append_column("sample_id", events.column("sample_id"))
                bucket = np.searchsorted(bounds, keyed.column("key").to_numpy(), side="right").astype(np.uint16)
                order = np.argsort(bucket, kind="stable")  # a radix sort for 16-bit keys
                edges = np.searchsorted(bucket[order], np.arange(len(paths) + 1))
                ordered = keyed.take(pa.array(order))
                for b in range(len(paths)):
                    if edges[b + 1] > edges[b]:
                        if b not in writers:
                            writers[b] = pa.ipc.new_file(paths[b], spill_schema)
                        writers[b].write_table(ordered.slice(edges[b], edges[b + 1] - edges[b]).cast(spill_schema))
                del events, keyed, ordered
    finally:
        for writer in writers.values():
            writer.close()

    states, ids = [], []
    state_keys = state.column("key").to_numpy() if state is not None else np.zeros(0, dtype=np.int64)
    cut = np.searchsorted(state_keys, bounds)
    starts, stops = np.r_[0, cut], np.r_[cut, len(state_keys)]
    for b, path in enumerate(paths):
        piece = state.slice(int(starts[b]), int(stops[b] - starts[b])) if state is not None else None
        if b not in writers:
            if piece is not None and piece.num_rows:
                states.append(piece.select(list(fold_columns(mining.aggregate))))
            continue
        with pa.memory_map(str(path)) as source:
            events = pa.ipc.open_file(source).read_all()
        out = fold(piece if piece is not None and piece.num_rows else None, events.drop_columns(["sample_id"]),
                   epoch=epoch, ema_decay=mining.ema_decay, per_epoch=per_epoch)
        states.append(out.select(list(fold_columns(mining.aggregate))))
        ids.append(_new_ids(out, names, events.column("sample_id")))
        del events, out
        path.unlink()
    new_state = pa.concat_tables(states)  # one chunk per range: no second copy of the state
    new_ids = pa.concat_tables(ids) if ids else SAMPLE_ID_SCHEMA.empty_table()
    del states, ids
    return EpochFold(state=new_state, ids=new_ids, names=names, n_events=n_events,
                     mean_loss=loss_sum / n_losses if n_losses else None, skipped=skipped)


def fold_pending(
    hsm_dir: str | Path,
    up_to_epoch: int,
    mining: MiningConfig,
    *,
    engine: str | None = None,
    skip_corrupt: bool = False,
    write: bool = True,
    memory_limit: int | None = None,
    temp_directory: str | Path | None = None,
    refold: bool = False,
) -> Folded:
    """Bring the state up to date with every epoch ``<= up_to_epoch``.

    Reuses the longest prefix of stored states whose events are unchanged, then folds
    each later epoch from its own events only; each fold also appends the epoch's newly
    seen samples to the id table. ``last_events`` are the events of ``up_to_epoch`` when
    this call folded it in memory (the columns planning reads).

    An epoch whose fold would need more than ``memory_limit`` bytes (default
    :data:`DEFAULT_MEMORY_LIMIT`) is folded out of core (:func:`fold_out_of_core`),
    spilling to ``temp_directory``; the result is the same, byte for byte.

    A stored state is reused only with its commit record (``state.sha256.json``) and
    the same event parts (names, sizes, sha256); the reused file's bytes must match
    its record (:func:`verify_state` raises ``ChecksumMismatch`` otherwise). ``refold``
    ignores every stored state and folds from the event log.
    """
    hsm_dir = Path(hsm_dir)
    engine = engine or mining.engine
    fold = ENGINES[engine]
    per_epoch = mining.aggregate in PER_EPOCH_AGGREGATES
    params = (mining.metric, mining.ema_decay, mining.aggregate)
    # The longest prefix of epochs whose state is stored and whose events are unchanged.
    valid = -1
    stored = set(find_states(hsm_dir))
    for epoch in range(0, up_to_epoch + 1):
        if refold or epoch not in stored or not is_committed(hsm_dir, epoch):
            break
        info = read_state_info(hsm_dir, epoch)
        if info.version != STATE_VERSION:
            break  # written before the id table: refold from the event log
        info.check_params(*params, where=str(state_path(hsm_dir, epoch)))
        digest = events_digest(list_event_files(hsm_dir, epoch), _events_root(hsm_dir))
        if info.events_digest != digest:
            break
        valid = epoch
    state, info, names = None, None, []
    if valid >= 0:
        verify_state(hsm_dir, valid)  # a float rewritten in place keeps the size: the bytes decide
        disk, info = read_state(hsm_dir, valid, columns=("dataset", "base_idx", *fold_columns(mining.aggregate)[1:]))
        names = list(info.datasets)
        state = fold_table(disk, names, mining.aggregate)
        del disk  # base_idx, dataset and score are not carried: free them before folding
    result = Folded(state=None, info=None)
    budget = memory_limit if memory_limit is not None else DEFAULT_MEMORY_LIMIT
    for epoch in range(valid + 1, up_to_epoch + 1):
        files = list_event_files(hsm_dir, epoch)
        n_buckets = buckets_for(files, state, budget)
        if n_buckets > 1:
            if state is None and not files:
                continue
            with tempfile.TemporaryDirectory(prefix=f"hsm-fold-e{epoch}-", dir=temp_directory) as spill:
                folder = fold
                if engine == "duckdb":  # DuckDB may spill inside a range too
                    folder = functools.partial(fold, memory_limit=f"{max(budget >> 21, 64)}MB", temp_directory=spill)
                verified, unverified = verified_checksums(hsm_dir, epoch, skip_corrupt=skip_corrupt)
                epoch_fold = fold_out_of_core(
                    [f for f in files if f in verified], epoch, state, names, mining, folder, n_buckets=n_buckets,
                    spill_dir=Path(spill), skip_corrupt=skip_corrupt, per_epoch=per_epoch,
                )
                epoch_fold.skipped += [str(path) for path, _ in unverified]
            result.last_events = None
        else:
            read = read_epoch_events(hsm_dir, epoch, skip_corrupt=skip_corrupt, columns=event_columns(mining.metric),
                                     dictionaries=True)
            # Kept for the epoch telemetry only when it has the columns it needs (else freed now).
            telemetry = epoch == up_to_epoch and {"token_acc", "drawn_as_hard"} <= set(read.table.column_names)
            result.last_events = read.table if telemetry else None
            if state is None and read.table.num_rows == 0:
                continue  # nothing logged yet (mining switched on later): no state to carry
            epoch_fold = _fold_in_memory(read, epoch, state, names, mining, fold, per_epoch=per_epoch)
            del read
        state, ids, names = epoch_fold.state, epoch_fold.ids, epoch_fold.names
        result.skipped_files += epoch_fold.skipped
        stats = dict(info.epoch_stats) if info is not None else {}
        if epoch_fold.n_events:
            stats[epoch] = {"mean_loss": epoch_fold.mean_loss, "n_events": epoch_fold.n_events}
        checksums = part_checksums(files, _events_root(hsm_dir))
        info = StateInfo(
            epoch=epoch, metric=mining.metric, ema_decay=mining.ema_decay, aggregate=mining.aggregate,
            events_digest=events_digest(files, _events_root(hsm_dir), checksums), epoch_stats=stats, datasets=names,
            version=STATE_VERSION, event_sha256=checksums,
        )
        del epoch_fold
        if not write:
            result.new_ids.append(ids)
        else:
            _writing(sample_ids_path(hsm_dir, epoch), write_sample_ids, hsm_dir, epoch, ids)
            if epoch == up_to_epoch:
                # The last state is written while the caller selects and writes the plan (2 cores).
                result.pending = _BACKGROUND.submit(_write_state, hsm_dir, state, names, mining, info)
            else:
                _write_state(hsm_dir, state, names, mining, info)
        result.folded_epochs.append(epoch)
    result.state, result.info, result.reused_epoch = state, info, valid
    return result


_STATE_SLICE_ROWS = 1 << 20  # one row group each


def _write_state(hsm_dir: Path, state: pa.Table, names: list[str], mining: MiningConfig, info: StateInfo) -> None:
    """Write the fold table as the state file, converting it slice by slice (``disk_table``)."""
    slices = (disk_table(state.slice(start, _STATE_SLICE_ROWS), names, mining.aggregate, mining.ema_decay)
              for start in range(0, max(state.num_rows, 1), _STATE_SLICE_ROWS))
    _writing(state_path(hsm_dir, info.epoch), write_state, hsm_dir, slices, info)


def target_rows(state: pa.Table, names: list[str], target: str) -> tuple[np.ndarray, int, int]:
    """The target's slice of the key-sorted state: ``(base_idx, start_row, stop_row)``."""
    if target not in names:
        return np.zeros(0, dtype=np.int64), 0, 0
    code = names.index(target)
    keys = state.column("key").to_numpy()
    start, stop = np.searchsorted(keys, [code << IDX_BITS, (code + 1) << IDX_BITS])
    return keys[start:stop] & IDX_MASK, int(start), int(stop)


def stale_mask(last_epoch: np.ndarray, epoch: int, mining: MiningConfig) -> np.ndarray | None:
    """Samples not seen in the last ``stale_after`` folded epochs (``0..epoch-1``), or None when off."""
    if mining.stale_after is None:
        return None
    return (epoch - 1) - last_epoch >= mining.stale_after


def stale_scores(scores: np.ndarray, last_epoch: np.ndarray, epoch: int, mining: MiningConfig) -> np.ndarray:
    """``stale_policy: decay``: a stale score moves toward the mean target score.

    ``unseen = (epoch - 1) - last_epoch``; for ``unseen >= stale_after``:
    ``score = mu + (score - mu) * ema_decay ** (unseen - stale_after + 1)``, with ``mu`` the
    mean score of all eligible target samples (NaN scores left out).
    """
    stale = stale_mask(last_epoch, epoch, mining)
    if stale is None or mining.stale_policy != "decay" or not stale.any():
        return scores
    mu = float(np.nanmean(scores))
    steps = ((epoch - 1) - last_epoch - mining.stale_after + 1).astype(np.float64)
    return np.where(stale, mu + (scores - mu) * np.power(mining.ema_decay, steps), scores)


def build_plan_table(
    state: pa.Table, names: list[str], target: str, mining: MiningConfig, epoch: int, sample_ids=None,
    suspects: np.ndarray | None = None,
):
    """Plan rows (every observed target sample, by ``base_idx``) and the selection behind them.

    ``sample_ids(base_idx) -> pa.Array`` gives the ids of target samples; it is called only
    to break ties at the selection boundary. ``stale_after`` adjusts the scores
    (:func:`stale_scores`) or excludes stale samples from the hard set (``flag``).
    ``suspects``: ``base_idx`` of label-noise suspects, never hard and weight 1.
    """
    base_idx, start, stop = target_rows(state, names, target)
    rows = state.slice(start, stop - start)
    scores = score_of(rows, mining.aggregate, mining.ema_decay)
    excluded = None
    if mining.stale_after is not None:
        last_epoch = rows.column("last_epoch").to_numpy()
        scores = stale_scores(scores, last_epoch, epoch, mining)
        if mining.stale_policy == "flag":
            excluded = stale_mask(last_epoch, epoch, mining)
    is_suspect = np.isin(base_idx, suspects) if suspects is not None else None
    if is_suspect is not None:
        excluded = is_suspect if excluded is None else (excluded | is_suspect)
    ids_of = (lambda subset: sample_ids(base_idx[subset])) if sample_ids is not None else None
    selection = select_plan(scores, ids_of, mining=mining, epoch=epoch, excluded=excluded)
    if is_suspect is not None:
        selection.weight[is_suspect] = 1.0  # suspects keep the regular weight, never upweighted
    dataset = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(base_idx), dtype=np.int32)), pa.array([target]))
    table = pa.Table.from_arrays(
        [dataset, pa.array(base_idx), pa.array(scores), rows.column("n_obs"),
         pa.array(selection.is_hard), pa.array(selection.weight)],
        names=PLAN_SCHEMA.names,
    )
    return table, selection


def id_lookup(hsm_dir: Path, folded: Folded, target: str):
    """``base_idx -> sample_id`` for ``target``'s samples, loaded from the id table on first use.

    Reads the stored id table of the reused epochs (or, once written, of all folded
    epochs) plus the ids of epochs folded without writing.
    """
    loaded: dict[str, Any] = {}
    on_disk = folded.reused_epoch if folded.new_ids else folded.info.epoch

    def load(subset: np.ndarray | None) -> tuple[np.ndarray, pa.Array]:
        ids = pa.concat_tables([read_sample_ids(hsm_dir, on_disk, dataset=target, base_idx=subset)]
                               + [t.filter(pc.equal(t.column("dataset"), target)).cast(SAMPLE_ID_SCHEMA)
                                  for t in folded.new_ids])
        index = ids.column("base_idx").to_numpy()
        order = np.argsort(index, kind="stable")
        return index[order], ids.column("sample_id").combine_chunks().take(pa.array(order))

    def sample_ids(base_idx: np.ndarray) -> pa.Array:
        if "table" in loaded:
            index, values = loaded["table"]
        elif len(base_idx) <= 1024 and not folded.new_ids:
            index, values = load(np.unique(base_idx))  # a few ties: read only their row groups
        else:
            index, values = loaded["table"] = load(None)
        at = np.minimum(np.searchsorted(index, base_idx), max(len(index) - 1, 0))
        if len(base_idx) and (len(index) == 0 or not np.array_equal(index[at], base_idx)):
            raise SchemaError(f"{hsm_dir / 'sample_ids'}: no sample_id for some '{target}' samples; "
                              f"delete the state and sample_ids directories to refold")
        return values.take(pa.array(at))

    return sample_ids


def hard_set(plan: pa.Table) -> set[int]:
    """``base_idx`` of the hard rows of a plan table."""
    return set(plan.filter(plan.column("is_hard")).column("base_idx").to_pylist())


def plan_differences(manifest: dict[str, Any], mining: MiningConfig, target: str) -> list[str]:
    """What differs between an existing plan's manifest and a plan for ``(mining, target)``.

    One line per differing setting (target, mode, metric, aggregate, selector), then,
    if those agree but the config hash does not, one line saying other mining settings
    differ. An empty list means the new plan is built the same way.
    """
    asked = {
        "target": target,
        "mode": mining.mode,
        "metric": mining.metric,
        "aggregate": mining.aggregate,
        "selector": mining.selector.model_dump(mode="json") if mining.mode == "reweight" else None,
    }
    stored = dict(manifest, target=(manifest.get("target") or {}).get("name"))
    lines = [f"{key}: existing plan {stored.get(key)!r}, asked {value!r}" for key, value in asked.items()
             if key in stored and stored.get(key) != value]
    config_hash = mining_config_hash(mining, target)
    if not lines and manifest.get("config_hash") not in (None, config_hash):
        lines.append(f"other mining settings (config_hash {manifest['config_hash'][:12]} vs {config_hash[:12]})")
    return lines


def empty_epochs(hsm_dir: str | Path, up_to_epoch: int) -> list[int]:
    """Epochs ``<= up_to_epoch`` without any event part, after the first epoch that has one.

    Leading epochs without events are normal (mining switched on later) and not listed.
    """
    logged = [e for e in range(up_to_epoch + 1) if list_event_files(hsm_dir, e)]
    if not logged:
        return []
    return [e for e in range(logged[0], up_to_epoch + 1) if e not in logged]


def _stats(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None}
    mean = float(np.mean(values))  # before the partition below reorders values
    p50, p90 = np.quantile(values, [0.5, 0.9], overwrite_input=True)  # one partition for both, in place
    return {"mean": mean, "p50": float(p50), "p90": float(p90)}


def plan_epoch(
    hsm_dir: str | Path,
    epoch: int,
    mining: MiningConfig,
    target: str,
    *,
    engine: str | None = None,
    num_train_epochs: float | None = None,
    dataset: DatasetInfo | None = None,
    skip_corrupt: bool = False,
    write: bool = True,
    dump_dir: str | Path | None = None,
    force: bool = True,
    allow_empty: bool = True,
    memory_limit: int | None = None,
    temp_directory: str | Path | None = None,
    refold: bool = False,
    lock_timeout: float = 0.0,
) -> PlanResult:
    """Fold the events of epochs ``< epoch`` not yet folded and write the plan for ``epoch``.

    Args:
        hsm_dir: the run's ``hsm`` directory.
        epoch: the epoch the plan is for (built from epochs ``0..epoch-1``).
        mining: the mining config.
        target: the fusion target's dataset name; only its samples are eligible.
        engine: ``polars`` or ``duckdb`` (default: ``mining.engine``).
        num_train_epochs: planned epochs, for ``activate_after_pct``.
        dataset: the target's size and fingerprint, recorded in the manifest.
        skip_corrupt: skip unreadable event parts with a warning instead of failing.
        write: False computes and returns the plan without writing anything.
        dump_dir: where ``hard_samples_epoch_{n}.json`` goes when ``mining.dump``.
        force: False refuses (:class:`PlanConflict`) a target other than ``dataset``'s, and
            overwriting an existing plan for ``epoch`` built with other settings.
        allow_empty: True folds epochs without events with a warning naming them; False
            refuses them (:class:`EmptyEpochs`).
        memory_limit: fold budget in bytes (default :data:`DEFAULT_MEMORY_LIMIT`); a larger
            epoch is folded out of core, spilling to ``temp_directory`` (default: the system's).
        refold: ignore the stored states and fold every epoch from the event log.
        lock_timeout: seconds to wait for another writer of the run (``write`` only).

    Writing holds the run's lock (:func:`hsm.mining.plan.run_lock`) throughout; the plan
    and its manifest are published together, last, after the state and dump were written.

    Raises:
        PlanConflict, EmptyEpochs, OutputError, RunLocked, ChecksumMismatch: see ``force``,
            ``allow_empty``; a file that cannot be written; another writer; a stored state
            whose bytes changed.
    """
    if epoch < 1:
        raise ValueError(f"a plan for epoch {epoch} needs events of earlier epochs; plan epoch 1 or later")
    hsm_dir = Path(hsm_dir)
    lock = run_lock(hsm_dir, timeout=lock_timeout) if write else contextlib.nullcontext()
    with lock:
        return _plan_epoch(hsm_dir, epoch, mining, target, engine=engine, num_train_epochs=num_train_epochs,
                           dataset=dataset, skip_corrupt=skip_corrupt, write=write, dump_dir=dump_dir, force=force,
                           allow_empty=allow_empty, memory_limit=memory_limit, temp_directory=temp_directory,
                           refold=refold)


def _plan_epoch(hsm_dir: Path, epoch: int, mining: MiningConfig, target: str, *, engine: str | None,
                num_train_epochs: float | None, dataset: DatasetInfo | None, skip_corrupt: bool, write: bool,
                dump_dir: str | Path | None, force: bool, allow_empty: bool, memory_limit: int | None,
                temp_directory: str | Path | None, refold: bool) -> PlanResult:
    if not force:
        problems = []
        if dataset is not None and dataset.name != target:
            problems.append(f"target: the run's hsm/dataset.json names '{dataset.name}', the config names '{target}'")
        try:
            existing = read_manifest(hsm_dir, epoch)
        except PlanError:
            existing = None  # a plan without its manifest: nothing to compare, it is replaced whole
        if existing is not None and write:
            problems += plan_differences(existing, mining, target)
        if problems:
            where = plan_dir(hsm_dir, epoch) if existing is not None else hsm_dir / "dataset.json"
            raise PlanConflict(
                f"{where}: refusing to plan epoch {epoch} with a different config:\n  - " + "\n  - ".join(problems)
                + "\nuse the run's own config, or pass --force to overwrite"
            )
    missing = empty_epochs(hsm_dir, epoch - 1)
    if missing:
        message = (f"{hsm_dir / 'events'}: no events in epochs {', '.join(map(str, missing))} "
                   f"(planning epoch {epoch} folds epochs 0..{epoch - 1})")
        if not allow_empty:
            raise EmptyEpochs(f"{message}; plan an epoch right after the last logged one, or pass --allow-empty")
        warnings.warn(f"hsm: {message}; folding them as empty", stacklevel=2)
    engine = engine or mining.engine
    with _plain_pages():
        folded = fold_pending(hsm_dir, epoch - 1, mining, engine=engine, skip_corrupt=skip_corrupt, write=write,
                              memory_limit=memory_limit, temp_directory=temp_directory, refold=refold)
        try:
            return _plan_from(hsm_dir, epoch, mining, target, folded, engine=engine, num_train_epochs=num_train_epochs,
                              dataset=dataset, write=write, dump_dir=dump_dir)
        finally:
            folded.wait()


def _plan_from(hsm_dir: Path, epoch: int, mining: MiningConfig, target: str, folded: Folded, *, engine: str,
               num_train_epochs: float | None, dataset: DatasetInfo | None, write: bool,
               dump_dir: str | Path | None) -> PlanResult:
    state, info = folded.state, folded.info
    if state is None:
        raise ValueError(f"{hsm_dir / 'events'}: no events for epochs < {epoch}; nothing to plan from")
    sample_ids = id_lookup(hsm_dir, folded, target)
    suspects = dm = None
    if mining.exclude_suspects:
        dm = data_map(read_epoch_metrics(hsm_dir, range(epoch), target, mining.metric))
        suspects = dm.base_idx[dm.is_suspect]
    table, selection = build_plan_table(state, info.datasets, target, mining, epoch, sample_ids, suspects)
    epoch_losses = {e: s["mean_loss"] for e, s in info.epoch_stats.items()}
    triggered, reason = should_apply(epoch, mining, epoch_losses, num_train_epochs)
    scores = table.column("score").to_numpy()
    hard_scores = scores[selection.is_hard]
    regular_scores = scores[~selection.is_hard]
    weights = selection.weight
    manifest = {
        "mode": mining.mode,
        "metric": mining.metric,
        "aggregate": mining.aggregate,
        "selector": mining.selector.model_dump(mode="json") if mining.mode == "reweight" else None,
        "config_hash": mining_config_hash(mining, target),
        "target": (dataset.to_dict() if dataset is not None and dataset.name == target
                   else {"name": target, "size": None, "fingerprint": None}),
        "triggered": triggered,
        "trigger_reason": reason,
        "default_weight": selection.default_weight,
        "target_epoch_size": selection.target_epoch_size,
        "hard_weight": mining.hard_weight if mining.mode == "reweight" else None,
        "hard_pool_frac": mining.hard_pool_frac if mining.mode == "dynamic" else None,
        "seed": mining.seed,
        "counts": {
            "eligible": table.num_rows,
            "hard": int(selection.is_hard.sum()),
            "regular_drawn": selection.n_regular,
            "weight_sum": float(weights.sum()),
        },
        "weights": {"min": float(weights.min()) if len(weights) else None, "max": float(weights.max()) if len(weights) else None},
        "scores": {"hard": _stats(hard_scores), "regular": _stats(regular_scores)},
        "suspects": None if suspects is None else {
            "count": len(suspects), "base_idx": suspects.tolist(),
            "sample_ids": [dm.sample_id[k] for k in np.flatnonzero(dm.is_suspect)],
        },
        "state_epoch": info.epoch,
        "engine": engine,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    churn = None
    if read_manifest(hsm_dir, epoch - 1) is not None:
        previous_plan = read_plan_table(hsm_dir, epoch - 1, columns=["base_idx", "is_hard"])[1]
        before, after = hard_set(previous_plan), hard_set(table)
        union = before | after
        churn = {
            "previous_hard": len(before), "kept": len(before & after), "added": len(after - before),
            "removed": len(before - after), "jaccard": (len(before & after) / len(union)) if union else 1.0,
        }
    if write:
        dump = None
        if mining.dump and dump_dir is not None:
            dump = functools.partial(_dump_hard, Path(dump_dir), epoch, table, selection.is_hard, mining.metric, sample_ids)
        manifest = _publish(hsm_dir, epoch, table, manifest, folded, dump, Path(dump_dir or ".") / f"hard_samples_epoch_{epoch}.json")
    return PlanResult(epoch=epoch, manifest=manifest, plan=table, folded_epochs=folded.folded_epochs,
                      skipped_files=folded.skipped_files, churn=churn, written=write, last_events=folded.last_events)


def _publish(hsm_dir: Path, epoch: int, table: pa.Table, manifest: dict[str, Any], folded: Folded, dump,
             dump_path: Path) -> dict[str, Any]:
    """Stage the plan, write the dump, wait for the state, then publish the plan: the last step.

    Any failure before the publish (disk full in the dump or the state) leaves the
    previous plan in place and the staged one removed.
    """
    where = plan_dir(hsm_dir, epoch) / "plan.parquet"
    staging, manifest = _writing(where, stage_plan, hsm_dir, epoch, table, manifest)
    try:
        if dump is not None:
            _writing(dump_path, dump)
        folded.wait()  # the state's background write; its OutputError stops the publish
        _writing(where, publish_plan, staging, hsm_dir, epoch)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _dump_hard(output_dir: Path, epoch: int, table: pa.Table, is_hard: np.ndarray, metric: str, sample_ids) -> None:
    scores = table.column("score").to_numpy()
    hard = np.flatnonzero(is_hard)
    base_idx = table.column("base_idx").to_numpy()
    order = rank_order(scores, lambda subset: sample_ids(base_idx[subset]), hard)
    rows = table.take(pa.array(order)).select(["dataset", "base_idx", "score"])
    rows = rows.append_column("sample_id", sample_ids(base_idx[order])).select(["sample_id", "dataset", "base_idx", "score"])
    write_json_atomic({"epoch": epoch, "metric": metric, "samples": rows.to_pylist()}, output_dir / f"hard_samples_epoch_{epoch}.json")
