"""The per-rank writer of the event log (background-flushed Parquet parts, each recorded in the ledger)."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from hsm.io import file_sha256, write_parquet_atomic
from hsm.metrics import NULLABLE_EVENT_COLUMNS
from hsm.mining.events import (
    PART_RE,
    PART_WRITE_OPTIONS,
    event_dir,
    list_event_files,
    remove_stale_event_temps,
)
from hsm.mining.ledger import record_digests, record_unrecorded_parts
from hsm.schemas import EVENT_SCHEMA

__all__ = ["EventBatch", "EventWriter"]

_METRIC_COLUMNS = frozenset(NULLABLE_EVENT_COLUMNS)


@dataclass(frozen=True)
class EventBatch:
    """One micro-batch's events: one entry per sample in each column, in batch order.

    Array fields may be numpy arrays or lists; strings stay as given until the writer's
    background thread encodes them. Row ``i``'s ``position`` is ``position_offset + i``.

    Attributes:
        epoch: the epoch the rows belong to (their partition).
        global_step: the Trainer's ``state.global_step``.
        dataset, base_idx, sample_id, loss, token_acc, n_tokens, aug_seed, drawn_as_hard: the event columns.
        position_offset: the first row's position (micro-batches of one step continue the count).
        metrics: the nullable event columns of :data:`hsm.metrics.METRICS` (``coord_loss``, ``label_loss``,
            ``loss_sum``, ``det_f1``, ...), written as null where absent, None or NaN.

    Raises:
        TypeError: ``metrics`` names a column the event schema does not have.
    """

    epoch: int
    global_step: int
    dataset: Sequence[str]
    base_idx: Any
    sample_id: Sequence[str]
    loss: Any
    token_acc: Any
    n_tokens: Any
    aug_seed: Any
    drawn_as_hard: Any
    position_offset: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(self.metrics.keys() - _METRIC_COLUMNS)
        if unknown:
            raise TypeError(f"EventBatch.metrics: no event column {unknown} (nullable metric columns: "
                            f"{', '.join(NULLABLE_EVENT_COLUMNS)})")


class EventWriter:
    """Per-rank, background-flushed writer of the event log.

    ``append`` runs on the training thread and only keeps a reference to the
    step's :class:`EventBatch`; every ``flush_rows`` rows the buffer is handed to one
    background thread that builds the Arrow table and writes a part. Errors of
    the background thread are raised by the next ``append``, ``flush`` or
    ``close``.
    """

    def __init__(
        self,
        hsm_dir: str | Path,
        *,
        run_id: str,
        rank: int,
        attempt: int = 0,
        flush_rows: int = 65536,
        compression_level: int = 3,
    ):
        self.hsm_dir = Path(hsm_dir)
        self.run_id = run_id
        self.rank = rank
        self.attempt = attempt
        self.flush_rows = flush_rows
        self.compression_level = compression_level
        self._buffers: dict[int, list[EventBatch]] = {}
        self._buffered_rows: dict[int, int] = {}
        self._next_part: dict[int, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hsm-events-r{rank}")
        self._pending: list[Future] = []
        self.rows_written = 0
        self.parts_written = 0
        remove_stale_event_temps(self.hsm_dir, rank)
        record_unrecorded_parts(self.hsm_dir, rank)

    def append(self, batch: EventBatch) -> None:
        """Buffer one micro-batch's events (written with the epoch's next part)."""
        self._raise_background_error()
        n = len(batch.sample_id)
        if n == 0:
            return
        self._buffers.setdefault(batch.epoch, []).append(batch)
        rows = self._buffered_rows.get(batch.epoch, 0) + n
        self._buffered_rows[batch.epoch] = rows
        if rows >= self.flush_rows:
            self._submit(batch.epoch)

    def _submit(self, epoch: int) -> None:
        batches = self._buffers.pop(epoch, [])
        self._buffered_rows.pop(epoch, None)
        if not batches:
            return
        part = self._claim_part(epoch)
        self._pending.append(self._pool.submit(self._write_part, epoch, part, batches))

    def _claim_part(self, epoch: int) -> int:
        if epoch not in self._next_part:
            existing = list_event_files(self.hsm_dir, epoch, rank=self.rank)
            numbers = [int(PART_RE.match(p.name).group(1)) for p in existing]
            self._next_part[epoch] = max(numbers, default=-1) + 1
        part = self._next_part[epoch]
        self._next_part[epoch] = part + 1
        return part

    def _write_part(self, epoch: int, part: int, batches: list[EventBatch]) -> None:
        table = self._to_table(epoch, batches)
        path = event_dir(self.hsm_dir, epoch, self.rank) / f"part-{part:05d}.parquet"
        write_parquet_atomic(table, path, compression_level=self.compression_level, **PART_WRITE_OPTIONS)
        record_digests(path.parent, {path.name: file_sha256(path)})  # the part is committed first: see LEDGER
        self.rows_written += table.num_rows
        self.parts_written += 1

    def _to_table(self, epoch: int, batches: list[EventBatch]) -> pa.Table:
        sizes = [len(b.sample_id) for b in batches]
        n_total = sum(sizes)
        steps = np.concatenate([np.full(n, b.global_step, dtype=np.int64) for n, b in zip(sizes, batches)])
        positions = np.concatenate([np.arange(n, dtype=np.int32) + b.position_offset for n, b in zip(sizes, batches)])

        def column(name: str, dtype: Any) -> np.ndarray:
            return np.concatenate([np.asarray(getattr(b, name), dtype=dtype).reshape(-1) for b in batches])

        def strings(name: str) -> pa.Array:
            values: list[str] = []
            for b in batches:
                values.extend(getattr(b, name))
            return pa.array(values, type=pa.string())

        arrays = {
            "run_id": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n_total, dtype=np.int32)), pa.array([self.run_id])
            ).cast(pa.string()),
            "attempt": pa.array(np.full(n_total, self.attempt, dtype=np.int32)),
            "epoch": pa.array(np.full(n_total, epoch, dtype=np.int32)),
            "global_step": pa.array(steps),
            "rank": pa.array(np.full(n_total, self.rank, dtype=np.int32)),
            "position": pa.array(positions),
            "dataset": strings("dataset"),
            "base_idx": pa.array(column("base_idx", np.int64)),
            "sample_id": strings("sample_id"),
            "loss": pa.array(column("loss", np.float32)),
            "token_acc": pa.array(column("token_acc", np.float32)),
            "n_tokens": pa.array(column("n_tokens", np.int32)),
            "aug_seed": pa.array(column("aug_seed", np.int64)),
            "drawn_as_hard": pa.array(column("drawn_as_hard", np.bool_)),
        }
        for name in NULLABLE_EVENT_COLUMNS:
            values = np.concatenate([np.full(n, np.nan, np.float32) if b.metrics.get(name) is None
                                     else np.asarray(b.metrics[name], dtype=np.float32).reshape(-1)
                                     for n, b in zip(sizes, batches)])
            arrays[name] = pa.array(values, type=pa.float32(), from_pandas=True)  # NaN -> null
        return pa.Table.from_arrays([arrays[f.name] for f in EVENT_SCHEMA], schema=EVENT_SCHEMA)

    def flush(self) -> None:
        """Write every buffered row and wait for all parts; raises a background error."""
        for epoch in list(self._buffers):
            self._submit(epoch)
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Flush and stop the background thread."""
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def _raise_background_error(self) -> None:
        if not any(f.done() for f in self._pending):
            return
        still = []
        for future in self._pending:
            if future.done():
                future.result()
            else:
                still.append(future)
        self._pending = still

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
