"""One epoch's fold: its events, keyed by sample, folded into the state by an engine.

In memory (:func:`fold_in_memory`) or, when the epoch would need more than the fold
budget, out of core in key ranges spilled to Arrow IPC (:func:`fold_out_of_core`);
both give the same state, byte for byte.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hsm.config import MiningConfig
from hsm.metrics import difficulty, metric as metric_info
from hsm.mining.event_reader import drop_duplicate_events, supersede_attempts
from hsm.mining.events import CorruptEventFile
from hsm.mining.state import IDX_BITS, IDX_MASK, dataset_codes, encode_keys, fold_columns
from hsm.schemas import EVENT_SCHEMA, SAMPLE_ID_SCHEMA, SchemaError, check_schema, conform

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "EpochFold",
    "buckets_for",
    "event_columns",
    "finite_mean_loss",
    "fold_in_memory",
    "fold_out_of_core",
    "keyed",
    "metric_column",
    "metric_values",
    "new_ids",
    "observations",
    "range_bounds",
]


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


def observations(events: pa.Table, metric: str) -> tuple[pa.Table, int]:
    """The events that observe ``metric``, and how many carry a non-finite value of it.

    An event whose value is null (no such tokens, or a metric another step measures) or
    non-finite (NaN, +-inf: a diverged step) is not an observation: it changes no
    sample's state. Null values are expected and not counted; non-finite ones are
    counted (``n_nonfinite`` in the epoch's statistics, the manifest and the telemetry).
    Naive equivalent: ``[e for e in events if e[metric] is not None and math.isfinite(e[metric])]``.
    """
    column = events.column(metric_column(metric))
    finite = np.isfinite(column.to_numpy(zero_copy_only=False))  # a null reads as NaN here
    n_nonfinite = int(len(finite) - finite.sum()) - column.null_count
    if n_nonfinite == 0 and column.null_count == 0:
        return events, 0
    return events.filter(pa.array(finite)), n_nonfinite


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
    n_nonfinite: int = 0  # events whose metric value was NaN or infinite (not observations)


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


def new_ids(out: pa.Table, names: list[str], sample_id: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Id rows of the samples a fold saw for the first time (``k == n_obs``), from their first event."""
    k, n_obs = out.column("k").to_numpy(), out.column("n_obs").to_numpy()
    new = np.flatnonzero((k > 0) & (k == n_obs))
    keys = out.column("key").to_numpy()[new]
    return pa.table({
        "dataset": pa.DictionaryArray.from_arrays(pa.array((keys >> IDX_BITS).astype(np.int32)), pa.array(names, pa.string())),
        "base_idx": pa.array(keys & IDX_MASK),
        "sample_id": sample_id.take(pa.array(out.column("first_row").to_numpy()[new])),
    })


def keyed(events: pa.Table, codes: np.ndarray, metric: str) -> pa.Table:
    """The engine's input: ``key`` (dataset code and ``base_idx``), the difficulty ``x`` and the event's place."""
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


def fold_in_memory(read, epoch: int, state, names: list[str], mining: MiningConfig, fold, *,
                    per_epoch: bool) -> EpochFold:
    """Fold one epoch read whole (:func:`hsm.mining.events.read_epoch_events`) into ``state`` with the engine ``fold``."""
    events = read.table
    observed, n_nonfinite = observations(events, mining.metric)
    codes, names = dataset_codes(observed.column("dataset"), names)
    out = fold(state, keyed(observed, codes, mining.metric), epoch=epoch, ema_decay=mining.ema_decay, per_epoch=per_epoch)
    mean_loss = finite_mean_loss(events)
    return EpochFold(state=out.select(list(fold_columns(mining.aggregate))), ids=new_ids(out, names, observed.column("sample_id")),
                     names=names, n_events=events.num_rows, mean_loss=mean_loss,
                     skipped=[str(path) for path, _ in read.skipped], n_nonfinite=n_nonfinite)


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
    scan = _scan_parts(files, epoch, skip_corrupt)
    names = list(names) + sorted(scan.names - set(names))
    best = _kept_attempts(scan.parts, scan.spans)
    bounds = _key_bounds(scan.sample, state, names, n_buckets)
    del scan.sample, scan.spans
    paths = [spill_dir / f"bucket-{b:04d}.arrow" for b in range(len(bounds) + 1)]
    spilled = _spill(scan.parts, mining, names, bounds, best, paths)
    new_state, first_seen = _fold_ranges(paths, spilled.written, state, bounds, names, mining, fold, epoch=epoch,
                                         per_epoch=per_epoch)
    return EpochFold(state=new_state, ids=first_seen, names=names, n_events=spilled.n_events,
                     mean_loss=spilled.loss_sum / spilled.n_losses if spilled.n_losses else None, skipped=scan.skipped,
                     n_nonfinite=spilled.n_nonfinite)


@dataclass
class _Scan:
    parts: list[tuple[Path, pq.ParquetFile]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    spans: list[tuple[dict, int]] = field(default_factory=list)  # (column spans, index in parts) of non-empty parts
    sample: list[pa.Table] = field(default_factory=list)  # a strided sample of each part's (dataset, base_idx)
    names: set[str] = field(default_factory=set)  # the dataset names the parts hold


def _scan_parts(files: list[Path], epoch: int, skip_corrupt: bool) -> _Scan:
    """Pass 0: each part's footer, spans of attempt/rank/step/epoch, dataset names and a key sample."""
    scan = _Scan()
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
            scan.skipped.append(str(path))
            continue
        if head.num_rows and bounds_of is None:
            bounds_of = {c: pc.min_max(head.column(c)).as_py() for c in ("attempt", "rank", "global_step", "epoch")}
        if head.num_rows and bounds_of["epoch"] != {"min": epoch, "max": epoch}:
            raise CorruptEventFile(f"{path}: holds events of another epoch than its partition epoch={epoch}")
        scan.names |= {v for c in head.column("dataset").chunks for v in c.dictionary.to_pylist()}
        if head.num_rows:
            scan.spans.append((bounds_of, len(scan.parts)))
        scan.sample.append(head.select(["dataset", "base_idx"]).take(pa.array(np.arange(0, head.num_rows, 101))))
        scan.parts.append((path, part))
        del head
    return scan


def _kept_attempts(parts: list[tuple[Path, pq.ParquetFile]], spans: list[tuple[dict, int]]):
    """The event log's rules across parts: duplicate parts are an error (``drop_duplicate_events``),
    and with several attempts the ``(global_step, rank, attempt)`` keys that count (a Polars frame),
    else None (every event counts)."""
    import polars as pl

    identity = ["attempt", "global_step", "rank", "position"]

    def group(span: dict) -> tuple | None:
        single = span["attempt"]["min"] == span["attempt"]["max"] and span["rank"]["min"] == span["rank"]["max"]
        return (span["attempt"]["min"], span["rank"]["min"]) if single else None

    # Parts that could repeat each other's events (same attempt and rank, overlapping steps): compare rows.
    for i, (a, a_index) in enumerate(spans):
        for b, b_index in spans[:i]:
            overlap = a["global_step"]["min"] <= b["global_step"]["max"] and b["global_step"]["min"] <= a["global_step"]["max"]
            if overlap and (group(a) is None or group(b) is None or group(a) == group(b)):
                pair = [parts[b_index], parts[a_index]]
                drop_duplicate_events([part.read(columns=identity) for _, part in pair], [p for p, _ in pair], skip=False)
    if len({(s["attempt"]["min"], s["attempt"]["max"]) for s, _ in spans}) <= 1 and all(
            s["attempt"]["min"] == s["attempt"]["max"] for s, _ in spans):
        return None
    # Several attempts (a resumed run): per (global_step, rank), only the highest attempt counts.
    rows = pa.concat_tables([part.read(columns=["attempt", "global_step", "rank"]) for _, part in parts])
    kept = supersede_attempts(rows.append_column("epoch", pa.array(np.zeros(rows.num_rows, np.int32))))
    return pl.from_arrow(kept.select(_ATTEMPT_KEY)).unique()


def _key_bounds(sample: list[pa.Table], state: pa.Table | None, names: list[str], n_buckets: int) -> np.ndarray:
    """Bucket bounds: key quantiles of the state and of a strided sample of the events."""
    sampled = pa.concat_tables(sample) if sample else None
    keys = []
    if sampled is not None and sampled.num_rows:
        codes, _ = dataset_codes(sampled.column("dataset"), names)
        keys.append(encode_keys(codes, sampled.column("base_idx").to_numpy()))
    if state is not None and state.num_rows:
        keys.append(state.column("key").to_numpy()[:: max(1, state.num_rows // 100_000)])
    return range_bounds(keys, n_buckets)


@dataclass
class _Spilled:
    written: set[int]  # buckets with a spill file
    n_events: int
    n_losses: int
    loss_sum: float
    n_nonfinite: int


_SPILL_SCHEMA = pa.schema([("key", pa.int64()), ("x", pa.float64()), ("global_step", pa.int64()), ("rank", pa.int32()),
                           ("position", pa.int32()), ("sample_id", pa.string())])


def _spill(parts: list[tuple[Path, pq.ParquetFile]], mining: MiningConfig, names: list[str], bounds: np.ndarray,
           best, paths: list[Path]) -> _Spilled:
    """Pass 1: stream the parts, keep the events that count, append each to its key range's IPC file."""
    import polars as pl

    columns = event_columns(mining.metric)
    n_events, n_losses, loss_sum, n_nonfinite = 0, 0, 0.0, 0
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
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
                events, nonfinite = observations(events, mining.metric)
                n_nonfinite += nonfinite
                codes, _ = dataset_codes(events.column("dataset"), names)
                rows = keyed(events, codes, mining.metric).append_column("sample_id", events.column("sample_id"))
                bucket = np.searchsorted(bounds, rows.column("key").to_numpy(), side="right").astype(np.uint16)
                order = np.argsort(bucket, kind="stable")  # a radix sort for 16-bit keys
                edges = np.searchsorted(bucket[order], np.arange(len(paths) + 1))
                ordered = rows.take(pa.array(order))
                for b in range(len(paths)):
                    if edges[b + 1] > edges[b]:
                        if b not in writers:
                            writers[b] = pa.ipc.new_file(paths[b], _SPILL_SCHEMA)
                        writers[b].write_table(ordered.slice(edges[b], edges[b + 1] - edges[b]).cast(_SPILL_SCHEMA))
                del events, rows, ordered
    finally:
        for writer in writers.values():
            writer.close()
    return _Spilled(written=set(writers), n_events=n_events, n_losses=n_losses, loss_sum=loss_sum,
                    n_nonfinite=n_nonfinite)


def _fold_ranges(paths: list[Path], written: set[int], state: pa.Table | None, bounds: np.ndarray, names: list[str],
                 mining: MiningConfig, fold, *, epoch: int, per_epoch: bool) -> tuple[pa.Table, pa.Table]:
    """Pass 2: fold each key range's spill file against the matching slice of the key-sorted state."""
    states, ids = [], []
    state_keys = state.column("key").to_numpy() if state is not None else np.zeros(0, dtype=np.int64)
    cut = np.searchsorted(state_keys, bounds)
    starts, stops = np.r_[0, cut], np.r_[cut, len(state_keys)]
    for b, path in enumerate(paths):
        piece = state.slice(int(starts[b]), int(stops[b] - starts[b])) if state is not None else None
        if b not in written:
            if piece is not None and piece.num_rows:
                states.append(piece.select(list(fold_columns(mining.aggregate))))
            continue
        with pa.memory_map(str(path)) as source:
            events = pa.ipc.open_file(source).read_all()
        out = fold(piece if piece is not None and piece.num_rows else None, events.drop_columns(["sample_id"]),
                   epoch=epoch, ema_decay=mining.ema_decay, per_epoch=per_epoch)
        states.append(out.select(list(fold_columns(mining.aggregate))))
        ids.append(new_ids(out, names, events.column("sample_id")))
        del events, out
        path.unlink()
    new_state = pa.concat_tables(states)  # one chunk per range: no second copy of the state
    return new_state, (pa.concat_tables(ids) if ids else SAMPLE_ID_SCHEMA.empty_table())
