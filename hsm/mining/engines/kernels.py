"""What the Polars and numpy engines share: the fold's output columns, the merge of sorted
key sets, and the one finishing kernel (:func:`finish_fold`) that applies the state's rules.

An engine's own work is to put each sample's observations of the epoch in observation
order and to find each sample's row in the merged key set (Polars by a sort and a
group-by, numpy by a dense lookup); :func:`finish_fold` then computes every rule of
:mod:`hsm.mining.state` once, for both. The DuckDB engine stays SQL, and
``tests/oracle.py`` stays an independent recomputation.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hsm.mining.state import EPOCH_COLUMNS, FOLD_COLUMNS

__all__ = [
    "continue_sequential",
    "finish_fold",
    "merge_sorted_keys",
    "output_columns",
    "OUTPUT_COLUMNS",
    "EPOCH_OUTPUT_COLUMNS",
    "ORDER",
]

ORDER = ("key", "global_step", "rank", "position")
"""Observation order of an epoch's events: by sample, then by when and where it was seen."""

# What a fold returns: the new state, plus this epoch's observation count ``k`` and the
# event row of each sample's first observation this epoch (``first_row``, -1 if none).
OUTPUT_COLUMNS = (*FOLD_COLUMNS, "k", "first_row")
EPOCH_OUTPUT_COLUMNS = (*FOLD_COLUMNS, *EPOCH_COLUMNS, "k", "first_row")


def output_columns(per_epoch: bool) -> tuple[str, ...]:
    """What a fold returns, with or without the per-epoch aggregates.

    Args:
        per_epoch: whether the state carries ``n_epochs``, ``epoch_mean`` and ``epoch_ema``.
    """
    return EPOCH_OUTPUT_COLUMNS if per_epoch else OUTPUT_COLUMNS


def continue_sequential(starts: np.ndarray, lengths: np.ndarray, x: np.ndarray, ema: np.ndarray, total: np.ndarray,
                        decay: float) -> None:
    """Fold observations ``2..k`` of each group into ``ema`` and ``total``, in place.

    Group ``g``'s observations are ``x[starts[g] : starts[g] + lengths[g]]``, in order;
    ``ema[g]`` and ``total[g]`` already hold the fold of the first one. Vectorised over
    groups, sequential within a group: ``ema = decay * ema + (1 - decay) * v; total = total + v``.

    Args:
        starts: first observation of each group in ``x``.
        lengths: observations of each group (>= 1).
        x: every observation, grouped and ordered.
        ema: per group, updated in place.
        total: per group, updated in place.
        decay: the EMA's decay.
    """
    for j in range(1, int(lengths.max(initial=1))):
        active = np.flatnonzero(lengths > j)
        values = x[starts[active] + j]
        ema[active] = decay * ema[active] + (1.0 - decay) * values
        total[active] = total[active] + values


def merge_sorted_keys(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The sorted union of two sorted, unique key arrays, and where each input's keys are in it.

    Returns ``(merged, a_at, b_at)``; ``a_at`` is None when every key of ``b`` is in ``a``
    (``merged`` is ``a``, rows do not move). Naive equivalent: ``merged = sorted(set(a) | set(b));
    row = {k: i for i, k in enumerate(merged)}; a_at = [row[k] for k in a]; b_at = [row[k] for k in b]``.

    One binary search of ``b`` in ``a`` finds the keys of ``b`` that ``a`` lacks; each key of
    ``a`` moves down by the number of those below it, and the ``j``-th missing key lands at its
    insertion point plus ``j``. The temporaries are about half those of a merge sort of both.
    """
    if len(b) == 0:
        return a, None, np.zeros(0, dtype=np.intp)
    if len(a) == 0:
        return b, np.zeros(0, dtype=np.intp), np.arange(len(b), dtype=np.intp)
    pos = np.searchsorted(a, b)
    missing = np.flatnonzero(np.take(a, pos, mode="clip") != b)
    if not len(missing):
        return a, None, pos
    inserted = pos[missing]
    a_at = np.bincount(inserted, minlength=len(a) + 1)[: len(a)]  # missing keys inserted before each key of a
    np.cumsum(a_at, out=a_at)
    a_at += np.arange(len(a), dtype=a_at.dtype)
    b_at = np.take(a_at, pos, mode="clip")
    del pos
    inserted += np.arange(len(missing), dtype=inserted.dtype)
    b_at[missing] = inserted
    merged = np.empty(len(a) + len(missing), dtype=a.dtype)
    merged[a_at] = a
    merged[inserted] = b[missing]
    return merged, a_at, b_at


def finish_fold(prev: pa.Table | None, prev_at: np.ndarray | None, keys: np.ndarray, k: np.ndarray, starts: np.ndarray,
                x: np.ndarray, first_row: np.ndarray, *, epoch: int, decay: float, per_epoch: bool) -> pa.Table:
    """Fold every sample's observations of one epoch into its carried state: the rules of
    :mod:`hsm.mining.state`, computed once for every engine that uses it.

    Row ``i`` of the result is the sample ``keys[i]``. Its carried state is row ``r`` of
    ``prev`` where ``prev_at[r] == i`` (``prev_at`` None: ``prev``'s rows are the result's
    rows; no such row: a new sample, whose carried values are 0). Its ``k[i]``
    observations this epoch are ``x[starts[i] : starts[i] + k[i]]``, in observation order
    (``k[i] == 0``: not observed, the carried state is kept). Per observed sample, naive
    equivalent: ``for v in xs: ema = v if n == 0 else decay * ema + (1 - decay) * v;
    total += v; n += 1``, then ``mean = (mean * n_prev + total) / (n_prev + k)``, ``last = xs[-1]``,
    ``last_epoch = epoch`` (and with ``per_epoch``: ``epoch_mean = total / k``,
    ``epoch_ema = decay * epoch_ema + (1 - decay) * epoch_mean``, ``n_epochs += 1``).

    Args:
        prev: the previous state (``FOLD_COLUMNS``, plus ``EPOCH_COLUMNS`` with ``per_epoch``), or None.
        prev_at: the result row of each ``prev`` row, or None (same rows).
        keys: the result's keys, sorted.
        k: observations of each result row this epoch.
        starts: where each observed row's observations start in ``x`` (any value where ``k == 0``).
        x: the observations, each row's contiguous and in observation order.
        first_row: passed through (the event row of each row's first observation, -1 if none).
        epoch: the epoch folded, written to ``last_epoch``.
        decay: the EMA's decay.
        per_epoch: also fold ``n_epochs``, ``epoch_mean`` and ``epoch_ema``.

    Returns:
        :func:`output_columns` in the order of ``keys``.
    """
    d = float(decay)
    total_rows = len(keys)

    def carried(name: str, dtype) -> np.ndarray:
        if prev is None:
            return np.zeros(total_rows, dtype=dtype)
        column = prev.column(name).to_numpy()
        if prev_at is None:
            return column.astype(dtype, copy=True)
        out = np.zeros(total_rows, dtype=dtype)
        out[prev_at] = column
        return out

    n_obs, mean, ema, last = (carried("n_obs", np.int64), carried("mean", np.float64), carried("ema", np.float64),
                              carried("last", np.float64))
    last_epoch = carried("last_epoch", np.int32)
    seen = k > 0
    # Rows not observed read some observation (any index, clipped) and are masked out below.
    x_first = np.take(x, starts, mode="clip") if len(x) else np.zeros(total_rows)
    # The first observation of the epoch, for every row (the whole fold where k == 1).
    scratch = np.multiply(x_first, 1.0 - d)
    ema_first = np.multiply(ema, d)
    ema_first += scratch
    np.copyto(ema_first, x_first, where=n_obs == 0)
    total = x_first
    multi = np.flatnonzero(k > 1)
    if len(multi):  # observations 2..k, in order
        g_ema, g_total = ema_first[multi], total[multi]
        continue_sequential(starts[multi], k[multi], x, g_ema, g_total, d)
        ema_first[multi], total[multi] = g_ema, g_total
    np.copyto(ema, ema_first, where=seen)
    del ema_first
    updated = np.multiply(mean, n_obs, out=scratch)
    updated += total
    n_new = n_obs + k
    np.divide(updated, n_new, out=updated, where=seen)  # n_new >= 1 where seen; the rest is not used
    np.copyto(mean, updated, where=seen)
    del updated, scratch
    if len(x):
        last_at = k - 1
        last_at += starts
        np.copyto(last, np.take(x, last_at, mode="clip"), where=seen)
        del last_at
    n_obs = n_new
    last_epoch[seen] = epoch
    out = {"key": keys, "n_obs": n_obs, "mean": mean, "ema": ema, "last": last, "last_epoch": last_epoch,
           "k": k.astype(np.int64, copy=False), "first_row": first_row.astype(np.int64, copy=False)}
    if per_epoch:
        n_epochs, epoch_mean, epoch_ema = (carried("n_epochs", np.int32), carried("epoch_mean", np.float64),
                                           carried("epoch_ema", np.float64))
        np.copyto(epoch_mean, total / np.maximum(k, 1), where=seen)
        np.copyto(epoch_ema, d * epoch_ema + (1.0 - d) * epoch_mean, where=seen)
        n_epochs += seen
        out.update(n_epochs=n_epochs, epoch_mean=epoch_mean, epoch_ema=epoch_ema)
    return pa.table({name: out[name] for name in output_columns(per_epoch)})
