"""The Polars engine's epoch fold: Polars sorts the events; the shared kernel folds them.

Polars puts every sample's events in observation order (a sort on ``key``, then on
``key, global_step, rank, position`` for the samples seen more than once); the runs of
equal keys are the samples; their keys are merged with the carried state's (both
sorted, :func:`merge_sorted_keys`), and :func:`finish_fold`, the kernel the numpy engine
uses too, applies every rule of :mod:`hsm.mining.state`.

The sorts run on the calling thread: the planner decodes and writes state files on other
threads meanwhile, and on the two cores it is sized for, Polars' thread pool spent more
CPU time on a 1M-event sort than it saved in wall time (docs/benchmarks.md).

Why the EMA is not ``ewm_mean(alpha=1 - decay, adjust=False)``: Polars updates the average as
``m + (v - m) * (alpha / ((1 - alpha) + alpha))``, the state's rule is
``decay * m + (1 - decay) * v``. Same value in exact arithmetic, not in floating
point: over 20,000 samples of 4 observations seeded with a carried EMA, 4-56% of the
results differ in the last bit depending on ``decay`` (docs/benchmarks.md),
so the two engines would no longer agree bit for bit with each other and the oracle.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from hsm.mining.engines.kernels import ORDER, finish_fold, merge_sorted_keys
from hsm.mining.state import IDX_BITS, IDX_MASK

__all__ = ["fold_epoch"]


def _key_order(events: pa.Table, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Event rows sorted by ``key`` (any order within a key), and the keys in that order.

    Where the keys and the row numbers fit one int64 together, Polars sorts the values
    ``compact key << row bits | row`` (the compact key is the dataset code above the bits the
    largest ``base_idx`` needs, so it orders as ``key`` does): a sort of plain integers, cheaper
    than an argsort of the keys (docs/benchmarks.md). Otherwise it argsorts the keys. Naive
    equivalent: ``order = sorted(range(n), key=lambda i: keys[i]); (order, [keys[i] for i in order])``.
    """
    keys = events.column("key").to_numpy()
    n = len(keys)
    row_bits = max(n - 1, 1).bit_length()
    idx = keys & IDX_MASK
    idx_bits = int(idx.max(initial=0)).bit_length()
    code_bits = (int(keys.max(initial=0)) >> IDX_BITS).bit_length()
    if code_bits + idx_bits + row_bits > 63:
        order = frame.select(pl.arg_sort_by("key", multithreaded=False)).to_series().to_numpy().astype(np.intp)
        return order, keys[order]
    packed = keys >> IDX_BITS
    packed <<= idx_bits
    packed |= idx
    del idx
    packed <<= row_bits
    packed |= np.arange(n, dtype=np.int64)
    packed = pl.Series(packed).sort(multithreaded=False).to_numpy()
    order = packed & ((1 << row_bits) - 1)
    compact = packed >> row_bits
    del packed
    sorted_keys = compact >> idx_bits
    sorted_keys <<= IDX_BITS
    compact &= (1 << idx_bits) - 1
    sorted_keys |= compact
    return order, sorted_keys


def _observation_order(events: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Event rows in observation order: by ``key``, then ``global_step, rank, position``.

    Returns ``(order, group_keys, starts, counts)``: the rows, and for each run of one key
    (one sample) in that order its key, where it starts and how long it is.

    Polars sorts by ``key`` alone (:func:`_key_order`); only the samples observed more than
    once this epoch need the full order, so only their events (5-15% of an epoch) are
    sorted again on all four columns and put back into their key's block.
    """
    frame = pl.from_arrow(events.select(list(ORDER)))
    n = frame.height
    order, keys = _key_order(events, frame)
    is_start = np.empty(n, dtype=bool)
    is_start[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    group_keys = keys[starts]
    del keys
    counts = np.diff(starts, append=n)
    if len(starts) < n:  # some sample was observed more than once: order its events fully
        repeated = np.flatnonzero(np.repeat(counts > 1, counts))
        rows = pl.Series("row", order[repeated])
        order[repeated] = (frame[rows].with_columns(rows).sort(list(ORDER), multithreaded=False)
                           .get_column("row").to_numpy())
    return order, group_keys, starts, counts


def fold_epoch(
    state: pa.Table | None, events: pa.Table, *, epoch: int, ema_decay: float, per_epoch: bool = False
) -> pa.Table:
    """Fold one epoch of (deduplicated) events into ``state``.

    Args:
        state: the previous state, ``FOLD_COLUMNS`` sorted by unique ``key``, or None.
        events: this epoch's events: ``key``, ``x`` (float64 metric value), ``global_step``,
            ``rank``, ``position``.
        epoch: the epoch being folded; written to ``last_epoch``.
        ema_decay: ``decay`` of :mod:`hsm.mining.state`.
        per_epoch: also fold ``n_epochs``, ``epoch_mean`` and ``epoch_ema`` (``state`` has them).

    Returns:
        :func:`output_columns`, sorted by ``key``: every previous and every new sample.
    """
    order, group_keys, group_starts, group_counts = _observation_order(events)
    prev_keys = state.column("key").to_numpy() if state is not None else np.zeros(0, dtype=np.int64)
    keys, prev_at, group_at = merge_sorted_keys(prev_keys, group_keys)
    del group_keys
    k = np.zeros(len(keys), dtype=np.int64)
    k[group_at] = group_counts
    starts = np.zeros(len(keys), dtype=np.int64)
    starts[group_at] = group_starts
    first_row = np.full(len(keys), -1, dtype=np.int64)
    first_row[group_at] = order[group_starts]
    del group_at, group_starts, group_counts
    x = events.column("x").to_numpy()[order]
    del order
    return finish_fold(state, prev_at, keys, k, starts, x, first_row, epoch=epoch, decay=ema_decay, per_epoch=per_epoch)
