"""The default engine's epoch fold: whole-array numpy (Polars only where it pays), built for 10M-event epochs.

Samples are keyed by one int64 (:mod:`hsm.state`), the state is kept sorted by
key, and ``base_idx`` is dense within its dataset, so every event finds its
state row through a direct per-dataset lookup table: no join and no sort. Rows
first seen this epoch get fresh slots the same way. Samples observed once this
epoch (most of them) are updated with whole-array arithmetic; only the events
of samples observed several times are ordered (an integer lexsort of that
subset) and folded sequentially, vectorised over samples.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hsm.state import EPOCH_COLUMNS, FOLD_COLUMNS, IDX_BITS, IDX_MASK

__all__ = ["fold_epoch", "sequential_fold", "assign_slots", "output_columns", "OUTPUT_COLUMNS", "EPOCH_OUTPUT_COLUMNS"]


def output_columns(per_epoch: bool) -> tuple[str, ...]:
    """What a fold returns, with or without the per-epoch aggregates."""
    return EPOCH_OUTPUT_COLUMNS if per_epoch else OUTPUT_COLUMNS

# What a fold returns: the new state, plus this epoch's observation count ``k`` and the
# event row of each sample's first observation this epoch (``first_row``, -1 if none).
OUTPUT_COLUMNS = (*FOLD_COLUMNS, "k", "first_row")
EPOCH_OUTPUT_COLUMNS = (*FOLD_COLUMNS, *EPOCH_COLUMNS, "k", "first_row")


def sequential_fold(
    starts: np.ndarray,
    lengths: np.ndarray,
    x: np.ndarray,
    n_prev: np.ndarray,
    mean_prev: np.ndarray,
    ema_prev: np.ndarray,
    decay: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fold groups of ordered observations ``x[starts[g]:starts[g]+lengths[g]]``.

    Vectorised over groups, sequential within a group; equals, per group::

        ema = x[0] if n == 0 else decay * ema + (1 - decay) * x[0]
        for v in x[1:]: ema = decay * ema + (1 - decay) * v
        s = x[0]; for v in x[1:]: s = s + v
        mean = (mean * n + s) / (n + k)

    Returns ``(n, mean, ema, last, s)``.
    """
    first = x[starts]
    ema = np.where(n_prev == 0, first, decay * ema_prev + (1.0 - decay) * first)
    total = first.copy()
    for j in range(1, int(lengths.max(initial=1))):
        active = np.flatnonzero(lengths > j)
        values = x[starts[active] + j]
        ema[active] = decay * ema[active] + (1.0 - decay) * values
        total[active] = total[active] + values
    n = n_prev + lengths
    mean = (mean_prev * n_prev + total) / n
    last = x[starts + lengths - 1]
    return n, mean, ema, last, total


def assign_slots(prev_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slot of every event key: its row in ``prev_keys`` (sorted, unique), or ``len(prev_keys) + j``
    for the ``j``-th new key in ascending order. Returns ``(slots, new_keys)``.

    Naive equivalent: ``new = sorted(set(keys) - set(prev_keys)); rows = {k: i for i, k in
    enumerate([*prev_keys, *new])}; slots = [rows[k] for k in keys]``. Dense ``base_idx``
    ranges use a direct lookup table per dataset (O(n), no sort); sparse ones fall back to
    binary search and a sort of the new keys.
    """
    n_prev = len(prev_keys)
    slots = np.empty(len(keys), dtype=np.int64)
    new_parts: list[np.ndarray] = []
    n_new = 0
    if len(keys) == 0:
        return slots, np.zeros(0, dtype=np.int64)
    codes = keys >> IDX_BITS
    first_code, last_code = int(codes.min()), int(codes.max())
    for code in range(first_code, last_code + 1):
        select = np.flatnonzero(codes == code) if first_code != last_code else None
        wanted = (keys if select is None else keys[select]) & IDX_MASK
        if len(wanted) == 0:
            continue
        lo, hi = np.searchsorted(prev_keys, [code << IDX_BITS, (code + 1) << IDX_BITS])
        base = prev_keys[lo:hi] & IDX_MASK
        top = int(max(wanted.max(), base[-1] if len(base) else 0))
        if top <= 4 * (len(base) + len(wanted)) + (1 << 20):
            table = np.full(top + 1, -1, dtype=np.int64)
            table[base] = np.arange(lo, hi)
            found = table[wanted]
            missing = found < 0
            if missing.any():
                mark = np.zeros(top + 1, dtype=bool)
                mark[wanted[missing]] = True
                fresh = np.flatnonzero(mark)
                table[fresh] = n_prev + n_new + np.arange(len(fresh))
                found[missing] = table[wanted[missing]]
                new_parts.append((np.int64(code) << IDX_BITS) | fresh)
                n_new += len(fresh)
        else:
            at = np.searchsorted(base, wanted)
            hit = at < len(base)
            hit[hit] = base[at[hit]] == wanted[hit]
            found = np.where(hit, lo + at, -1)
            if not hit.all():
                fresh, inverse = np.unique(wanted[~hit], return_inverse=True)
                found[~hit] = n_prev + n_new + inverse.reshape(-1)
                new_parts.append((np.int64(code) << IDX_BITS) | fresh)
                n_new += len(fresh)
        if select is None:
            slots = found
        else:
            slots[select] = found
    new_keys = np.concatenate(new_parts) if new_parts else np.zeros(0, dtype=np.int64)
    return slots, new_keys


def fold_epoch(
    state: pa.Table | None, events: pa.Table, *, epoch: int, ema_decay: float, per_epoch: bool = False
) -> pa.Table:
    """Fold one epoch of (deduplicated) events into ``state``.

    Args:
        state: the previous state, ``FOLD_COLUMNS`` sorted by unique ``key``, or None.
        events: this epoch's events: ``key``, ``x`` (float64 metric value), ``global_step``,
            ``rank``, ``position``.
        epoch: the epoch being folded; written to ``last_epoch``.
        ema_decay: ``decay`` of :mod:`hsm.state`.
        per_epoch: also fold ``n_epochs``, ``epoch_mean`` and ``epoch_ema`` (``state`` has them).

    Returns:
        :func:`output_columns`, sorted by ``key``: every previous and every new sample.
    """
    d = float(ema_decay)
    prev_keys = state.column("key").to_numpy() if state is not None else np.zeros(0, dtype=np.int64)
    n_prev = len(prev_keys)
    ev_keys = events.column("key").to_numpy()
    x = events.column("x").to_numpy()
    slot, new_keys = assign_slots(prev_keys, ev_keys)
    total = n_prev + len(new_keys)
    keys = prev_keys
    prev_at = None
    if len(new_keys):
        # Work directly in merged key order: previous rows shift by the new keys before them.
        prev_at = np.arange(n_prev) + np.searchsorted(new_keys, prev_keys)
        new_at = np.searchsorted(prev_keys, new_keys) + np.arange(len(new_keys))
        slot = np.concatenate([prev_at, new_at])[slot]
        keys = np.empty(total, dtype=np.int64)
        keys[prev_at] = prev_keys
        keys[new_at] = new_keys

    def carried(name: str, dtype) -> np.ndarray:
        if state is None:  # nothing carried, and no event observed this metric either
            return np.zeros(total, dtype=dtype)
        if prev_at is None:
            return state.column(name).to_numpy().astype(dtype, copy=True)
        out = np.zeros(total, dtype=dtype)
        if n_prev:
            out[prev_at] = state.column(name).to_numpy()
        return out

    n_obs, mean, ema, last = carried("n_obs", np.int64), carried("mean", np.float64), carried("ema", np.float64), carried("last", np.float64)
    last_epoch = carried("last_epoch", np.int32)
    if per_epoch:
        n_epochs, epoch_mean, epoch_ema = carried("n_epochs", np.int32), carried("epoch_mean", np.float64), carried("epoch_ema", np.float64)
    k = np.bincount(slot, minlength=total)
    first_row = np.full(total, -1, dtype=np.int64)

    # Samples observed once: the sequential rule with k = 1, as whole-array passes.
    k_of_event = k[slot]
    once_rows = np.flatnonzero(k_of_event == 1)
    single = k == 1
    x_at = np.zeros(total)
    x_at[slot[once_rows]] = x[once_rows]
    first_row[slot[once_rows]] = once_rows
    np.copyto(ema, np.where(n_obs == 0, x_at, d * ema + (1.0 - d) * x_at), where=single)
    np.copyto(mean, (mean * n_obs + x_at) / (n_obs + 1), where=single)
    np.copyto(last, x_at, where=single)
    n_obs += single
    epoch_sum = x_at if per_epoch else None
    del x_at, single, once_rows

    # Samples observed several times: order their events, fold sequentially.
    multi = np.flatnonzero(k_of_event > 1)
    del k_of_event
    if len(multi):
        columns = [events.column(c).to_numpy()[multi] for c in ("position", "rank", "global_step")]
        order = multi[np.lexsort((*columns, slot[multi]))]
        slot_sorted = slot[order]
        starts = np.flatnonzero(np.r_[True, slot_sorted[1:] != slot_sorted[:-1]])
        lengths = np.diff(np.r_[starts, len(order)])
        group = slot_sorted[starts]
        g_n, g_mean, g_ema, g_last, g_sum = sequential_fold(
            starts, lengths, x[order], n_obs[group], mean[group], ema[group], d
        )
        n_obs[group], mean[group], ema[group], last[group] = g_n, g_mean, g_ema, g_last
        first_row[group] = order[starts]
        if per_epoch:
            epoch_sum[group] = g_sum
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
