"""Polars implementation of the epoch fold (the default engine).

Engineering for 10M-event epochs: most samples are observed once per epoch, so
only the samples seen several times are sorted into observation order (and
folded sequentially in numpy); the rest are folded with vectorised
expressions. Samples are keyed by one int64, ``dataset_code << 40 | base_idx``,
so the join with the previous state never hashes strings.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from hsm.schemas import STATE_SCHEMA

__all__ = ["fold_epoch", "sequential_fold"]

_IDX_BITS = 40
_IDX_MASK = (1 << _IDX_BITS) - 1
_ORDER = ["epoch", "global_step", "rank", "position"]


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

    Returns ``(n, mean, ema, last)``.
    """
    first = x[starts]
    ema = np.where(n_prev == 0, first, decay * ema_prev + (1.0 - decay) * first)
    total = first.copy()
    for j in range(1, int(lengths.max(initial=1))):
        active = lengths > j
        values = x[starts[active] + j]
        ema[active] = decay * ema[active] + (1.0 - decay) * values
        total[active] = total[active] + values
    n = n_prev + lengths
    mean = (mean_prev * n_prev + total) / n
    last = x[starts + lengths - 1]
    return n, mean, ema, last


def _keys(table: pa.Table, names: list[str]) -> np.ndarray:
    """``code(dataset) << 40 | base_idx`` for every row; codes follow the sorted dataset names."""
    base_idx = table.column("base_idx").to_numpy()
    if len(base_idx) and (base_idx.min() < 0 or base_idx.max() > _IDX_MASK):
        raise ValueError(f"base_idx must be in [0, 2^{_IDX_BITS}); got {base_idx.min()}..{base_idx.max()}")
    column = table.column("dataset")
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    codes = []
    for chunk in column.chunks:
        lookup = np.array([names.index(v) for v in chunk.dictionary.to_pylist()] or [0], dtype=np.int64)
        codes.append(lookup[chunk.indices.to_numpy(zero_copy_only=False)])
    codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
    return (codes << _IDX_BITS) | base_idx


def _codes(state: pa.Table | None, events: pa.Table) -> list[str]:
    names = set(pc.unique(events.column("dataset")).to_pylist())
    if state is not None and state.num_rows:
        names |= set(pc.unique(state.column("dataset")).to_pylist())
    return sorted(names)


def fold_epoch(
    state: pa.Table | None,
    events: pa.Table,
    *,
    epoch: int,
    metric: str,
    ema_decay: float,
    aggregate: str,
) -> pa.Table:
    """Fold one epoch of (attempt-deduplicated) events into ``state``.

    Args:
        state: the state after the previous epoch (``STATE_SCHEMA``), or None.
        events: this epoch's events (``EVENT_SCHEMA``).
        epoch: the epoch being folded; written to ``last_epoch``.
        metric: ``loss`` or ``token_acc`` (difficulty ``1 - token_acc``).
        ema_decay: ``decay`` of :mod:`hsm.state`.
        aggregate: ``ema`` or ``mean``.

    Returns:
        The new state, ``STATE_SCHEMA``, sorted by ``(dataset, base_idx)``.
    """
    d = float(ema_decay)
    names = _codes(state, events)
    x_expr = pl.col("loss").cast(pl.Float64) if metric == "loss" else 1.0 - pl.col("token_acc").cast(pl.Float64)

    ev = pl.from_arrow(
        events.select(["sample_id", "loss", "token_acc", *_ORDER])
    ).with_columns(key=_keys(events, names), x=x_expr).drop("loss", "token_acc")
    if state is not None and state.num_rows:
        prev = pl.from_arrow(state.drop_columns(["dataset", "base_idx"])).with_columns(key=_keys(state, names))
    else:
        prev = pl.DataFrame(
            schema={"sample_id": pl.String, "n_obs": pl.Int64, "mean": pl.Float64, "ema": pl.Float64,
                    "last": pl.Float64, "last_epoch": pl.Int32, "score": pl.Float64, "key": pl.Int64}
        )

    repeated = ev["key"].is_duplicated()
    singles = ev.filter(~repeated).select("key", "sample_id", "x")
    multis = ev.filter(repeated).sort(["key", *_ORDER])

    # Samples seen several times this epoch: sequential fold in observation order.
    if multis.height:
        keys_m = multis["key"].to_numpy()
        starts = np.flatnonzero(np.r_[True, keys_m[1:] != keys_m[:-1]])
        lengths = np.diff(np.r_[starts, len(keys_m)])
        groups = pl.DataFrame({"key": keys_m[starts], "sample_id": multis["sample_id"].gather(starts)})
        groups = groups.join(prev.select("key", "n_obs", "mean", "ema"), on="key", how="left", maintain_order="left")
        n_prev = groups["n_obs"].fill_null(0).to_numpy()
        n, mean, ema, last = sequential_fold(
            starts, lengths, multis["x"].to_numpy(), n_prev,
            groups["mean"].fill_null(0.0).to_numpy(), groups["ema"].fill_null(0.0).to_numpy(), d,
        )
        folded_multi = pl.DataFrame(
            {"key": groups["key"], "sample_id_new": groups["sample_id"], "m_n": n, "m_mean": mean, "m_ema": ema, "m_last": last}
        )
    else:
        folded_multi = pl.DataFrame(
            schema={"key": pl.Int64, "sample_id_new": pl.String, "m_n": pl.Int64, "m_mean": pl.Float64,
                    "m_ema": pl.Float64, "m_last": pl.Float64}
        )

    observed = pl.concat(
        [
            singles.rename({"sample_id": "sample_id_new"}),
            folded_multi.with_columns(x=pl.lit(None, dtype=pl.Float64)),
        ],
        how="diagonal",
    )
    joined = prev.join(observed, on="key", how="full", coalesce=True)
    n_prev = pl.col("n_obs").fill_null(0)
    single = pl.col("x").is_not_null()
    multi = pl.col("m_n").is_not_null()
    new = joined.select(
        pl.col("key"),
        pl.coalesce("sample_id", "sample_id_new").alias("sample_id"),
        pl.when(single).then(n_prev + 1).when(multi).then(pl.col("m_n")).otherwise(pl.col("n_obs")).alias("n_obs"),
        pl.when(single)
        .then((pl.col("mean").fill_null(0.0) * n_prev + pl.col("x")) / (n_prev + 1))
        .when(multi).then(pl.col("m_mean"))
        .otherwise(pl.col("mean")).alias("mean"),
        pl.when(single & (n_prev == 0)).then(pl.col("x"))
        .when(single).then(d * pl.col("ema") + (1.0 - d) * pl.col("x"))
        .when(multi).then(pl.col("m_ema"))
        .otherwise(pl.col("ema")).alias("ema"),
        pl.when(single).then(pl.col("x")).when(multi).then(pl.col("m_last")).otherwise(pl.col("last")).alias("last"),
        pl.when(single | multi).then(pl.lit(epoch, dtype=pl.Int32)).otherwise(pl.col("last_epoch")).alias("last_epoch"),
    )
    use_ema = (pl.col("n_obs") >= 3) if aggregate == "ema" else pl.lit(False)
    new = new.with_columns(score=pl.when(use_ema).then(pl.col("ema")).otherwise(pl.col("mean"))).sort("key")
    names_arr = pa.array(names, type=pa.string())
    codes = (new["key"].to_numpy() >> _IDX_BITS).astype(np.int32)
    out = new.with_columns(base_idx=pl.col("key") % (1 << _IDX_BITS)).drop("key").to_arrow()
    dataset = pa.DictionaryArray.from_arrays(pa.array(codes), names_arr).cast(pa.string())
    columns = {name: out.column(name) for name in out.column_names}
    columns["dataset"] = dataset
    return pa.Table.from_arrays(
        [columns[f.name].cast(f.type) for f in STATE_SCHEMA], schema=STATE_SCHEMA
    )
