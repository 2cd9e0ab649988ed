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

How (the memory and time budget at 20M slots is one packed array): the slots are one
``np.empty`` array, int32 when the codes and indices fit (else int64), filled in place
chunk by chunk. The epoch is cut into chunks of ``chunk_slots`` positions; how many
slots of each dataset fall in each chunk is drawn by a multivariate hypergeometric, the
target draws are dealt to the chunks in random order (:func:`random_permutation`'s
two-level shuffle), the source draws are made per chunk, and each chunk is shuffled
where it lies in cache. The result is a uniformly random order of the epoch's multiset,
like one global shuffle, at a fraction of its cache misses. In dynamic mode the chunks
are whole batches, mixed as they are laid out; when one partial pass of the regular pool
covers the epoch, that pass (a uniformly random subset) is dealt like the target draws.
``chunk_slots`` is part of the schedule's definition (a constant, never derived from the
machine), so the schedule stays a pure function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from hsm.config import decimal_fraction
from hsm.mining.plan import Plan
from hsm.world import World

__all__ = ["Schedule", "World", "build_schedule", "systematic_counts", "source_quota", "shard_positions",
           "epoch_length", "cycled_target", "hard_slots_per_batch", "random_permutation", "slot_bits",
           "CHUNK_SLOTS"]

_SOURCE_STREAM, _TARGET_STREAM, _SHUFFLE_STREAM, _HARD_STREAM, _REGULAR_STREAM, _CYCLE_STREAM = 2, 3, 4, 5, 6, 8
_DEAL_STREAM = 9

CHUNK_SLOTS = 1 << 16
"""Slots per chunk of work (64K: an int64 chunk is 512 KiB, inside L2). Part of the schedule's definition."""

# The multivariate hypergeometric that splits an epoch over chunks needs fewer than 10**9 items.
_MAX_SLOTS = 10**9 - 1


_IDX_BITS_64 = 40


def slot_bits(max_size: int, n_codes: int) -> tuple[np.dtype, int]:
    """``(dtype, idx_bits)`` of the packed slot ``code << (idx_bits + 1) | is_hard << idx_bits | base_idx``.

    int32 when the code, the hard bit and every index fit in 31 bits (e.g. indices
    below 2**27 with up to 8 codes), else int64 with 40 index bits.
    """
    code_bits = max(1, (max(n_codes, 1) - 1).bit_length())
    idx_bits = 31 - 1 - code_bits
    if max_size <= 1 << idx_bits:
        return np.dtype(np.int32), idx_bits
    if max_size > 1 << _IDX_BITS_64 or code_bits > 63 - 1 - _IDX_BITS_64:
        raise ValueError(f"datasets of {max_size} samples with {n_codes} codes do not fit a 64-bit slot")
    return np.dtype(np.int64), _IDX_BITS_64


@dataclass(frozen=True)
class Schedule:
    """One epoch's global schedule; ``len(schedule)`` slots.

    Slots are packed into one integer each, ``code << (idx_bits + 1) | is_hard << idx_bits
    | base_idx`` (int32 where it fits, see :func:`slot_bits`), so a 20M-slot epoch is
    one 80 MB array; the views below decode it.
    """

    slots: np.ndarray
    epoch: int
    shortfall: int = 0
    idx_bits: int = _IDX_BITS_64

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def dataset(self) -> np.ndarray:
        """Dataset code per slot (0 = target)."""
        return (self.slots >> (self.idx_bits + 1)).astype(np.int16)

    @property
    def base_idx(self) -> np.ndarray:
        return self.slots & ((1 << self.idx_bits) - 1)

    @property
    def is_hard(self) -> np.ndarray:
        return (self.slots & (1 << self.idx_bits)) != 0

    def counts(self) -> np.ndarray:
        """Slots per dataset code."""
        dataset = self.dataset
        return np.bincount(dataset, minlength=int(dataset.max(initial=0)) + 1)

    def decode(self, start: int, stop: int) -> tuple[list[int], list[int], list[bool]]:
        """``(codes, base_idx, is_hard)`` of slots ``start:stop`` as Python lists."""
        return self._decode(self.slots[start:stop])

    def decode_at(self, positions: np.ndarray) -> tuple[list[int], list[int], list[bool]]:
        """``(codes, base_idx, is_hard)`` of the slots at ``positions`` as Python lists."""
        return self._decode(self.slots[positions])

    def _decode(self, chunk: np.ndarray) -> tuple[list[int], list[int], list[bool]]:
        hard = 1 << self.idx_bits
        return ((chunk >> (self.idx_bits + 1)).tolist(), (chunk & (hard - 1)).tolist(), ((chunk & hard) != 0).tolist())


def source_quota(ratio: float, n_target: int) -> int:
    """``round(ratio * n_target)`` on the decimal ratio, halves rounded up."""
    share = decimal_fraction(ratio) * n_target
    return int((share.numerator * 2 + share.denominator) // (2 * share.denominator))


def epoch_length(n_target: int, source_ratios: list[float], target_epoch_size: int | None = None) -> int:
    """Slots in every epoch of a run: ``T + sum_s round(ratio_s * n_target)``."""
    return (target_epoch_size or n_target) + sum(source_quota(r, n_target) for r in source_ratios)


def _deal(pieces: Iterable[np.ndarray], starts: np.ndarray, capacity: np.ndarray, out: np.ndarray,
          rng: np.random.Generator, discard: int = 0) -> None:
    """Deal the concatenated ``pieces`` to the buckets ``out[starts[j]:starts[j] + capacity[j]]`` in random order.

    Each piece is shuffled, and how many of its items go to each bucket is drawn from
    the multivariate hypergeometric over the buckets' remaining room: every assignment
    of items to buckets (with the buckets' sizes fixed) is equally likely. Within a
    bucket the items lie piece by piece; the caller shuffles each bucket. ``discard``
    items go to one more bucket that is dropped (the rest are a uniform random subset).
    """
    cursor = np.array(starts, dtype=np.int64)
    room = np.append(np.asarray(capacity, dtype=np.int64), discard)
    buffer = np.empty(0, dtype=np.int64)
    for piece in pieces:
        size = len(piece)
        if size == 0:
            continue
        if len(buffer) < size:
            buffer = np.empty(size, dtype=np.int64)
        work = buffer[:size]
        work[:] = piece
        rng.shuffle(work)  # int64 in place: numpy's fast path
        taken = rng.multivariate_hypergeometric(room, size)
        room -= taken
        kept, taken = size - int(taken[-1]), taken[:-1]
        # One scatter: item i of the piece goes to cursor[bucket(i)] + (i - first item of its bucket).
        first = np.cumsum(taken) - taken
        out[np.repeat(cursor - first, taken) + np.arange(kept)] = work[:kept].astype(out.dtype, copy=False)
        cursor += taken


def _shuffle_chunks(out: np.ndarray, chunk: int, rng: np.random.Generator) -> None:
    """Shuffle ``out[i*chunk:(i+1)*chunk]`` in place for every ``i``, through one int64 buffer."""
    buffer = np.empty(min(chunk, len(out)), dtype=np.int64)
    for lo in range(0, len(out), chunk):
        work = buffer[:len(out[lo:lo + chunk])]
        work[:] = out[lo:lo + chunk]
        rng.shuffle(work)
        out[lo:lo + len(work)] = work


def _pieces(values: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(values), chunk):
        yield values[lo:lo + chunk]


def _range_pieces(n: int, chunk: int) -> Iterator[np.ndarray]:
    for lo in range(0, n, chunk):
        yield np.arange(lo, min(n, lo + chunk), dtype=np.int64)


def _bucket_bounds(n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, n, chunk, dtype=np.int64)
    return starts, np.minimum(chunk, n - starts)


def _permute_into(pieces: Iterable[np.ndarray], out: np.ndarray, rng: np.random.Generator, chunk: int) -> None:
    """A uniformly random permutation of the concatenated ``pieces`` (``len(out)`` items) written into ``out``.

    Up to ``16 * chunk`` items (8 MiB of int64 at the default, inside the last-level
    cache) one shuffle in place; beyond, dealt to buckets of ``chunk`` and each shuffled.
    """
    if len(out) <= 16 * chunk:
        work = np.empty(len(out), dtype=np.int64)
        filled = 0
        for piece in pieces:
            work[filled:filled + len(piece)] = piece
            filled += len(piece)
        rng.shuffle(work)
        out[:] = work
        return
    starts, capacity = _bucket_bounds(len(out), chunk)
    _deal(pieces, starts, capacity, out, rng)
    _shuffle_chunks(out, chunk, rng)


def random_permutation(n: int, rng: np.random.Generator, *, dtype: np.dtype | type = np.int64,
                       chunk_slots: int = CHUNK_SLOTS) -> np.ndarray:
    """A uniformly random permutation of ``range(n)``, two-level, every step in cache.

    The items are dealt in shuffled pieces of ``chunk_slots`` to buckets of
    ``chunk_slots`` (multivariate hypergeometric counts), then each bucket is
    shuffled (up to ``16 * chunk_slots`` items, one shuffle). Every order is equally
    likely, as with ``rng.permutation(n)`` (another sequence, though), without its
    random accesses over the whole array: at 10M items 3x fewer cache misses.
    """
    if n > _MAX_SLOTS:
        raise ValueError(f"random_permutation supports fewer than 10**9 items, got {n}")
    out = np.empty(n, dtype=dtype)
    _permute_into(_range_pieces(n, chunk_slots), out, rng, chunk_slots)
    return out


def cycled_target(n_target: int, count: int, *, seed: int, epoch: int, chunk_slots: int = CHUNK_SLOTS,
                  dtype: np.dtype | type = np.int64) -> np.ndarray:
    """Target indices ``[epoch*count, (epoch+1)*count)`` of an endless cycle of permutations.

    Pass ``c`` of the cycle is ``random_permutation(n_target, default_rng([seed, c, _CYCLE_STREAM]))``.
    Naive equivalent: ``np.concatenate([perm(c) for c in range(many)])[epoch*count:(epoch+1)*count]``.
    """
    if count == 0 or n_target == 0:
        return np.zeros(0, dtype=dtype)
    start, stop = epoch * count, (epoch + 1) * count
    out = np.empty(count, dtype=dtype)
    filled = 0
    for cycle in range(start // n_target, -(-stop // n_target)):
        lo, hi = max(start, cycle * n_target) - cycle * n_target, min(stop, (cycle + 1) * n_target) - cycle * n_target
        if lo == 0 and hi == n_target:
            _permute_into(_range_pieces(n_target, chunk_slots), out[filled:filled + n_target],
                          np.random.default_rng([seed, cycle, _CYCLE_STREAM]), chunk_slots)
        else:
            perm = random_permutation(n_target, np.random.default_rng([seed, cycle, _CYCLE_STREAM]), dtype=dtype,
                                      chunk_slots=chunk_slots)
            out[filled:filled + hi - lo] = perm[lo:hi]
        filled += hi - lo
    return out


def _check_weights(weights: np.ndarray) -> None:
    # min/max propagate NaN and show +-inf without a temporary mask of the whole array.
    if len(weights) and not (weights.min() >= 0 and np.isfinite(weights.max())):
        raise ValueError("plan weights must be finite and non-negative")


def _systematic_chunks(weights: np.ndarray, total: int, offset: float, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, counts)`` of :func:`systematic_counts`, ``chunk`` weights at a time, bit for bit.

    The cumulative sum carries its running total into the next chunk's first element,
    which is the very addition ``np.cumsum`` makes there (it adds sequentially).
    """
    n = len(weights)
    norm = weights.sum()
    carry, last_edge = 0.0, 0
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        cumulative = weights[lo:hi] / norm
        cumulative[0] += carry
        np.cumsum(cumulative, out=cumulative)
        carry = float(cumulative[-1])
        cumulative *= total
        if hi == n:
            cumulative[-1] = total
        cumulative -= offset
        np.ceil(cumulative, out=cumulative)
        edges = cumulative.astype(np.int64)
        yield lo, np.diff(edges, prepend=last_edge)
        last_edge = int(edges[-1])


def systematic_counts(weights: np.ndarray, total: int, rng: np.random.Generator, *,
                      chunk_slots: int = CHUNK_SLOTS) -> np.ndarray:
    """Counts summing to ``total``, each the floor or ceiling of ``total * w / sum(w)``.

    Systematic resampling: one uniform offset ``u``; sample ``i`` is drawn once for
    every point ``u + k`` (``k = 0..total-1``) inside its cumulative interval:
    ``edges = ceil(total * cumsum(w / sum(w)) - u)`` (last edge ``total``), counts = ``diff(edges)``,
    computed ``chunk_slots`` weights at a time.
    Naive equivalent (higher variance): ``rng.multinomial(total, w / w.sum())``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    _check_weights(weights)
    if total == 0 or len(weights) == 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    counts = np.empty(len(weights), dtype=np.int64)
    for lo, part in _systematic_chunks(weights, total, rng.random(), chunk_slots):
        counts[lo:lo + len(part)] = part
    return counts


def _weighted_pieces(weights: np.ndarray, is_hard: np.ndarray, total: int, rng: np.random.Generator,
                     idx_bits: int, chunk: int) -> Iterator[np.ndarray]:
    """The packed target draws of systematic resampling, in index order, ``chunk`` at most per piece."""
    for lo, counts in _systematic_chunks(weights, total, rng.random(), chunk):
        packed = np.arange(lo, lo + len(counts), dtype=np.int64)
        packed |= is_hard[lo:lo + len(counts)].astype(np.int64) << idx_bits
        drawn = np.repeat(packed, counts)
        yield from _pieces(drawn, chunk)


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
    chunk_slots: int = CHUNK_SLOTS,
) -> Schedule:
    """The epoch's global schedule; ``plan`` is None or a triggered, verified plan.

    ``target_epoch_size`` is the run's (fixed when the sampler is built); a plan that
    carries another one is refused by the sampler before it gets here. ``chunk_slots``
    is part of the schedule's definition (every rank uses the default; tests shrink it
    to cross chunk boundaries with tiny epochs).
    """
    if len(source_sizes) != len(source_ratios):
        raise ValueError("one ratio per source")
    if chunk_slots < 1:
        raise ValueError(f"chunk_slots must be >= 1, got {chunk_slots}")
    if plan is not None and plan.n_target != n_target:
        raise ValueError(f"the plan covers {plan.n_target} target samples, the target has {n_target}")
    total = target_epoch_size or n_target
    quotas = [source_quota(ratio, n_target) for ratio in source_ratios]
    for s, (size, quota) in enumerate(zip(source_sizes, quotas)):
        if quota and size == 0:
            raise ValueError(f"source {s} is empty but its ratio asks for {quota} draws")
    length = total + sum(quotas)
    if length > _MAX_SLOTS:
        raise ValueError(f"an epoch of {length} slots is beyond the 10**9 this schedule supports")
    dtype, idx_bits = slot_bits(max([n_target, *source_sizes]), 1 + len(source_sizes))
    slots = np.empty(length, dtype=dtype)
    mode = plan.mode if plan is not None else None
    mixer = None
    if mode == "dynamic":  # chunks of whole batches: each chunk's target slots are mixed as it is laid out
        mixer = _BatchMixer(plan.is_hard, float(plan.manifest["hard_pool_frac"]), batch_size, seed, epoch, idx_bits,
                            chunk_slots)
        chunk_slots = batch_size * max(1, chunk_slots // batch_size)
    starts, sizes = _bucket_bounds(length, chunk_slots)
    shuffle_rng = np.random.default_rng([seed, epoch, _SHUFFLE_STREAM])
    # Slots of each dataset in each chunk: the counts of a uniformly random order of the epoch's multiset.
    per_chunk = np.empty((len(starts), 1 + len(quotas)), dtype=np.int64)
    left = np.array([total, *quotas], dtype=np.int64)
    for j, size in enumerate(sizes.tolist()):
        per_chunk[j] = shuffle_rng.multivariate_hypergeometric(left, size)
        left -= per_chunk[j]

    if mode in ("reweight", "fixed_set"):
        _check_weights(plan.weight)
    weighted = mode in ("reweight", "fixed_set") and plan.weight.sum() > 0
    regular_per_chunk = None
    if mode == "dynamic":
        # Hard and regular slots per chunk follow from the target slots per chunk (chunks end on batch ends).
        regular_per_chunk = per_chunk[:, 0] - mixer.hard_per_chunk(per_chunk[:, 0])
        if mixer.deals_regular(int(regular_per_chunk.sum())):  # one partial pass: a random subset, dealt
            regular = mixer.regular
            _deal(regular.member_pieces(), starts, regular_per_chunk, slots,
                  np.random.default_rng([seed, epoch, _REGULAR_STREAM]),
                  discard=regular.size - int(regular_per_chunk.sum()))
        else:
            regular_per_chunk = None
    else:  # dynamic fills its target slots per batch, below
        if weighted:
            pieces = _weighted_pieces(plan.weight, plan.is_hard, total,
                                      np.random.default_rng([seed, epoch, _TARGET_STREAM]), idx_bits, chunk_slots)
        elif target_epoch_size is None:
            pieces = _range_pieces(n_target, chunk_slots)
        else:  # target_epoch_size before the plan applies (or a plan with nothing to draw)
            pieces = _pieces(cycled_target(n_target, total, seed=seed, epoch=epoch, chunk_slots=chunk_slots,
                                           dtype=dtype), chunk_slots)
        _deal(pieces, starts, per_chunk[:, 0], slots, np.random.default_rng([seed, epoch, _DEAL_STREAM]))

    source_rng = np.random.default_rng([seed, epoch, _SOURCE_STREAM])
    buffer = np.empty(int(sizes.max(initial=0)), dtype=np.int64)
    for j, (lo, size) in enumerate(zip(starts.tolist(), sizes.tolist())):
        work = buffer[:size]
        n_tgt = int(per_chunk[j, 0])
        if mode != "dynamic":
            work[:n_tgt] = slots[lo:lo + n_tgt]
        elif regular_per_chunk is None:
            work[:n_tgt] = 0  # placeholders, filled per batch
        else:  # the dealt regular samples, and placeholders (the hard bit alone) for the hard ones
            n_regular = int(regular_per_chunk[j])
            work[:n_regular] = slots[lo:lo + n_regular]
            work[n_regular:n_tgt] = 1 << idx_bits
        filled = n_tgt
        for s, (source_size, quota) in enumerate(zip(source_sizes, quotas)):
            k = int(per_chunk[j, 1 + s])
            drawn = work[filled:filled + k]
            drawn[:] = source_rng.integers(0, max(source_size, 1), k, dtype=np.int64)
            drawn |= (s + 1) << (idx_bits + 1)
            filled += k
        shuffle_rng.shuffle(work)
        if mixer is not None:
            mixer.fill(work)
        slots[lo:lo + size] = work
    return Schedule(slots=slots, epoch=epoch, shortfall=mixer.shortfall if mixer is not None else 0, idx_bits=idx_bits)


def _hard_through(cumulative: np.ndarray, frac: float) -> np.ndarray:
    """``round(frac * cumulative)`` (halves up) on the decimal ``frac``, in exact integers."""
    share = decimal_fraction(frac).limit_denominator(1_000_000_000)
    return (cumulative * share.numerator * 2 + share.denominator) // (2 * share.denominator)


def hard_slots_per_batch(target_per_batch: np.ndarray, frac: float) -> np.ndarray:
    """Hard slots of each batch: ``round(frac * cumulative target slots)`` differenced (largest remainder).

    The epoch total is ``round(frac * T)``, within half a slot of the configured share,
    and each batch gets the floor or ceiling of ``frac * t_b``; at batch size 1 the
    hard slots are spread evenly over the batches instead of rounding to zero.
    Naive equivalent: ``[round(frac * sum(t[:b+1])) - round(frac * sum(t[:b])) for b in ...]``.
    """
    return np.diff(_hard_through(np.cumsum(np.asarray(target_per_batch, dtype=np.int64)), frac), prepend=0)


class _PoolCycle:
    """An endless cycle over the indices where ``is_member`` holds, a fresh random permutation per pass.

    One pass lives at a time, in the smallest integer type that holds the indices; a
    pool small enough for one in-cache shuffle keeps its members and reshuffles them.
    """

    def __init__(self, is_member: np.ndarray, member: bool, rng: np.random.Generator, chunk: int):
        self.is_member, self.member, self.rng, self.chunk = is_member, member, rng, chunk
        n_true = int(np.count_nonzero(is_member))
        self.size = n_true if member else len(is_member) - n_true
        self.small = self.size <= 16 * chunk
        dtype = np.int64 if self.small or len(is_member) >= 2**31 else np.int32
        self._dtype = dtype
        self.order: np.ndarray | None = None  # allocated at the first pass: a dealt pool never needs one
        self.used = self.size
        self.passes = 0

    def member_pieces(self) -> Iterator[np.ndarray]:
        for lo in range(0, len(self.is_member), self.chunk):
            part = self.is_member[lo:lo + self.chunk]
            yield np.flatnonzero(part if self.member else ~part) + lo

    def _next_pass(self) -> None:
        if self.order is None:
            self.order = np.empty(self.size, dtype=self._dtype)
        if self.small and self.passes:
            self.rng.shuffle(self.order)  # the same permutation _permute_into draws, from the last pass's order
        else:
            _permute_into(self.member_pieces(), self.order, self.rng, self.chunk)
        self.passes += 1
        self.used = 0

    def take(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            if self.used == self.size:
                self._next_pass()
            k = min(count - filled, self.size - self.used)
            out[filled:filled + k] = self.order[self.used:self.used + k]
            filled += k
            self.used += k
        return out


class _BatchMixer:
    """Fills the target slots of whole batches, chunk by chunk: hard first, then regular.

    The hard slots up to the end of batch ``b`` number ``round(frac * target slots up to
    b)`` (:func:`hard_slots_per_batch`); the running counts carry from chunk to chunk,
    so every chunk must start at a batch boundary.
    """

    def __init__(self, is_hard: np.ndarray, frac: float, batch_size: int, seed: int, epoch: int, idx_bits: int,
                 chunk: int):
        self.hard = _PoolCycle(is_hard, True, np.random.default_rng([seed, epoch, _HARD_STREAM]), chunk)
        self.regular = _PoolCycle(is_hard, False, np.random.default_rng([seed, epoch, _REGULAR_STREAM]), chunk)
        self.frac, self.batch_size, self.idx_bits = frac, batch_size, idx_bits
        self.seen_target = self.seen_through = self.n_hard = 0
        self.regular_dealt = False

    def hard_per_chunk(self, target_per_chunk: np.ndarray) -> np.ndarray:
        """Hard slots of each chunk (each ends on a batch end): the rule at the chunk ends."""
        if self.hard.size == 0:
            return np.zeros_like(target_per_chunk)
        if self.regular.size == 0:
            return target_per_chunk.copy()
        return np.diff(_hard_through(np.cumsum(target_per_chunk), self.frac), prepend=0)

    def deals_regular(self, n_regular: int) -> bool:
        """Whether the regular slots take one partial pass of their pool, dealt to the chunks up front.

        That pass is a uniformly random subset in random order, as the first ``n_regular``
        of a permutation are; the chunk shuffle gives the order, so no pass is permuted.
        """
        self.regular_dealt = 0 < n_regular <= self.regular.size
        return self.regular_dealt

    @property
    def shortfall(self) -> int:
        """Hard slots beyond the hard pool's size (its samples repeat)."""
        return max(0, self.n_hard - self.hard.size)

    def fill(self, work: np.ndarray) -> None:
        """Fill the target slots (code 0) of ``work``, whole batches from a batch boundary, in place."""
        is_target = work < 1 << (self.idx_bits + 1)  # code 0: below the first code bit
        where = np.flatnonzero(is_target)
        # Target slots of this chunk through the end of every batch (index arithmetic, not masks: 5x faster).
        running = is_target.astype(np.int32)
        np.cumsum(running, out=running)
        size = self.batch_size
        ends = running[size - 1::size]
        if len(work) % size:
            ends = np.append(ends, running[-1])
        per_batch = np.diff(ends, prepend=0)
        through = _hard_through(self.seen_target + ends.astype(np.int64), self.frac)
        hard_per_batch = np.diff(through, prepend=self.seen_through)
        self.seen_target, self.seen_through = self.seen_target + len(where), int(through[-1])
        if self.hard.size == 0:
            hard_per_batch = np.zeros_like(per_batch)
        elif self.regular.size == 0:
            hard_per_batch = per_batch
        # Batch b's target slots are where[ends[b-1]:ends[b]]: the first hard_per_batch of them are hard.
        before = ends - per_batch
        regular_per_batch = per_batch - hard_per_batch
        n_hard = int(hard_per_batch.sum())
        hard_rank = np.repeat(before - (np.cumsum(hard_per_batch) - hard_per_batch), hard_per_batch)
        hard_rank += np.arange(n_hard)
        regular_rank = np.repeat(before + hard_per_batch - (np.cumsum(regular_per_batch) - regular_per_batch),
                                 regular_per_batch)
        regular_rank += np.arange(len(where) - n_hard)
        if self.regular_dealt:  # the dealt regular samples, in the shuffled order they lie in
            present = work[where]
            regular = present[np.flatnonzero(present < 1 << self.idx_bits)]
        else:
            regular = self.regular.take(len(where) - n_hard)
        work[where[hard_rank]] = self.hard.take(n_hard) | (1 << self.idx_bits)
        work[where[regular_rank]] = regular
        self.n_hard += n_hard


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
