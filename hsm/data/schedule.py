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
target draws are dealt to the chunks in random order (:func:`hsm.data.shuffles.random_permutation`'s
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

import numpy as np

from hsm.data.draws import check_weights, source_quota, weighted_pieces
from hsm.data.mixer import REGULAR_STREAM, BatchMixer
from hsm.data.shuffles import CHUNK_SLOTS, MAX_SLOTS, bucket_bounds, chunk_pieces, cycled_target, deal, range_pieces
from hsm.mining.plan import Plan
from hsm.world import World
__all__ = ["Schedule", "build_schedule", "shard_positions", "slot_bits"]

_SOURCE_STREAM, _TARGET_STREAM, _SHUFFLE_STREAM, _DEAL_STREAM = 2, 3, 4, 9  # and shuffles, mixer: 5, 6, 8


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
    if length > MAX_SLOTS:
        raise ValueError(f"an epoch of {length} slots is beyond the 10**9 this schedule supports")
    dtype, idx_bits = slot_bits(max([n_target, *source_sizes]), 1 + len(source_sizes))
    slots = np.empty(length, dtype=dtype)
    mode = plan.mode if plan is not None else None
    mixer = None
    if mode == "dynamic":  # chunks of whole batches: each chunk's target slots are mixed as it is laid out
        mixer = BatchMixer(plan.is_hard, float(plan.manifest["hard_pool_frac"]), batch_size, seed, epoch, idx_bits,
                            chunk_slots)
        chunk_slots = batch_size * max(1, chunk_slots // batch_size)
    starts, sizes = bucket_bounds(length, chunk_slots)
    shuffle_rng = np.random.default_rng([seed, epoch, _SHUFFLE_STREAM])
    # Slots of each dataset in each chunk: the counts of a uniformly random order of the epoch's multiset.
    per_chunk = np.empty((len(starts), 1 + len(quotas)), dtype=np.int64)
    left = np.array([total, *quotas], dtype=np.int64)
    for j, size in enumerate(sizes.tolist()):
        per_chunk[j] = shuffle_rng.multivariate_hypergeometric(left, size)
        left -= per_chunk[j]

    if mode in ("reweight", "fixed_set"):
        check_weights(plan.weight)
    weighted = mode in ("reweight", "fixed_set") and plan.weight.sum() > 0
    regular_per_chunk = None
    if mode == "dynamic":
        # Hard and regular slots per chunk follow from the target slots per chunk (chunks end on batch ends).
        regular_per_chunk = per_chunk[:, 0] - mixer.hard_per_chunk(per_chunk[:, 0])
        if mixer.deals_regular(int(regular_per_chunk.sum())):  # one partial pass: a random subset, dealt
            regular = mixer.regular
            deal(regular.member_pieces(), starts, regular_per_chunk, slots,
                  np.random.default_rng([seed, epoch, REGULAR_STREAM]),
                  discard=regular.size - int(regular_per_chunk.sum()))
        else:
            regular_per_chunk = None
    else:  # dynamic fills its target slots per batch, below
        if weighted:
            pieces = weighted_pieces(plan.weight, plan.is_hard, total,
                                      np.random.default_rng([seed, epoch, _TARGET_STREAM]), idx_bits, chunk_slots)
        elif target_epoch_size is None:
            pieces = range_pieces(n_target, chunk_slots)
        else:  # target_epoch_size before the plan applies (or a plan with nothing to draw)
            pieces = chunk_pieces(cycled_target(n_target, total, seed=seed, epoch=epoch, chunk_slots=chunk_slots,
                                           dtype=dtype), chunk_slots)
        deal(pieces, starts, per_chunk[:, 0], slots, np.random.default_rng([seed, epoch, _DEAL_STREAM]))

    _lay_out_chunks(slots, starts, sizes, per_chunk, regular_per_chunk, source_sizes, mode=mode, mixer=mixer,
                    idx_bits=idx_bits, shuffle_rng=shuffle_rng,
                    source_rng=np.random.default_rng([seed, epoch, _SOURCE_STREAM]))
    return Schedule(slots=slots, epoch=epoch, shortfall=mixer.shortfall if mixer is not None else 0, idx_bits=idx_bits)


def _lay_out_chunks(slots: np.ndarray, starts: np.ndarray, sizes: np.ndarray, per_chunk: np.ndarray,
                    regular_per_chunk: np.ndarray | None, source_sizes: list[int], *, mode: str | None,
                    mixer: BatchMixer | None, idx_bits: int, shuffle_rng: np.random.Generator,
                    source_rng: np.random.Generator) -> None:
    """Each chunk in cache: its dealt target slots, its source draws, one shuffle (then the mixer's fill)."""
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
        for s, source_size in enumerate(source_sizes):
            k = int(per_chunk[j, 1 + s])
            drawn = work[filled:filled + k]
            drawn[:] = source_rng.integers(0, max(source_size, 1), k, dtype=np.int64)
            drawn |= (s + 1) << (idx_bits + 1)
            filled += k
        shuffle_rng.shuffle(work)
        if mixer is not None:
            mixer.fill(work)
        slots[lo:lo + size] = work


def shard_positions(n_slots: int, batch_size: int, world: World) -> np.ndarray:
    """Positions of this rank's slots: whole batches dealt round robin, no slot repeated.

    As ms-swift's ``BatchSamplerShard`` deals (every rank the same number of batches, a shorter
    last batch, nothing trained twice): the slots left after the last whole round are split
    evenly, each rank taking one shorter batch of them, and the fewer than ``world_size`` slots
    that remain are not trained this epoch. Repeating slots to even the ranks out (accelerate's
    ``even_batches``) would log a sample twice and draw the first batch's datasets beyond their share.
    """
    if world.world_size == 1 or n_slots == 0:
        return np.arange(n_slots, dtype=np.int64)
    per_round = world.world_size * batch_size
    rounds = n_slots // per_round
    batches = np.arange(rounds, dtype=np.int64) * world.world_size + world.rank
    positions = (batches[:, None] * batch_size + np.arange(batch_size)[None, :]).reshape(-1)
    share = (n_slots - rounds * per_round) // world.world_size
    tail = rounds * per_round + world.rank * share + np.arange(share, dtype=np.int64)
    return np.concatenate([positions, tail])
