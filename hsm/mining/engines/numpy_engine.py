"""The ``numpy`` engine: the epoch fold as whole-array numpy, without a sort of the events.

Not Polars and not SQL, named for what it is; docs/benchmarks.md compares it with the
others. All three engines agree bit for bit (tests/mining/test_planner.py).

Samples are keyed by one int64 (:mod:`hsm.mining.state`), the state is kept sorted by
key, and ``base_idx`` is dense within its dataset, so every event finds its state row
through a direct per-dataset lookup table: no join and no sort. Rows first seen this
epoch get fresh slots the same way. Only the events of samples observed several times
are ordered (an integer lexsort of that subset); the shared kernel
(:func:`hsm.mining.engines.kernels.finish_fold`) folds them, as it does for the Polars engine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hsm.mining.engines.kernels import finish_fold
from hsm.mining.state import IDX_BITS, IDX_MASK

__all__ = ["fold_epoch", "merge_slots"]


def _sorted_codes(sorted_keys: np.ndarray) -> np.ndarray:
    """The distinct dataset codes of sorted keys, one binary search per code."""
    codes = []
    at = 0
    while at < len(sorted_keys):
        code = int(sorted_keys[at] >> IDX_BITS)
        codes.append(code)
        at = int(np.searchsorted(sorted_keys, (code + 1) << IDX_BITS))
    return np.array(codes, dtype=np.int64)


def merge_slots(prev_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Merge a sorted, unique ``prev_keys`` with the event ``keys`` into one key space.

    Returns ``(merged, prev_at, slots)``: the sorted union of both, the row of every
    previous key in it (None when no key is new, so rows do not move) and the row of
    every event key. Naive equivalent: ``merged = sorted(set(prev_keys) | set(keys));
    row = {k: i for i, k in enumerate(merged)}; slots = [row[k] for k in keys]``.

    When the ``base_idx`` of each dataset are dense (the usual case: indices into a
    dataset), the union is a mark per possible index and a running count of the marks,
    so every event finds its row with one gather: no sort, no binary search. Sparse
    indices fall back to a sort of the distinct keys.
    """
    n_prev = len(prev_keys)
    if len(keys) == 0:
        return prev_keys, None, np.zeros(0, dtype=np.intp)
    ev_codes = keys >> IDX_BITS
    codes = np.union1d(np.flatnonzero(np.bincount(ev_codes)), _sorted_codes(prev_keys))  # codes are small
    prev_bounds = np.searchsorted(prev_keys, np.r_[codes, codes[-1] + 1] << IDX_BITS)
    lows, widths = [], []
    for i, code in enumerate(codes.tolist()):
        low, top = (IDX_MASK, -1) if prev_bounds[i + 1] == prev_bounds[i] else \
            (int(prev_keys[prev_bounds[i]] & IDX_MASK), int(prev_keys[prev_bounds[i + 1] - 1] & IDX_MASK))
        if len(codes) == 1:
            low, top = min(low, int(keys.min() & IDX_MASK)), max(top, int(keys.max() & IDX_MASK))
        else:
            of_code = ev_codes == code
            if of_code.any():
                low = min(low, int(np.min(keys, where=of_code, initial=IDX_MASK | (code << IDX_BITS)) & IDX_MASK))
                top = max(top, int(np.max(keys, where=of_code, initial=code << IDX_BITS) & IDX_MASK))
        lows.append(low)
        widths.append(top - low + 1)
    space = int(sum(widths))
    if space > 4 * (n_prev + len(keys)) + (1 << 20):
        merged = np.union1d(prev_keys, keys)
        prev_at = None if len(merged) == n_prev else np.searchsorted(merged, prev_keys)
        return merged, prev_at, np.searchsorted(merged, keys)
    # Dense: a key's position in the space is its dataset's offset plus its base_idx above the lowest.
    offsets = np.cumsum([0, *widths[:-1]])
    shift = np.zeros(int(codes[-1]) + 1, dtype=np.int64)
    shift[codes] = offsets - np.asarray(lows, dtype=np.int64) - (codes << IDX_BITS)
    position = keys + shift[ev_codes]
    del ev_codes
    prev_position = prev_keys.copy()
    for i, code in enumerate(codes.tolist()):
        prev_position[prev_bounds[i]:prev_bounds[i + 1]] += shift[code]
    mark = np.zeros(space, dtype=bool)
    mark[prev_position] = True
    mark[position] = True
    row = np.cumsum(mark, dtype=np.intp)
    row -= 1
    slots = row[position]
    del position
    total = int(row[-1]) + 1
    if total == n_prev:
        return prev_keys, None, slots
    prev_at = row[prev_position]
    del row
    at = np.flatnonzero(mark)
    del mark
    # Back from positions to keys: each position's dataset is the last offset at or below it.
    which = np.searchsorted(offsets, at, side="right") - 1
    merged = at - shift[codes[which]]
    return merged, prev_at, slots


def _repeat_order(events: pa.Table, slot: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The event rows of the samples observed ``k > 1`` times this epoch, in observation order
    (by slot, then ``global_step, rank, position``): an integer lexsort of that subset only."""
    multi = np.flatnonzero((k > 1)[slot])
    if not len(multi):
        return multi
    columns = [events.column(c).to_numpy()[multi] for c in ("position", "rank", "global_step")]
    return multi[np.lexsort((*columns, slot[multi]))]


def fold_epoch(
    state: pa.Table | None, events: pa.Table, *, epoch: int, ema_decay: float, per_epoch: bool = False
) -> pa.Table:
    """Fold one epoch of (deduplicated) events into ``state``: the engine contract of
    :mod:`hsm.mining.engines` (arguments and result as in the polars engine's ``fold_epoch``).

    Every event finds its row by :func:`merge_slots`. A sample observed once this epoch
    (most of them) has its one observation where it is, at its event's row of ``x``; the
    events of samples observed several times are put in observation order and appended
    after them. :func:`hsm.mining.engines.kernels.finish_fold` then applies the rules.
    """
    prev_keys = state.column("key").to_numpy() if state is not None else np.zeros(0, dtype=np.int64)
    x = events.column("x").to_numpy()
    keys, prev_at, slot = merge_slots(prev_keys, events.column("key").to_numpy())
    k = np.bincount(slot, minlength=len(keys))
    # A sum over one event is that event exactly, so one weighted count gives the row of
    # every sample observed once (and a sum, overwritten below, for the others).
    first_row = np.bincount(slot, weights=np.arange(len(slot), dtype=np.float64), minlength=len(keys)).astype(np.int64)
    first_row[k == 0] = -1
    starts = first_row.copy()
    order = _repeat_order(events, slot, k)
    if len(order):
        grouped = slot[order]
        group_starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        group = grouped[group_starts]
        starts[group] = len(x) + group_starts
        first_row[group] = order[group_starts]
        x = np.concatenate([x, x[order]])
    del slot, order
    return finish_fold(state, prev_at, keys, k, starts, x, first_row, epoch=epoch, decay=ema_decay, per_epoch=per_epoch)
