"""Per-sample statistics from one cross-entropy pass: a pure torch function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsm.encoding import IGNORE_INDEX

__all__ = ["token_losses", "per_sample_stats"]


def token_losses(logits: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy of every supervised token, computed once (shifted labels, -100 masked).

    Returns ``(losses, rows, correct)``: the per-token losses (with grad, float32),
    the batch row of each, and whether the argmax predicted it. Only the supervised
    positions are gathered, so the float32 copy covers answer tokens, not the sequence.
    Naive equivalent of ``losses.sum()``: ``F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
    labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")``.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    picked = logits[:, :-1][mask]
    targets = shift_labels[mask]
    losses = F.cross_entropy(picked.float(), targets, reduction="none")
    with torch.no_grad():
        correct = picked.argmax(dim=-1) == targets
    return losses, rows, correct


def per_sample_stats(losses: torch.Tensor, rows: torch.Tensor, correct: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[3, batch]``: mean token loss, token accuracy and supervised-token count of every sample.

    A sample without supervised tokens gets loss 0, accuracy 0, count 0.
    """
    with torch.no_grad():
        n = torch.zeros(batch_size, device=losses.device, dtype=torch.float32).index_add_(0, rows, torch.ones_like(losses))
        loss_sum = torch.zeros_like(n).index_add_(0, rows, losses.detach())
        hits = torch.zeros_like(n).index_add_(0, rows, correct.float())
        safe = n.clamp(min=1.0)
        return torch.stack([loss_sum / safe, hits / safe, n])
