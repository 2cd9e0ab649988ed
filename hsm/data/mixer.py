"""The dynamic mode's mixer: hard and regular pools cycled, hard slots per batch by largest remainder."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from hsm.config import decimal_fraction
from hsm.data.shuffles import permute_into

__all__ = ["HARD_STREAM", "REGULAR_STREAM", "hard_through", "hard_slots_per_batch", "PoolCycle", "BatchMixer"]

HARD_STREAM, REGULAR_STREAM = 5, 6
"""RNG streams of the hard and the regular pool: ``default_rng([seed, epoch, stream])``."""


def hard_through(cumulative: np.ndarray, frac: float) -> np.ndarray:
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
    return np.diff(hard_through(np.cumsum(np.asarray(target_per_batch, dtype=np.int64)), frac), prepend=0)


class PoolCycle:
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
            self.rng.shuffle(self.order)  # the same permutation permute_into draws, from the last pass's order
        else:
            permute_into(self.member_pieces(), self.order, self.rng, self.chunk)
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


class BatchMixer:
    """Fills the target slots of whole batches, chunk by chunk: hard first, then regular.

    The hard slots up to the end of batch ``b`` number ``round(frac * target slots up to
    b)`` (:func:`hard_slots_per_batch`); the running counts carry from chunk to chunk,
    so every chunk must start at a batch boundary.
    """

    def __init__(self, is_hard: np.ndarray, frac: float, batch_size: int, seed: int, epoch: int, idx_bits: int,
                 chunk: int):
        self.hard = PoolCycle(is_hard, True, np.random.default_rng([seed, epoch, HARD_STREAM]), chunk)
        self.regular = PoolCycle(is_hard, False, np.random.default_rng([seed, epoch, REGULAR_STREAM]), chunk)
        self.frac, self.batch_size, self.idx_bits = frac, batch_size, idx_bits
        self.seen_target = self.seen_through = self.n_hard = 0
        self.regular_dealt = False

    def hard_per_chunk(self, target_per_chunk: np.ndarray) -> np.ndarray:
        """Hard slots of each chunk (each ends on a batch end): the rule at the chunk ends."""
        if self.hard.size == 0:
            return np.zeros_like(target_per_chunk)
        if self.regular.size == 0:
            return target_per_chunk.copy()
        return np.diff(hard_through(np.cumsum(target_per_chunk), self.frac), prepend=0)

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
        through = hard_through(self.seen_target + ends.astype(np.int64), self.frac)
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
