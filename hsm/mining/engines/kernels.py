"""What every planner engine shares: the fold's output columns and the in-order EMA kernel."""

from __future__ import annotations

import numpy as np

from hsm.mining.state import EPOCH_COLUMNS, FOLD_COLUMNS

__all__ = ["continue_sequential", "output_columns", "OUTPUT_COLUMNS", "EPOCH_OUTPUT_COLUMNS", "ORDER"]

ORDER = ("key", "global_step", "rank", "position")
"""Observation order of an epoch's events: by sample, then by when and where it was seen."""

# What a fold returns: the new state, plus this epoch's observation count ``k`` and the
# event row of each sample's first observation this epoch (``first_row``, -1 if none).
OUTPUT_COLUMNS = (*FOLD_COLUMNS, "k", "first_row")
EPOCH_OUTPUT_COLUMNS = (*FOLD_COLUMNS, *EPOCH_COLUMNS, "k", "first_row")


def output_columns(per_epoch: bool) -> tuple[str, ...]:
    """What a fold returns, with or without the per-epoch aggregates.

    Args:
        per_epoch: whether the state carries ``n_epochs``, ``epoch_mean`` and ``epoch_ema``.
    """
    return EPOCH_OUTPUT_COLUMNS if per_epoch else OUTPUT_COLUMNS


def continue_sequential(starts: np.ndarray, lengths: np.ndarray, x: np.ndarray, ema: np.ndarray, total: np.ndarray,
                        decay: float) -> None:
    """Fold observations ``2..k`` of each group into ``ema`` and ``total``, in place.

    Group ``g``'s observations are ``x[starts[g] : starts[g] + lengths[g]]``, in order;
    ``ema[g]`` and ``total[g]`` already hold the fold of the first one. Vectorised over
    groups, sequential within a group: ``ema = decay * ema + (1 - decay) * v; total = total + v``.

    Args:
        starts: first observation of each group in ``x``.
        lengths: observations of each group (>= 1).
        x: every observation, grouped and ordered.
        ema: per group, updated in place.
        total: per group, updated in place.
        decay: the EMA's decay.
    """
    for j in range(1, int(lengths.max(initial=1))):
        active = np.flatnonzero(lengths > j)
        values = x[starts[active] + j]
        ema[active] = decay * ema[active] + (1.0 - decay) * values
        total[active] = total[active] + values
