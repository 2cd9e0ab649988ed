"""The Polars engine's epoch fold: Polars orders, groups and joins; one numpy loop continues the EMA.

Polars puts every sample's events in observation order (a sort on ``key, global_step,
rank, position``), groups them (count, first event row, first and last value), joins
the groups onto the carried state and computes every rule of :mod:`hsm.mining.state`
as column expressions. The one step it has no operation for is the EMA (and the
in-order sum) over a sample's second and later observations, which
:func:`continue_sequential` runs in numpy, vectorised over samples.

Why not ``ewm_mean(alpha=1 - decay, adjust=False)``: Polars updates the average as
``m + (v - m) * (alpha / ((1 - alpha) + alpha))``, the state's rule is
``decay * m + (1 - decay) * v``. Same value in exact arithmetic, not in floating
point: over 20,000 samples of 4 observations seeded with a carried EMA, 4-56% of the
results differ in the last bit depending on ``decay`` (docs/benchmarks.md, issue 15),
so the two engines would no longer agree bit for bit with each other and the oracle.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from hsm.mining.engines.kernels import ORDER, continue_sequential, output_columns
from hsm.mining.state import EPOCH_COLUMNS, FOLD_COLUMNS

__all__ = ["fold_epoch"]

def _carried(state: pa.Table | None, per_epoch: bool) -> pl.LazyFrame:
    if state is not None:
        return pl.from_arrow(state.select(list(FOLD_COLUMNS + (EPOCH_COLUMNS if per_epoch else ())))).lazy()
    schema = {"key": pl.Int64, "n_obs": pl.Int64, "mean": pl.Float64, "ema": pl.Float64, "last": pl.Float64,
              "last_epoch": pl.Int32}
    if per_epoch:
        schema.update(n_epochs=pl.Int32, epoch_mean=pl.Float64, epoch_ema=pl.Float64)
    return pl.LazyFrame(schema=schema)


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
    d = float(ema_decay)
    ordered = _observation_order(pl.from_arrow(events.select(list(ORDER) + ["x"])))
    groups = ordered.lazy().group_by("key", maintain_order=True).agg(
        k=pl.len().cast(pl.Int64), first_row=pl.col("row").first().cast(pl.Int64),
        x_first=pl.col("x").first(), x_last=pl.col("x").last(),
    )
    n_prev, k = pl.col("n_obs").fill_null(0), pl.col("k").fill_null(0)
    seen = k > 0
    # The first observation of this epoch, for every observed sample (the whole fold when k == 1).
    # Both sides sorted by key and flagged so: Polars joins them by merging.
    joined = (_carried(state, per_epoch).set_sorted("key").join(groups.set_sorted("key"), on="key", how="full",
                                                                  coalesce=True)
              .sort("key")
              .with_columns(
                  ema_first=pl.when(n_prev == 0).then(pl.col("x_first"))
                  .otherwise(pl.lit(d) * pl.col("ema") + pl.lit(1.0 - d) * pl.col("x_first")))
              .collect())

    # Observations 2..k: the numpy kernel (Polars has no bit-exact operation for it, see the module doc).
    counts = joined.get_column("k").fill_null(0).to_numpy()
    ema_first = joined.get_column("ema_first").to_numpy(writable=True)
    total = joined.get_column("x_first").to_numpy(writable=True)
    multi = np.flatnonzero(counts > 1)
    if len(multi):
        starts = np.cumsum(counts) - counts
        g_ema, g_total = ema_first[multi], total[multi]
        continue_sequential(starts[multi], counts[multi], ordered.get_column("x").to_numpy(), g_ema, g_total, d)
        ema_first[multi], total[multi] = g_ema, g_total

    folded = joined.lazy().with_columns(ema_new=pl.Series(ema_first), total=pl.Series(total))
    columns = [
        pl.col("key"),
        (n_prev + k).alias("n_obs"),
        pl.when(seen).then((pl.col("mean").fill_null(0.0) * n_prev + pl.col("total")) / (n_prev + k))
        .otherwise(pl.col("mean")).alias("mean"),
        pl.when(seen).then(pl.col("ema_new")).otherwise(pl.col("ema")).alias("ema"),
        pl.when(seen).then(pl.col("x_last")).otherwise(pl.col("last")).alias("last"),
        pl.when(seen).then(pl.lit(epoch, pl.Int32)).otherwise(pl.col("last_epoch")).cast(pl.Int32).alias("last_epoch"),
        k.alias("k"),
        pl.col("first_row").fill_null(-1).alias("first_row"),
    ]
    if per_epoch:
        epoch_mean = pl.col("total") / k
        columns += [
            pl.when(seen).then(pl.col("n_epochs").fill_null(0) + 1).otherwise(pl.col("n_epochs"))
            .cast(pl.Int32).alias("n_epochs"),
            pl.when(seen).then(epoch_mean).otherwise(pl.col("epoch_mean")).alias("epoch_mean"),
            pl.when(seen).then(pl.lit(d) * pl.col("epoch_ema").fill_null(0.0) + pl.lit(1.0 - d) * epoch_mean)
            .otherwise(pl.col("epoch_ema")).alias("epoch_ema"),
        ]
    out = folded.select(columns).collect()
    return out.select(list(output_columns(per_epoch))).to_arrow().combine_chunks()
