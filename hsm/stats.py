"""Per-sample statistics from one cross-entropy pass: a pure torch function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsm.encoding import IGNORE_INDEX

__all__ = ["token_losses", "per_sample_stats"]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of every position, computed once (shifted labels, -100 masked).

    Returns ``(losses, mask, correct)``, each ``[batch, seq - 1]``: per-token losses
    (float32, with grad, 0 where masked), which positions are supervised, and
    whether the argmax predicted the label there. Dense on purpose: it makes the
    one float32 copy of the logits that the Trainer's own loss makes, and no
    boolean gather, which would stall the GPU with a host sync every step
    (measured in bench/train_overhead.py).
    Naive equivalent of ``losses.sum()``: ``F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
    labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")``.
    """
    shift_labels = labels[:, 1:]
    shift_logits = logits[:, :-1]
    losses = F.cross_entropy(
        shift_logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shift_labels.shape)
    mask = shift_labels != IGNORE_INDEX
    with torch.no_grad():
        correct = (shift_logits.argmax(dim=-1) == shift_labels) & mask
    return losses, mask, correct


def per_sample_stats(losses: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``[3, batch]``: mean token loss, token accuracy and supervised-token count of every sample.

    A sample without supervised tokens gets loss 0, accuracy 0, count 0.
    """
    with torch.no_grad():
        n = mask.sum(dim=1).float()
        safe = n.clamp(min=1.0)
        return torch.stack([losses.detach().sum(dim=1) / safe, correct.sum(dim=1).float() / safe, n])
