"""Choosing the hard set and the plan weights from the per-sample state (docs/design.md §4).

Pure functions over numpy/Arrow arrays; the planner calls them with the target
rows of the state, sorted by ``base_idx``. Rank order everywhere: score
descending, then the tie key ascending (:func:`tie_keys`: the first 16 hex digits of
``sha256(f"{seed}:{sample_id}")``), then ``sample_id`` ascending; a NaN score ranks
last. Samples tied on score are so chosen in a seeded order that does not depend on
how their ids are spelled. When every eligible score is equal the metric carries no
signal (:func:`has_no_signal`): nothing is hard and every weight is 1.

``sample_ids`` is either an Arrow array (one id per score) or a function from row
indices to their ids: the planner passes a function that reads the id table only
when ties at the selection boundary need the strings.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hsm.config import MiningConfig, decimal_fraction, small_target_warning

__all__ = [
    "SampleIds", "Selection", "ceil_share", "hard_count", "hardest_mask", "has_no_signal", "rank_order", "tie_keys",
    "draw_regular", "select_plan", "REGULAR_DRAW_STREAM",
]

# Domain separation of the plan-time RNG from the schedule-time RNGs.
REGULAR_DRAW_STREAM = 1

SampleIds = Union[pa.Array, Callable[[np.ndarray], pa.Array], None]


def ceil_share(value: float, n: int) -> int:
    """``ceil(value * n)`` computed exactly on the decimal ``value``.

    Naive (wrong) equivalent: ``math.ceil(value * n)``, which gives 106 for
    ``0.07 * 1500`` because the float product is 105.00000000000001.
    """
    return math.ceil(decimal_fraction(value) * n)


def hard_count(mining: MiningConfig, n_eligible: int) -> int | None:
    """Size of the hard set for ``n_eligible`` samples, or None for threshold selection.

    Args:
        mining: the mining config (its mode, selector, hard_sample_size, hard_pool_k / hard_pool_frac).
        n_eligible: target samples the selection chooses from.
    """
    if mining.mode == "fixed_set":
        return min(mining.hard_sample_size, n_eligible)
    if mining.mode == "dynamic":
        if mining.hard_pool_k is not None:
            return min(mining.hard_pool_k, n_eligible)
        return min(ceil_share(mining.hard_pool_frac, n_eligible), n_eligible)
    if mining.selector.mode == "top_k":
        return min(mining.selector.k, n_eligible)
    if mining.selector.mode == "percentile":
        return min(ceil_share(mining.selector.value, n_eligible), n_eligible)
    return None


def _ids_at(sample_ids: SampleIds, rows: np.ndarray) -> pa.Array:
    if sample_ids is None:
        raise ValueError("tied scores need sample ids to break the tie")
    if callable(sample_ids):
        return sample_ids(rows)
    return sample_ids.take(pa.array(rows))


def _ranked_scores(scores: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(scores), -np.inf, scores)


def tie_keys(sample_ids: pa.Array, seed: int) -> pa.Array:
    """The tie key of each id: the first 16 hex digits of ``sha256(f"{seed}:{sample_id}")`` (UTF-8).

    Args:
        sample_ids: string ids.
        seed: the mining config's ``seed``.
    """
    return pa.array([hashlib.sha256(f"{seed}:{sid}".encode("utf-8")).hexdigest()[:16]
                     for sid in sample_ids.to_pylist()], pa.string())


def _tie_order(sample_ids: pa.Array, seed: int) -> np.ndarray:
    """Indices of ``sample_ids`` by tie key, then id."""
    table = pa.table({"tie": tie_keys(sample_ids, seed), "sample_id": sample_ids})
    return pc.sort_indices(table, sort_keys=[("tie", "ascending"), ("sample_id", "ascending")]).to_numpy()


def has_no_signal(scores: np.ndarray) -> bool:
    """Whether every score is equal (NaN equal to NaN), so ranking them carries no information.

    Naive equivalent: ``len(set(scores)) == 1`` (with every NaN one value); False for no scores.
    """
    if len(scores) == 0:
        return False
    s = _ranked_scores(scores)
    return bool(s.min() == s.max())


def hardest_mask(scores: np.ndarray, sample_ids: SampleIds, n: int, *, seed: int) -> np.ndarray:
    """Mask of the ``n`` first samples in rank order.

    Naive equivalent: ``sorted(range(N), key=lambda i: (-scores[i], tie_key(seed, sample_ids[i]),
    sample_ids[i]))[:n]``. Runs in O(N) plus a sort of the samples tied at the boundary score.
    """
    total = len(scores)
    n = max(0, min(n, total))
    if n == total:
        return np.ones(total, dtype=bool)
    if n == 0:
        return np.zeros(total, dtype=bool)
    s = _ranked_scores(scores)
    boundary = np.partition(s, total - n)[total - n]
    mask = s > boundary
    need = n - int(mask.sum())
    ties = np.flatnonzero(s == boundary)
    if need:
        order = _tie_order(_ids_at(sample_ids, ties), seed)
        mask[ties[order[:need]]] = True
    return mask


def rank_order(scores: np.ndarray, sample_ids: SampleIds, subset: np.ndarray, *, seed: int | None) -> np.ndarray:
    """Indices ``subset`` sorted into rank order (score desc, tie key asc, sample_id asc).

    ``seed`` None leaves the tie key out (score, then ``sample_id``): for listings that are
    not a selection of the mining config.
    """
    ids = _ids_at(sample_ids, subset)
    columns = {"score": _ranked_scores(scores[subset])}
    if seed is not None:
        columns["tie"] = tie_keys(ids, seed)
    columns["sample_id"] = ids
    keys = [("score", "descending")] + [(name, "ascending") for name in columns if name != "score"]
    return subset[pc.sort_indices(pa.table(columns), sort_keys=keys).to_numpy()]


def draw_regular(candidates: np.ndarray, n: int, *, seed: int, epoch: int) -> np.ndarray:
    """Draw ``min(n, len(candidates))`` of ``candidates`` without replacement, sorted.

    ``candidates`` must be in a canonical order (the planner passes them by
    ascending ``base_idx``); the RNG is ``default_rng([seed, epoch, REGULAR_DRAW_STREAM])``.
    """
    n = min(n, len(candidates))
    rng = np.random.default_rng([seed, epoch, REGULAR_DRAW_STREAM])
    return np.sort(candidates[rng.choice(len(candidates), size=n, replace=False)])


def _hard_mask(scores: np.ndarray, sample_ids: SampleIds, mining: MiningConfig) -> np.ndarray:
    n_hard = hard_count(mining, len(scores))
    if n_hard is None:
        return _ranked_scores(scores) >= mining.selector.threshold
    return hardest_mask(scores, sample_ids, n_hard, seed=mining.seed)


@dataclass(frozen=True)
class Selection:
    """The plan's per-row decisions over the eligible target samples."""

    is_hard: np.ndarray
    weight: np.ndarray
    default_weight: float
    n_regular: int
    target_epoch_size: int | None
    no_signal: bool = False  # every eligible score equal: nothing hard, every weight 1


def select_plan(
    scores: np.ndarray, sample_ids: SampleIds, *, mining: MiningConfig, epoch: int,
    excluded: np.ndarray | None = None,
) -> Selection:
    """Hard set and weights for one epoch.

    - reweight: hard per ``selector`` (``top_k``: first ``min(k, N)``;
      ``percentile``: first ``ceil(value * N)``; ``threshold``: ``score >= t``);
      weight ``hard_weight`` for hard samples, 1 otherwise and for unobserved ones.
    - fixed_set: the first ``hard_sample_size`` are hard, ``regular_sample_size``
      others drawn by :func:`draw_regular`; those weigh 1, every other sample 0.
    - dynamic: the hard pool is the first ``hard_pool_k`` or ``ceil(hard_pool_frac * N)``;
      every weight is 1 (the schedule mixes per batch).

    ``excluded`` rows (``stale_policy: flag``) are never hard; sizes count the others.

    When every score of the samples the hard set is chosen from is equal
    (:func:`has_no_signal`), the plan marks nothing hard and weighs every sample 1, in
    every mode; a ``fixed_set`` plan then leaves the target to the uniform draw.
    """
    total = len(scores)
    chosen_from = scores if excluded is None else scores[~excluded]
    if has_no_signal(chosen_from):
        ones = np.ones(total, dtype=np.float64)
        target_epoch_size = mining.target_epoch_size if mining.mode == "fixed_set" else None
        return Selection(np.zeros(total, dtype=bool), ones, 1.0, 0, target_epoch_size, no_signal=True)
    if excluded is not None and excluded.any():
        # Flagged (stale) samples are never hard; the hard set is chosen among the others.
        eligible = np.flatnonzero(~excluded)
        is_hard = np.zeros(total, dtype=bool)
        is_hard[eligible] = _hard_mask(scores[eligible], lambda rows: _ids_at(sample_ids, eligible[rows]), mining)
    else:
        is_hard = _hard_mask(scores, sample_ids, mining)
    if mining.mode == "reweight":
        weight = np.where(is_hard, mining.hard_weight, 1.0)
        return Selection(is_hard, weight, 1.0, 0, None)
    if mining.mode == "fixed_set":
        note = small_target_warning(mining.mode, mining.hard_sample_size, mining.regular_sample_size, total)
        if note:
            warnings.warn(f"hsm: {note}", stacklevel=2)
        regular = draw_regular(np.flatnonzero(~is_hard), mining.regular_sample_size, seed=mining.seed, epoch=epoch)
        weight = is_hard.astype(np.float64)
        weight[regular] = 1.0
        return Selection(is_hard, weight, 0.0, len(regular), mining.target_epoch_size)
    return Selection(is_hard, np.ones(total, dtype=np.float64), 1.0, 0, None)

