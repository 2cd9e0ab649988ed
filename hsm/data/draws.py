"""How many draws each sample and source gets in an epoch: source quotas, systematic resampling of weights."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from hsm.config import decimal_fraction
from hsm.data.shuffles import CHUNK_SLOTS, chunk_pieces

__all__ = ["source_quota", "epoch_length", "check_weights", "systematic_counts", "weighted_pieces"]


def source_quota(ratio: float, n_target: int) -> int:
    """``round(ratio * n_target)`` on the decimal ratio, halves rounded up."""
    share = decimal_fraction(ratio) * n_target
    return int((share.numerator * 2 + share.denominator) // (2 * share.denominator))


def epoch_length(n_target: int, source_ratios: list[float], target_epoch_size: int | None = None) -> int:
    """Slots in every epoch of a run: ``T + sum_s round(ratio_s * n_target)``."""
    return (target_epoch_size or n_target) + sum(source_quota(r, n_target) for r in source_ratios)


def check_weights(weights: np.ndarray) -> None:
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
    check_weights(weights)
    if total == 0 or len(weights) == 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    counts = np.empty(len(weights), dtype=np.int64)
    for lo, part in _systematic_chunks(weights, total, rng.random(), chunk_slots):
        counts[lo:lo + len(part)] = part
    return counts


def weighted_pieces(weights: np.ndarray, is_hard: np.ndarray, total: int, rng: np.random.Generator,
                     idx_bits: int, chunk: int) -> Iterator[np.ndarray]:
    """The packed target draws of systematic resampling, in index order, ``chunk`` at most per piece."""
    for lo, counts in _systematic_chunks(weights, total, rng.random(), chunk):
        packed = np.arange(lo, lo + len(counts), dtype=np.int64)
        packed |= is_hard[lo:lo + len(counts)].astype(np.int64) << idx_bits
        drawn = np.repeat(packed, counts)
        yield from chunk_pieces(drawn, chunk)
