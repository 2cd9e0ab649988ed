"""An epoch's global schedule, as a pure numpy function of its inputs.

``build_schedule(plan, n_target, source_sizes, source_ratios, seed, epoch, batch_size,
target_epoch_size)`` returns, for every slot of the epoch, the dataset code (0 =
target, ``1+s`` = source ``s``), the base index and whether it was drawn as hard.
Every random draw comes from ``default_rng([seed, epoch, stream])`` (or
``[seed, cycle, stream]`` for the target cycle), so identical inputs give an
identical schedule on every rank, and a different epoch gives another.

The epoch length is fixed for the whole run (transformers counts the steps per
epoch once): ``T + sum_s round(ratio_s * n_target)`` slots, where ``T`` is
``target_epoch_size`` when set, else ``n_target``. Every epoch fills exactly that.

- Sources: each ``s`` drawn with replacement ``round(ratio_s * n_target)`` times
  (half up, on the decimal ratio), always from the *base* target size, whatever the plan does.
- No plan, no ``target_epoch_size``: every target sample once.
- No plan, ``target_epoch_size`` T: positions ``[epoch*T, (epoch+1)*T)`` of an endless
  cycle of target permutations (one fresh permutation per pass), so the run sees the
  whole target before any sample repeats.
- reweight / fixed_set: ``T`` target draws by systematic resampling: each sample's count
  is the floor or ceiling of ``T * w / sum(w)``.
- dynamic: ``n_target`` target slots; the number of hard slots up to the end of batch
  ``b`` is ``round(hard_pool_frac * (target slots up to b))`` (largest remainder), so the
  epoch's hard share is the configured one within one slot at any batch size, and each
  batch holds the floor or ceiling of its share; each pool is cycled in a fresh
  permutation per pass; hard slots beyond the pool size are the ``shortfall``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsm.config import decimal_fraction
from hsm.plan import Plan

__all__ = ["Schedule", "World", "build_schedule", "systematic_counts", "source_quota", "shard_positions",
           "epoch_length", "cycled_target", "hard_slots_per_batch"]

_SOURCE_STREAM, _TARGET_STREAM, _SHUFFLE_STREAM, _HARD_STREAM, _REGULAR_STREAM, _CYCLE_STREAM = 2, 3, 4, 5, 6, 8


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
    """``round(ratio * n_target)`` on the decimal ratio, halves rounded up."""
    share = decimal_fraction(ratio) * n_target
    return int((share.numerator * 2 + share.denominator) // (2 * share.denominator))


def epoch_length(n_target: int, source_ratios: list[float], target_epoch_size: int | None = None) -> int:
    """Slots in every epoch of a run: ``T + sum_s round(ratio_s * n_target)``."""
    return (target_epoch_size or n_target) + sum(source_quota(r, n_target) for r in source_ratios)


def cycled_target(n_target: int, count: int, *, seed: int, epoch: int) -> np.ndarray:
    """Target indices ``[epoch*count, (epoch+1)*count)`` of an endless cycle of permutations.

    Pass ``c`` of the cycle is ``default_rng([seed, c, _CYCLE_STREAM]).permutation(n_target)``.
    Naive equivalent: ``np.concatenate([perm(c) for c in range(many)])[epoch*count:(epoch+1)*count]``.
    """
    if count == 0 or n_target == 0:
        return np.zeros(0, dtype=np.int64)
    start, stop = epoch * count, (epoch + 1) * count
    out = np.empty(count, dtype=np.int64)
    filled = 0
    for cycle in range(start // n_target, -(-stop // n_target)):
        perm = np.random.default_rng([seed, cycle, _CYCLE_STREAM]).permutation(n_target)
        lo, hi = max(start, cycle * n_target) - cycle * n_target, min(stop, (cycle + 1) * n_target) - cycle * n_target
        out[filled:filled + hi - lo] = perm[lo:hi]
        filled += hi - lo
    return out


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
    target_epoch_size: int | None = None,
) -> Schedule:
    """The epoch's global schedule; ``plan`` is None or a triggered, verified plan.

    ``target_epoch_size`` is the run's (fixed when the sampler is built); a plan that
    carries another one is refused by the sampler before it gets here.
    """
    if len(source_sizes) != len(source_ratios):
        raise ValueError("one ratio per source")
    total = target_epoch_size or n_target
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
    weights = plan.target_weights(n_target) if mode in ("reweight", "fixed_set") else None
    if weights is not None and weights.sum() > 0:
        counts = systematic_counts(weights, total, np.random.default_rng([seed, epoch, _TARGET_STREAM]))
        target = np.repeat(np.arange(n_target, dtype=np.int64), counts)
        del counts
        target[hard_mask[target]] |= _HARD_BIT
    elif target_epoch_size is None and mode != "dynamic":
        target = np.arange(n_target, dtype=np.int64)
    elif mode == "dynamic":
        target = np.zeros(n_target, dtype=np.int64)  # placeholders, filled per batch below
    else:  # target_epoch_size before the plan applies (or a plan with nothing to draw)
        target = cycled_target(n_target, total, seed=seed, epoch=epoch)
    slots = np.concatenate([target, *pieces])
    del target, pieces
    np.random.default_rng([seed, epoch, _SHUFFLE_STREAM]).shuffle(slots)  # in place
    shortfall = 0
    if mode == "dynamic":
        shortfall = _mix_batches(slots, hard_mask, float(plan.manifest["hard_pool_frac"]), batch_size, seed, epoch)
    return Schedule(slots=slots, epoch=epoch, shortfall=shortfall)


def hard_slots_per_batch(target_per_batch: np.ndarray, frac: float) -> np.ndarray:
    """Hard slots of each batch: ``round(frac * cumulative target slots)`` differenced (largest remainder).

    The epoch total is ``round(frac * T)``, within half a slot of the configured share,
    and each batch gets the floor or ceiling of ``frac * t_b``; at batch size 1 the
    hard slots are spread evenly over the batches instead of rounding to zero.
    Naive equivalent: ``[round(frac * sum(t[:b+1])) - round(frac * sum(t[:b])) for b in ...]``.
    """
    share = decimal_fraction(frac).limit_denominator(1_000_000_000)
    cumulative = np.cumsum(np.asarray(target_per_batch, dtype=np.int64))
    through = (cumulative * share.numerator * 2 + share.denominator) // (2 * share.denominator)
    return np.diff(through, prepend=0)


def _mix_batches(slots: np.ndarray, hard_mask: np.ndarray, frac: float, batch_size: int, seed: int, epoch: int) -> int:
    """Fill the target slots of every batch in place: hard first, then regular; returns the shortfall."""
    target_slots = np.flatnonzero((slots >> _CODE_SHIFT) == 0)
    batch_of = target_slots // batch_size
    # rank of each target slot among its batch's target slots
    first_in_batch = np.r_[0, np.flatnonzero(np.diff(batch_of)) + 1]
    starts = np.repeat(first_in_batch, np.diff(np.r_[first_in_batch, len(target_slots)]))
    rank_in_batch = np.arange(len(target_slots)) - starts
    per_batch = np.bincount(batch_of, minlength=int(batch_of.max(initial=-1)) + 1)
    hard_per_batch = hard_slots_per_batch(per_batch, frac)
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
