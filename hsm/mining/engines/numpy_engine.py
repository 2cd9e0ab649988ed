"""The ``numpy`` engine: the epoch fold as whole-array numpy, the fastest correct path measured.

Not Polars and not SQL: the issue-15 benchmark (docs/benchmarks.md) measured this fold
1.6x faster than the ``polars`` engine at 1M events on one loaded core, so it stays,
named for what it is. All three engines agree bit for bit (tests/mining/test_planner.py).

Samples are keyed by one int64 (:mod:`hsm.mining.state`), the state is kept sorted by
key, and ``base_idx`` is dense within its dataset, so every event finds its state row
through a direct per-dataset lookup table: no join and no sort. Rows first seen this
epoch get fresh slots the same way. Samples observed once this epoch (most of them) are
updated with whole-array arithmetic; only the events of samples observed several times
are ordered (an integer lexsort of that subset) and folded sequentially, vectorised
over samples (:func:`hsm.mining.engines.kernels.continue_sequential`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hsm.mining.engines.kernels import continue_sequential, output_columns
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


def _fold_repeats(events: pa.Table, slot: np.ndarray, k: np.ndarray, x: np.ndarray, d: float, *, n_obs: np.ndarray,
                  mean: np.ndarray, ema: np.ndarray, last: np.ndarray, first_row: np.ndarray,
                  epoch_sum: np.ndarray | None) -> None:
    """Fold the samples observed ``k > 1`` times this epoch, in place: their events put in
    observation order (an integer lexsort of that subset only), then the state's rules."""
    multi = np.flatnonzero((k > 1)[slot])
    if not len(multi):
        return
    columns = [events.column(c).to_numpy()[multi] for c in ("position", "rank", "global_step")]
    order = multi[np.lexsort((*columns, slot[multi]))]
    slot_sorted = slot[order]
    starts = np.flatnonzero(np.r_[True, slot_sorted[1:] != slot_sorted[:-1]])
    lengths = np.diff(np.r_[starts, len(order)])
    group = slot_sorted[starts]
    g_n = n_obs[group]
    g_ema = np.where(g_n == 0, x[order[starts]], d * ema[group] + (1.0 - d) * x[order[starts]])
    g_sum = x[order[starts]].copy()
    continue_sequential(starts, lengths, x[order], g_ema, g_sum, d)
    n_obs[group] = g_n + lengths
    mean[group] = (mean[group] * g_n + g_sum) / (g_n + lengths)
    ema[group] = g_ema
    last[group] = x[order[starts + lengths - 1]]
    first_row[group] = order[starts]
    if epoch_sum is not None:
        epoch_sum[group] = g_sum


def fold_epoch(
    state: pa.Table | None, events: pa.Table, *, epoch: int, ema_decay: float, per_epoch: bool = False
) -> pa.Table:
    """Fold one epoch of (deduplicated) events into ``state``: the engine contract of
    :mod:`hsm.mining.engines` (arguments and result as in the polars engine's ``fold_epoch``),
    computed with :func:`merge_slots`, whole-array passes and the in-order kernel.
    """
    d = float(ema_decay)
    prev_keys = state.column("key").to_numpy() if state is not None else np.zeros(0, dtype=np.int64)
    ev_keys = events.column("key").to_numpy()
    x = events.column("x").to_numpy()
    keys, prev_at, slot = merge_slots(prev_keys, ev_keys)
    total = len(keys)

    def carried(name: str, dtype, prev_at=prev_at) -> np.ndarray:
        if state is None:  # nothing carried, and no event observed this metric either
            return np.zeros(total, dtype=dtype)
        column = state.column(name).to_numpy()
        if prev_at is None:
            return column.astype(dtype, copy=True)
        out = np.zeros(total, dtype=dtype)
        out[prev_at] = column
        return out

    n_obs, mean, ema, last = (carried("n_obs", np.int64), carried("mean", np.float64), carried("ema", np.float64),
                              carried("last", np.float64))
    last_epoch = carried("last_epoch", np.int32)
    if per_epoch:
        n_epochs, epoch_mean, epoch_ema = (carried("n_epochs", np.int32), carried("epoch_mean", np.float64),
                                           carried("epoch_ema", np.float64))
    del prev_at, carried  # the row map is as large as the state
    k = np.bincount(slot, minlength=total)

    # Samples observed once: the sequential rule with k = 1, as whole-array passes. A sum
    # over one event is that event exactly (0.0 + x), so one weighted count gathers x and
    # the event's row for every such sample.
    single = k == 1
    x_at = np.bincount(slot, weights=x, minlength=total)
    first_row = np.bincount(slot, weights=np.arange(len(slot), dtype=np.float64), minlength=total).astype(np.int64)
    first_row[k == 0] = -1
    update = ema * d
    update += x_at * (1.0 - d)
    np.copyto(update, x_at, where=n_obs == 0)
    np.copyto(ema, update, where=single)
    np.multiply(mean, n_obs, out=update)
    update += x_at
    update /= n_obs + 1
    np.copyto(mean, update, where=single)
    del update
    np.copyto(last, x_at, where=single)
    n_obs += single
    epoch_sum = x_at if per_epoch else None
    del x_at, single

    # Samples observed several times: order their events, fold sequentially.
    _fold_repeats(events, slot, k, x, d, n_obs=n_obs, mean=mean, ema=ema, last=last, first_row=first_row,
                  epoch_sum=epoch_sum)
    seen = k > 0
    last_epoch[seen] = epoch
    out = {"key": keys, "n_obs": n_obs, "mean": mean, "ema": ema, "last": last, "last_epoch": last_epoch,
           "k": k.astype(np.int64), "first_row": first_row}
    if per_epoch:
        np.copyto(epoch_mean, epoch_sum / np.maximum(k, 1), where=seen)
        np.copyto(epoch_ema, d * epoch_ema + (1.0 - d) * epoch_mean, where=seen)
        n_epochs += seen
        out.update(n_epochs=n_epochs, epoch_mean=epoch_mean, epoch_ema=epoch_ema)
    return pa.table({name: out[name] for name in output_columns(per_epoch)})
