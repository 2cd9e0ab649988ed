"""The Polars engine's epoch fold: Polars orders and groups the events; the shared kernel folds them.

Polars puts every sample's events in observation order (a sort on ``key, global_step,
rank, position``) and groups them (count, first event row); the groups' keys are merged
with the carried state's (both sorted, :func:`merge_sorted_keys`), and
:func:`finish_fold`, the kernel the numpy engine uses too, applies every rule of
:mod:`hsm.mining.state`.

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

__all__ = ["fold_epoch"]


def _observation_order(events: pl.DataFrame) -> pl.DataFrame:
    """``key, x, row`` sorted by ``key, global_step, rank, position`` (``row``: the event's row in ``events``).

    A stable sort on ``key`` alone, then the full sort only for the samples whose events
    it left out of observation order (a sample seen on two ranks, or across parts): at 1M
    events a four-column sort took 2.2 s, the key sort plus this repair 1.3 s on the
    loaded development machine. The two parts hold disjoint keys, so merging them by key
    is the complete order.
    """
    by_key = events.with_row_index("row").sort("key", maintain_order=True).set_sorted("key")
    step, rank, position = pl.col("global_step"), pl.col("rank"), pl.col("position")
    before = [c.shift(1) for c in (step, rank, position)]
    earlier = (step < before[0]) | ((step == before[0]) & ((rank < before[1]) | ((rank == before[1]) & (position < before[2]))))
    unordered = by_key.lazy().filter((pl.col("key") == pl.col("key").shift(1)) & earlier).select(pl.col("key").unique())
    unordered = unordered.collect().get_column("key")
    columns = ["key", "x", "row"]
    if unordered.is_empty():
        return by_key.select(columns).set_sorted("key")
    flagged = pl.col("key").is_in(unordered.implode())
    repaired = by_key.filter(flagged).sort(list(ORDER)).select(columns).set_sorted("key")
    # A multi-column sort does not flag its first column sorted; the flag makes the group-by a scan (20x).
    return by_key.filter(~flagged).select(columns).set_sorted("key").merge_sorted(repaired, key="key").set_sorted("key")


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
    ordered = _observation_order(pl.from_arrow(events.select(list(ORDER) + ["x"])))
    groups = ordered.group_by("key", maintain_order=True).agg(k=pl.len(), first_row=pl.col("row").first())
    group_keys = groups.get_column("key").to_numpy()
    prev_keys = state.column("key").to_numpy() if state is not None else np.zeros(0, dtype=np.int64)
    keys, prev_at, group_at = merge_sorted_keys(prev_keys, group_keys)
    k = np.zeros(len(keys), dtype=np.int64)
    k[group_at] = groups.get_column("k").to_numpy()
    starts = np.zeros(len(keys), dtype=np.int64)
    starts[group_at] = np.cumsum(k[group_at]) - k[group_at]  # groups are in key order, as their events
    first_row = np.full(len(keys), -1, dtype=np.int64)
    first_row[group_at] = groups.get_column("first_row").to_numpy()
    x = ordered.get_column("x").to_numpy()
    return finish_fold(state, prev_at, keys, k, starts, x, first_row, epoch=epoch, decay=ema_decay, per_epoch=per_epoch)
