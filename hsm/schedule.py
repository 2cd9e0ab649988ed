"""An epoch's global schedule, as a pure numpy function of its inputs.

``build_schedule(plan, n_target, source_sizes, source_ratios, seed, epoch, batch_size)``
returns, for every slot of the epoch, the dataset code (0 = target, ``1+s`` =
source ``s``), the base index and whether it was drawn as hard. Every random draw
comes from ``default_rng([seed, epoch, stream])``, so identical inputs give an
identical schedule on every rank, and a different epoch gives another.

- Sources: each ``s`` drawn with replacement ``round(ratio_s * n_target)`` times
  (half up), always from the *base* target size, whatever the plan does.
- No plan: every target sample once.
- reweight / fixed_set: ``T`` target draws (``n_target``, or the plan's
  ``target_epoch_size``) by systematic resampling: each sample's count is the
  floor or ceiling of ``T * w / sum(w)``.
- dynamic: ``n_target`` target slots; in each batch of ``batch_size`` slots the
  first ``round(hard_pool_frac * t)`` of its ``t`` target slots take hard samples,
  the rest regular ones, each pool cycled in a fresh permutation per pass; hard
  slots beyond the pool size are the ``shortfall`` (drawn again, with replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsm.plan import Plan

__all__ = ["Schedule", "World", "build_schedule", "systematic_counts", "source_quota", "shard_positions"]

_SOURCE_STREAM, _TARGET_STREAM, _SHUFFLE_STREAM, _HARD_STREAM, _REGULAR_STREAM = 2, 3, 4, 5, 6


@dataclass(frozen=True)
class World:
    """Topology as a plain value: this process's rank among ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")


_IDX_BITS = 40
_IDX_MASK = (1 << _IDX_BITS) - 1
_HARD_BIT = 1 << _IDX_BITS
_CODE_SHIFT = _IDX_BITS + 1


@dataclass(frozen=True)
class Schedule:
    """One epoch's global schedule; ``len(schedule)`` slots.

    Slots are packed into one int64 each, ``code << 41 | is_hard << 40 | base_idx``,
    so a 20M-slot epoch is one 160 MB array; the views below decode it.
    """

    slots: np.ndarray
    epoch: int
    shortfall: int = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def dataset(self) -> np.ndarray:
        """Dataset code per slot (0 = target)."""
        return (self.slots >> _CODE_SHIFT).astype(np.int16)

    @property
    def base_idx(self) -> np.ndarray:
        return self.slots & _IDX_MASK

    @property
    def is_hard(self) -> np.ndarray:
        return (self.slots & _HARD_BIT) != 0

    def counts(self) -> np.ndarray:
        """Slots per dataset code."""
        return np.bincount(self.dataset, minlength=int(self.dataset.max(initial=0)) + 1)

    def decode(self, start: int, stop: int) -> tuple[list[int], list[int], list[bool]]:
        """``(codes, base_idx, is_hard)`` of slots ``start:stop`` as Python lists."""
        chunk = self.slots[start:stop]
        return ((chunk >> _CODE_SHIFT).tolist(), (chunk & _IDX_MASK).tolist(), ((chunk & _HARD_BIT) != 0).tolist())


def source_quota(ratio: float, n_target: int) -> int:
    """``round(ratio * n_target)``, halves rounded up."""
    return int(np.floor(ratio * n_target + 0.5))


def systematic_counts(weights: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Counts summing to ``total``, each the floor or ceiling of ``total * w / sum(w)``.

    Systematic resampling: one uniform offset ``u``; sample ``i`` is drawn once for
    every point ``u + k`` (``k = 0..total-1``) inside its cumulative interval.
    Naive equivalent (higher variance): ``rng.multinomial(total, w / w.sum())``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("plan weights must be finite and non-negative")
    if total == 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    # Normalise before scaling: total / sum(w) overflows for tiny weights. One buffer, in place.
    cumulative = weights / weights.sum()
    np.cumsum(cumulative, out=cumulative)
    cumulative *= total
    cumulative[-1] = total
    cumulative -= rng.random()
    np.ceil(cumulative, out=cumulative)
    edges = cumulative.astype(np.int64)
    del cumulative
    return np.diff(edges, prepend=0)


def _cycled(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    if count == 0 or len(pool) == 0:
        return np.zeros(0, dtype=np.int64)
    passes = -(-count // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:count]


def build_schedule(
    plan: Plan | None,
    *,
    n_target: int,
    source_sizes: list[int],
    source_ratios: list[float],
    seed: int,
    epoch: int,
    batch_size: int = 1,
) -> Schedule:
    """The epoch's global schedule; ``plan`` is None or a triggered, verified plan."""
    if len(source_sizes) != len(source_ratios):
        raise ValueError("one ratio per source")
    src_rng = np.random.default_rng([seed, epoch, _SOURCE_STREAM])
    pieces = []
    for s, (size, ratio) in enumerate(zip(source_sizes, source_ratios)):
        quota = source_quota(ratio, n_target)
        if quota and size == 0:
            raise ValueError(f"source {s} is empty but its ratio asks for {quota} draws")
        drawn = src_rng.integers(0, max(size, 1), quota, dtype=np.int64)
        drawn |= np.int64(s + 1) << _CODE_SHIFT
        pieces.append(drawn)
    mode = plan.mode if plan is not None else None
    hard_mask = plan.hard_mask(n_target) if plan is not None else None
    if mode in ("reweight", "fixed_set"):
        total = plan.manifest.get("target_epoch_size") or n_target
        counts = systematic_counts(plan.target_weights(n_target), total, np.random.default_rng([seed, epoch, _TARGET_STREAM]))
        target = np.repeat(np.arange(n_target, dtype=np.int64), counts)
        del counts
        target[hard_mask[target]] |= _HARD_BIT
    else:
        target = np.arange(n_target, dtype=np.int64)
    slots = np.concatenate([target, *pieces])
    del target, pieces
    np.random.default_rng([seed, epoch, _SHUFFLE_STREAM]).shuffle(slots)  # in place
    shortfall = 0
    if mode == "dynamic":
        shortfall = _mix_batches(slots, hard_mask, float(plan.manifest["hard_pool_frac"]), batch_size, seed, epoch)
    return Schedule(slots=slots, epoch=epoch, shortfall=shortfall)


def _mix_batches(slots: np.ndarray, hard_mask: np.ndarray, frac: float, batch_size: int, seed: int, epoch: int) -> int:
    """Fill the target slots of every batch in place: hard first, then regular; returns the shortfall."""
    target_slots = np.flatnonzero((slots >> _CODE_SHIFT) == 0)
    batch_of = target_slots // batch_size
    # rank of each target slot among its batch's target slots
    first_in_batch = np.r_[0, np.flatnonzero(np.diff(batch_of)) + 1]
    starts = np.repeat(first_in_batch, np.diff(np.r_[first_in_batch, len(target_slots)]))
    rank_in_batch = np.arange(len(target_slots)) - starts
    per_batch = np.bincount(batch_of, minlength=int(batch_of.max(initial=-1)) + 1)
    hard_per_batch = np.floor(frac * per_batch + 0.5).astype(np.int64)
    wants_hard = rank_in_batch < hard_per_batch[batch_of]
    hard_pool = np.flatnonzero(hard_mask)
    regular_pool = np.flatnonzero(~hard_mask)
    if len(hard_pool) == 0:
        wants_hard[:] = False
    if len(regular_pool) == 0:
        wants_hard[:] = True
    n_hard = int(wants_hard.sum())
    slots[target_slots[wants_hard]] = _cycled(hard_pool, n_hard, np.random.default_rng([seed, epoch, _HARD_STREAM])) | _HARD_BIT
    slots[target_slots[~wants_hard]] = _cycled(regular_pool, len(target_slots) - n_hard,
                                               np.random.default_rng([seed, epoch, _REGULAR_STREAM]))
    return max(0, n_hard - len(hard_pool))


def shard_positions(n_slots: int, batch_size: int, world: World) -> np.ndarray:
    """Positions of this rank's slots: whole batches dealt round robin.

    The last round is completed with batches from the start of the schedule, so
    every rank gets the same number of batches (as accelerate's even_batches does);
    the union over ranks of the first ``n_slots`` dealt positions is every position once.
    """
    if world.world_size == 1 or n_slots == 0:
        return np.arange(n_slots, dtype=np.int64)
    n_batches = -(-n_slots // batch_size)
    rounds = -(-n_batches // world.world_size)
    batches = np.arange(rounds) * world.world_size + world.rank
    positions = (batches[:, None] * batch_size + np.arange(batch_size)[None, :]).reshape(-1)
    return positions % n_slots
