"""The default engine's epoch fold (Polars + numpy), built for 10M-event epochs.

Samples are keyed by one int64, ``dataset_code << 40 | base_idx``, and the state
is kept sorted by that key, so no join and no global sort is needed: each event
finds its state row by binary search; the samples observed once this epoch (most
of them) are updated in place with vectorised arithmetic; only the samples seen
several times, or for the first time, are sorted into observation order (by
Polars) and folded sequentially. The string columns of known samples are reused
untouched.
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


def _sorted_state_keys(state: pa.Table, names: list[str]) -> tuple[pa.Table, np.ndarray]:
    keys = _keys(state, names)
    if len(keys) > 1 and not (np.diff(keys) > 0).all():
        order = np.argsort(keys, kind="stable")  # not written by hsm: sort once
        state, keys = state.take(pa.array(order)), keys[order]
        if not (np.diff(keys) > 0).all():
            raise ValueError("state has duplicate (dataset, base_idx) rows")
    return state, keys


def _locate(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of every key in ``sorted_keys`` and whether it is there.

    ``base_idx`` indexes its dataset, so it is dense: per dataset a direct
    lookup table answers each key with one read (binary search over 10M rows
    misses the cache at every level). Sparse indices fall back to searchsorted.
    """
    pos = np.full(len(keys), len(sorted_keys), dtype=np.int64)
    found = np.zeros(len(keys), dtype=bool)
    if len(sorted_keys) == 0 or len(keys) == 0:
        return pos, found
    codes = keys >> _IDX_BITS
    for code in np.unique(codes):
        lo, hi = np.searchsorted(sorted_keys, [code << _IDX_BITS, (code + 1) << _IDX_BITS])
        if lo == hi:
            continue
        base = sorted_keys[lo:hi] & _IDX_MASK
        select = np.flatnonzero(codes == code)
        wanted = keys[select] & _IDX_MASK
        if base[-1] <= 4 * len(base) + (1 << 20):
            table = np.full(int(base[-1]) + 1, -1, dtype=np.int64)
            table[base] = np.arange(lo, hi)
            rows = np.full(len(wanted), -1, dtype=np.int64)
            inside = wanted <= base[-1]
            rows[inside] = table[wanted[inside]]
        else:
            at = np.searchsorted(base, wanted)
            hit = at < len(base)
            hit[hit] = base[at[hit]] == wanted[hit]
            rows = np.where(hit, lo + at, -1)
        pos[select] = np.where(rows >= 0, rows, len(sorted_keys))
        found[select] = rows >= 0
    return pos, found


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
    if metric not in ("loss", "token_acc"):
        raise ValueError(f"metric must be 'loss' or 'token_acc', got {metric!r}")
    d = float(ema_decay)
    names = _codes(state, events)
    if state is None:
        state = STATE_SCHEMA.empty_table()
    state, prev_keys = _sorted_state_keys(state, names)
    n_prev = len(prev_keys)
    n_obs = state.column("n_obs").to_numpy().copy()
    mean = state.column("mean").to_numpy().copy()
    ema = state.column("ema").to_numpy().copy()
    last = state.column("last").to_numpy().copy()
    last_epoch = state.column("last_epoch").to_numpy().copy()

    ev_keys = _keys(events, names)
    if metric == "loss":
        x = events.column("loss").to_numpy().astype(np.float64)
    else:
        x = 1.0 - events.column("token_acc").to_numpy().astype(np.float64)
    pos, found = _locate(prev_keys, ev_keys)
    seen = np.bincount(pos[found], minlength=n_prev)
    once = found.copy()
    once[found] = seen[pos[found]] == 1

    # Known samples observed once this epoch: the sequential rule with k = 1. One
    # scatter of x, then whole-array passes (sequential memory, not random gathers).
    rows_once = seen == 1
    x_at = np.zeros(n_prev)
    x_at[pos[once]] = x[once]
    ema = np.where(rows_once, d * ema + (1.0 - d) * x_at, ema)
    mean = np.where(rows_once, (mean * n_obs + x_at) / (n_obs + 1), mean)
    n_obs = n_obs + rows_once
    last = np.where(rows_once, x_at, last)
    last_epoch = np.where(rows_once, np.int32(epoch), last_epoch).astype(np.int32)

    # Everything else (several observations, or a new sample): sequential fold in observation order.
    rest = np.flatnonzero(~once)
    new_keys = np.zeros(0, dtype=np.int64)
    new_rows: dict[str, np.ndarray] = {}
    new_ids = pa.array([], type=pa.string())
    if len(rest):
        frame = pl.DataFrame({"key": ev_keys[rest], "row": rest, "x": x[rest]}).with_columns(
            pl.from_arrow(events.select(_ORDER).take(pa.array(rest)))
        ).sort(["key", *_ORDER])
        keys_r = frame["key"].to_numpy()
        starts = np.flatnonzero(np.r_[True, keys_r[1:] != keys_r[:-1]])
        lengths = np.diff(np.r_[starts, len(keys_r)])
        group_keys = keys_r[starts]
        gpos, gfound = _locate(prev_keys, group_keys)
        at = np.where(gfound, gpos, 0)
        g_n, g_mean, g_ema, g_last = sequential_fold(
            starts, lengths, frame["x"].to_numpy(),
            np.where(gfound, n_obs[at] if n_prev else 0, 0),
            np.where(gfound, mean[at] if n_prev else 0.0, 0.0),
            np.where(gfound, ema[at] if n_prev else 0.0, 0.0), d,
        )
        known = gpos[gfound]
        n_obs[known], mean[known], ema[known], last[known] = g_n[gfound], g_mean[gfound], g_ema[gfound], g_last[gfound]
        last_epoch[known] = epoch
        fresh = ~gfound
        new_keys = group_keys[fresh]
        new_rows = {"n_obs": g_n[fresh], "mean": g_mean[fresh], "ema": g_ema[fresh], "last": g_last[fresh],
                    "last_epoch": np.full(int(fresh.sum()), epoch, dtype=np.int32)}
        first_rows = frame["row"].to_numpy()[starts[fresh]]
        new_ids = events.column("sample_id").take(pa.array(first_rows)).combine_chunks().cast(pa.string())

    columns = {"n_obs": n_obs, "mean": mean, "ema": ema, "last": last, "last_epoch": last_epoch}
    sample_id = state.column("sample_id")
    keys = prev_keys
    if len(new_keys):
        # Merge the new samples into key order (both sides are already sorted).
        total = n_prev + len(new_keys)
        new_at = np.searchsorted(prev_keys, new_keys) + np.arange(len(new_keys))
        old_at = np.ones(total, dtype=bool)
        old_at[new_at] = False
        order = np.empty(total, dtype=np.int64)
        order[old_at] = np.arange(n_prev)
        order[new_at] = n_prev + np.arange(len(new_keys))

        def merged(old: np.ndarray, new: np.ndarray) -> np.ndarray:
            out = np.empty(total, dtype=old.dtype)
            out[old_at] = old
            out[new_at] = new
            return out

        columns = {k: merged(v, new_rows[k].astype(v.dtype)) for k, v in columns.items()}
        keys = merged(prev_keys, new_keys)
        sample_id = pa.concat_arrays([sample_id.combine_chunks().cast(pa.string()), new_ids]).take(pa.array(order))
    use_ema = (columns["n_obs"] >= 3) if aggregate == "ema" else np.zeros(len(keys), dtype=bool)
    score = np.where(use_ema, columns["ema"], columns["mean"])
    if len(new_keys) == 0 and n_prev:
        dataset = state.column("dataset")
    else:
        dataset = pa.DictionaryArray.from_arrays(pa.array((keys >> _IDX_BITS).astype(np.int32)), pa.array(names, type=pa.string()))
    out = {
        "sample_id": sample_id, "dataset": dataset, "base_idx": pa.array(keys & _IDX_MASK),
        "n_obs": pa.array(columns["n_obs"].astype(np.int64)), "mean": pa.array(columns["mean"]),
        "ema": pa.array(columns["ema"]), "last": pa.array(columns["last"]),
        "last_epoch": pa.array(columns["last_epoch"].astype(np.int32)), "score": pa.array(score),
    }
    return pa.Table.from_arrays([_plain(out[f.name], f.type) for f in STATE_SCHEMA], schema=STATE_SCHEMA)


def _plain(column, type_: pa.DataType):
    """``column`` as ``type_``; dictionary-encoded strings are decoded."""
    if column.type != type_:
        column = column.cast(type_)
    return column
