"""When a plan applies: ``start_epoch``, plateau detection and ``activate_after_pct``."""

from __future__ import annotations

from hsm.config import MiningConfig

__all__ = ["should_apply", "plateau_epoch"]


def plateau_epoch(epoch_losses: dict[int, float], delta: float) -> int | None:
    """First epoch ``e`` whose mean loss improved on epoch ``e - 1`` by less than ``delta`` (relative).

    ``(L[e-1] - L[e]) <= delta * |L[e-1]|``; None if no epoch qualifies yet.
    """
    for epoch in sorted(epoch_losses):
        previous = epoch_losses.get(epoch - 1)
        if previous is not None and previous - epoch_losses[epoch] <= delta * abs(previous):
            return epoch
    return None


def should_apply(
    epoch: int,
    mining: MiningConfig,
    epoch_losses: dict[int, float],
    num_train_epochs: float | None,
) -> tuple[bool, str]:
    """Whether the plan for ``epoch`` is applied, and why (the reason is logged and stored).

    Args:
        epoch: the epoch the plan is for (0-based).
        mining: the mining config.
        epoch_losses: mean train loss of each folded epoch (< ``epoch``).
        num_train_epochs: planned epochs; required when ``activate_after_pct > 0``.
    """
    if epoch < mining.start_epoch:
        return False, f"epoch {epoch} < start_epoch {mining.start_epoch}"
    if mining.activate_after_pct > 0:
        if num_train_epochs is None:
            raise ValueError(
                "custom.hard_sample_mining.activate_after_pct needs the planned number of epochs: "
                "set training.num_train_epochs in the config or pass --num-epochs"
            )
        if epoch < mining.activate_after_pct * num_train_epochs:
            return False, (
                f"epoch {epoch} < activate_after_pct {mining.activate_after_pct} x {num_train_epochs} epochs"
            )
    if mining.plateau_delta is not None:
        found = plateau_epoch({e: v for e, v in epoch_losses.items() if e < epoch}, mining.plateau_delta)
        if found is None:
            return False, f"no loss plateau (delta {mining.plateau_delta}) before epoch {epoch}"
        return True, f"loss plateau at epoch {found}"
    return True, f"epoch {epoch} >= start_epoch {mining.start_epoch}"
