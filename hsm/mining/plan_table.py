"""The plan's rows from the folded state: the target's slice, stale samples, the selection."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hsm.config import MiningConfig
from hsm.mining.select import select_plan
from hsm.mining.state import IDX_BITS, IDX_MASK, score_of
from hsm.schemas import PLAN_SCHEMA

__all__ = ["target_rows", "stale_mask", "stale_scores", "build_plan_table", "hard_set"]


def target_rows(state: pa.Table, names: list[str], target: str) -> tuple[np.ndarray, int, int]:
    """The target's slice of the key-sorted state: ``(base_idx, start_row, stop_row)``."""
    if target not in names:
        return np.zeros(0, dtype=np.int64), 0, 0
    code = names.index(target)
    keys = state.column("key").to_numpy()
    start, stop = np.searchsorted(keys, [code << IDX_BITS, (code + 1) << IDX_BITS])
    return keys[start:stop] & IDX_MASK, int(start), int(stop)


def stale_mask(last_epoch: np.ndarray, epoch: int, mining: MiningConfig) -> np.ndarray | None:
    """Samples not seen in the last ``stale_after`` folded epochs (``0..epoch-1``), or None when off."""
    if mining.stale_after is None:
        return None
    return (epoch - 1) - last_epoch >= mining.stale_after


def stale_scores(scores: np.ndarray, last_epoch: np.ndarray, epoch: int, mining: MiningConfig) -> np.ndarray:
    """``stale_policy: decay``: a stale score moves toward the mean target score.

    ``unseen = (epoch - 1) - last_epoch``; for ``unseen >= stale_after``:
    ``score = mu + (score - mu) * ema_decay ** (unseen - stale_after + 1)``, with ``mu`` the
    mean score of all eligible target samples (NaN scores left out).
    """
    stale = stale_mask(last_epoch, epoch, mining)
    if stale is None or mining.stale_policy != "decay" or not stale.any():
        return scores
    mu = float(np.nanmean(scores))
    steps = ((epoch - 1) - last_epoch - mining.stale_after + 1).astype(np.float64)
    return np.where(stale, mu + (scores - mu) * np.power(mining.ema_decay, steps), scores)


def build_plan_table(
    state: pa.Table, names: list[str], target: str, mining: MiningConfig, epoch: int, sample_ids=None,
    suspects: np.ndarray | None = None,
):
    """Plan rows (every observed target sample, by ``base_idx``) and the selection behind them.

    ``sample_ids(base_idx) -> pa.Array`` gives the ids of target samples; it is called only
    to break ties at the selection boundary. ``stale_after`` adjusts the scores
    (:func:`stale_scores`) or excludes stale samples from the hard set (``flag``).
    ``suspects``: ``base_idx`` of label-noise suspects, never hard and weight 1.
    """
    base_idx, start, stop = target_rows(state, names, target)
    rows = state.slice(start, stop - start)
    scores = score_of(rows, mining.aggregate, mining.ema_decay)
    excluded = None
    if mining.stale_after is not None:
        last_epoch = rows.column("last_epoch").to_numpy()
        scores = stale_scores(scores, last_epoch, epoch, mining)
        if mining.stale_policy == "flag":
            excluded = stale_mask(last_epoch, epoch, mining)
    is_suspect = np.isin(base_idx, suspects) if suspects is not None else None
    if is_suspect is not None:
        excluded = is_suspect if excluded is None else (excluded | is_suspect)
    ids_of = (lambda subset: sample_ids(base_idx[subset])) if sample_ids is not None else None
    selection = select_plan(scores, ids_of, mining=mining, epoch=epoch, excluded=excluded)
    if is_suspect is not None:
        selection.weight[is_suspect] = 1.0  # suspects keep the regular weight, never upweighted
    dataset = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(base_idx), dtype=np.int32)), pa.array([target]))
    table = pa.Table.from_arrays(
        [dataset, pa.array(base_idx), pa.array(scores), rows.column("n_obs"),
         pa.array(selection.is_hard), pa.array(selection.weight)],
        names=PLAN_SCHEMA.names,
    )
    return table, selection


def hard_set(plan: pa.Table) -> set[int]:
    """``base_idx`` of the hard rows of a plan table."""
    return set(plan.filter(plan.column("is_hard")).column("base_idx").to_pylist())
