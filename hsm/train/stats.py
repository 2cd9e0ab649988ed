"""Per-sample statistics from one cross-entropy pass: a pure torch function."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hsm.data.encoding import IGNORE_INDEX, ROLE_COORD, ROLE_LABEL
from hsm.data.meta import HsmMeta

__all__ = ["STAT_ROWS", "StatRows", "batch_stats", "causal_lm_loss", "token_losses", "fold_tokens", "stats_from_fold", "per_sample_stats", "CHUNK_TOKENS", "chunked_token_stats", "hidden_token_stats",
           "sequence_index", "token_samples", "packed_sample_stats"]

# The rows of per_sample_stats, in order (the fields of StatRows).
STAT_ROWS = ("loss", "token_acc", "n_tokens", "coord_loss", "label_loss", "loss_sum")


@dataclass(frozen=True)
class StatRows:
    """One micro-batch's per-sample statistics on the host, by name (one array entry per sample).

    On the device they stay one stacked ``[len(STAT_ROWS), batch]`` tensor (:func:`per_sample_stats`), so a
    step's statistics reach the host in a single copy; this names its rows once they are there.
    """

    loss: np.ndarray
    token_acc: np.ndarray
    n_tokens: np.ndarray
    coord_loss: np.ndarray
    label_loss: np.ndarray
    loss_sum: np.ndarray

    @classmethod
    def from_stacked(cls, values: np.ndarray) -> StatRows:
        """Name the rows of a host copy of :func:`per_sample_stats` (``n_tokens`` as int32)."""
        rows = dict(zip(STAT_ROWS, values))
        rows["n_tokens"] = rows["n_tokens"].astype(np.int32)
        return cls(**rows)

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """The rows that are nullable event columns (``coord_loss``, ``label_loss``, ``loss_sum``)."""
        return {"coord_loss": self.coord_loss, "label_loss": self.label_loss, "loss_sum": self.loss_sum}


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
    # Shift the labels, not the logits (as transformers' own loss does): logits[:, :-1] would copy the
    # logits, and their gradient, once more; at a 151,936-token vocabulary that copy was most of the cost.
    padded = F.pad(shift_labels, (0, 1), value=IGNORE_INDEX)
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(), padded.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(padded.shape)[:, :-1]
    mask = shift_labels != IGNORE_INDEX
    with torch.no_grad():
        correct = (logits.argmax(dim=-1)[:, :-1] == shift_labels) & mask
    return losses, mask, correct


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None,
                   supervised: torch.Tensor | None = None, chunk_tokens: int | None = None,
                   predictions: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss of a causal LM, bit-identical to transformers' own (``ForCausalLMLoss``), and the
    per-token statistics from the same ``log_softmax``.

    ``F.cross_entropy`` is ``F.nll_loss(F.log_softmax(x))``; this runs those two steps itself, so the loss, its
    gradient and the memory it keeps are the plain model's, and the per-token losses are a gather from the
    log-probabilities the loss already built (``[tokens]``, no second pass over the vocabulary). The argmax for the
    correctness flags runs over the ``supervised`` positions only, ``chunk_tokens`` rows at a time.

    Naive equivalent of ``loss``: ``transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, vocab,
    num_items_in_batch)``: ``cross_entropy(..., reduction="mean")``, or ``reduction="sum"`` divided by
    ``num_items_in_batch`` when given.

    Args:
        logits: ``[batch, seq, vocab]``, any float dtype (upcast to float32 as transformers does).
        labels: ``[batch, seq]`` unshifted labels, -100 where not supervised.
        num_items_in_batch: the supervised-token count to divide the summed loss by (gradient accumulation,
            tokens averaged across devices), or None for the micro-batch's own token mean.
        supervised: :func:`hsm.data.encoding.supervised_positions` of ``labels`` (any device), or None: the argmax
            then runs over every position.
        chunk_tokens: rows per argmax chunk; default :data:`CHUNK_TOKENS`.
        predictions: ``[batch, seq]`` argmax of ``logits`` that the trainer takes anyway (ms-swift's token
            accuracy), or None; when given, no argmax runs here.

    Returns:
        ``(loss, losses, mask, correct)``: the scalar loss (with grad) and, like :func:`token_losses`,
        ``[batch, seq - 1]`` per-token losses (float32, no grad, 0 where masked), supervised positions and
        argmax == label.
    """
    batch, seq, vocab = logits.shape
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].contiguous().view(-1).to(logits.device)
    log_probs = F.log_softmax(logits.float().view(-1, vocab), dim=1)
    if num_items_in_batch is None:
        loss = F.nll_loss(log_probs, shift_labels, ignore_index=IGNORE_INDEX, reduction="mean")
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(log_probs.device)
        loss = F.nll_loss(log_probs, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch
    with torch.no_grad():
        mask = shift_labels != IGNORE_INDEX
        target = torch.where(mask, shift_labels, 0)
        picked = log_probs.detach().gather(1, target[:, None]).squeeze(1)
        losses = torch.where(mask, -picked, 0.0)
        flat_logits = logits.detach().view(-1, vocab)
        if predictions is not None:
            correct = (predictions.reshape(-1) == target) & mask
        elif supervised is None:
            correct = (flat_logits.argmax(dim=-1) == target) & mask
        else:
            correct = torch.zeros_like(mask)
            rows = supervised.to(logits.device, non_blocking=True)
            step = chunk_tokens or CHUNK_TOKENS
            for start in range(0, rows.numel(), step):  # numel is host metadata: no sync
                chunk = rows[start:start + step]
                hit = flat_logits.index_select(0, chunk).argmax(dim=-1) == target.index_select(0, chunk)
                correct.index_put_((chunk,), hit)

    def unshift(values: torch.Tensor) -> torch.Tensor:
        return values.view(batch, seq)[:, :-1]

    return loss, unshift(losses), unshift(mask), unshift(correct)


def fold_tokens(losses: torch.Tensor, counted: torch.Tensor, correct: torch.Tensor, owner: torch.Tensor,
                n_samples: int, roles: torch.Tensor | None = None) -> torch.Tensor:
    """``[n_samples, 4, 3]`` float32: per sample, per token role (``ROLE_OTHER``, ``ROLE_COORD``, ``ROLE_LABEL``) and
    over all its tokens (slot 3), the sums ``(loss, count, correct)`` of its counted tokens, in one ``index_add_``.

    Every tensor is aligned token for token (any shape, flattened alike); nothing leaves the device and nothing is
    read back, so the fold adds no host sync.

    Naive equivalent of ``out[i, r]``: ``(losses[sel].sum(), sel.sum(), correct[sel].sum())`` with
    ``sel = counted & (owner == i) & (roles == r)`` (slot 3: without the role condition).

    Args:
        losses: per-token losses (0 where not counted is not required).
        counted: the tokens that count (supervised, and owned by a sample).
        correct: argmax == label per token.
        owner: the sample each token belongs to (``0 <= owner < n_samples`` where counted).
        n_samples: the samples of the batch.
        roles: per-token roles (``hsm.data.encoding.ROLE_*``, 0..2), or None: every token ``ROLE_OTHER``.
    """
    with torch.no_grad():
        counted = counted.flatten()
        owner = torch.where(counted, owner.flatten().to(counted.device), n_samples)  # row n_samples collects the rest
        role = roles.flatten().to(counted.device).long() if roles is not None else torch.zeros_like(owner)
        values = torch.stack([torch.where(counted, losses.detach().flatten().float(), 0.0), counted.float(),
                              (correct.flatten() & counted).float()], dim=1)
        slots = 4
        # Each token is added twice, to its role's slot and to the all-tokens slot: one index_add_ for both.
        index = torch.cat([owner * slots + role, owner * slots + 3])
        table = torch.zeros(((n_samples + 1) * slots, 3), dtype=torch.float32, device=counted.device)
        table.index_add_(0, index, values.repeat(2, 1))
        return table.view(n_samples + 1, slots, 3)[:n_samples]


def stats_from_fold(table: torch.Tensor, has_roles: bool) -> torch.Tensor:
    """``[6, n_samples]`` rows :data:`STAT_ROWS` from :func:`fold_tokens`' sums (see :func:`per_sample_stats`)."""
    total = table[:, 3]
    n = total[:, 1]
    safe = n.clamp(min=1.0)
    nan = torch.full_like(n, float("nan"))
    by_role = []
    for role in (ROLE_COORD, ROLE_LABEL):
        loss, count = table[:, role, 0], table[:, role, 1]
        by_role.append(torch.where(count > 0, loss / count.clamp(min=1.0), nan) if has_roles else nan)
    return torch.stack([total[:, 0] / safe, total[:, 2] / safe, n, by_role[0], by_role[1], total[:, 0]])


def per_sample_stats(losses: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
                     token_roles: torch.Tensor | None = None) -> torch.Tensor:
    """``[6, batch]`` float32, rows :data:`STAT_ROWS`, from the one cross-entropy pass.

    - ``loss``: mean token loss; ``token_acc``: argmax accuracy; ``n_tokens``:
      supervised-token count. A sample without supervised tokens gets 0, 0, 0.
    - ``coord_loss`` / ``label_loss``: mean loss over the supervised tokens whose
      role (``token_roles``, ``[batch, seq]`` aligned with the unshifted labels,
      values ``hsm.data.encoding.ROLE_*``) is a box coordinate / a label; NaN when the
      sample has no such token or ``token_roles`` is None.
    - ``loss_sum``: the sum of the sample's token losses (crowded answers weigh more).

    One scatter-add (:func:`fold_tokens`) into ``[batch, roles, (loss sum, count, correct)]``, no host sync.
    Naive equivalent of ``coord_loss[i]``: ``losses[i][mask[i] & (token_roles[i, 1:] == ROLE_COORD)].mean()``.

    Args:
        losses: ``[batch, seq - 1]`` token losses (unreduced cross-entropy of the shifted labels).
        mask: ``[batch, seq - 1]`` supervised tokens (label != -100).
        correct: ``[batch, seq - 1]`` argmax == label.
        token_roles: ``[batch, seq]`` token roles aligned with the unshifted labels, or None.
    """
    batch = mask.shape[0]
    owner = torch.arange(batch, device=mask.device)[:, None].expand(mask.shape)
    roles = token_roles[:, 1:].to(mask.device, non_blocking=True) if token_roles is not None else None
    return stats_from_fold(fold_tokens(losses, mask, correct, owner, batch, roles), token_roles is not None)


def sequence_index(position_ids: torch.Tensor) -> torch.Tensor:
    """``[rows, seq]`` int64: the number of the packed sequence each token is in, counted in row-major order.

    A sequence starts wherever ``position_ids`` is 0: TRL's and ms-swift's padding-free collators restart the
    positions at every sample in one row (and pad with 0, so each padding token reads as a sequence of its own:
    padding must come after the last sample). A token before its row's first 0 gets the previous row's last
    sequence; callers check that every row starts at 0.

    Naive equivalent: ``k = -1; for row in position_ids: for p in row: k += p == 0; out.append(k)``.

    Args:
        position_ids: ``[rows, seq]`` text positions (for Qwen-VL's M-RoPE batches, the text row).
    """
    return (position_ids == 0).flatten().cumsum(0).view(position_ids.shape) - 1


def token_samples(position_ids: torch.Tensor, n_samples: int) -> torch.Tensor:
    """``[rows, seq]`` int64, aligned with the unshifted labels: the packed sample each label belongs to, -1 for
    labels that no position of their own sample predicts (each sample's first token) and for tokens past the
    ``n_samples``-th sequence (padding).

    Naive equivalent of ``out[r, t]``: ``-1 if position_ids[r, t] == 0 or k >= n_samples else k`` with
    ``k = sequence_index(position_ids)[r, t]``.

    Args:
        position_ids: ``[rows, seq]`` positions restarting at 0 for every sample (see :func:`sequence_index`).
        n_samples: the samples the batch holds, in order (the rest of the sequences are padding).
    """
    index = sequence_index(position_ids)
    return torch.where((position_ids == 0) | (index >= n_samples), -1, index)


def packed_sample_stats(losses: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, owners: torch.Tensor,
                        n_samples: int, token_roles: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`per_sample_stats` of a padding-free or packed batch: ``[6, n_samples]``, one column per packed sample,
    each computed as if the sample had been its own row.

    A label counts for sample ``i`` when ``owners`` (:func:`token_samples`) says it is ``i``'s: the label of each
    sample's first token, which only the previous sample's last position "predicts", counts for none. One
    scatter-add (:func:`fold_tokens`): no host sync, no loop over samples.

    Naive equivalent of column ``i``: :func:`per_sample_stats` of a one-row batch holding only the positions ``t``
    with ``owners[:, 1:][t] == i`` (``tests/integrations/test_packing.py`` holds it to each sample computed alone).

    Args:
        losses: ``[rows, seq - 1]`` token losses of the shifted labels.
        mask: ``[rows, seq - 1]`` supervised tokens.
        correct: ``[rows, seq - 1]`` argmax == label.
        owners: ``[rows, seq]`` from :func:`token_samples`, aligned with the unshifted labels.
        n_samples: the number of packed samples (columns of the result).
        token_roles: ``[rows, seq]`` token roles aligned with the unshifted labels, or None.
    """
    owner = owners[:, 1:].to(mask.device, non_blocking=True)
    roles = token_roles[:, 1:].to(mask.device, non_blocking=True) if token_roles is not None else None
    table = fold_tokens(losses, mask & (owner >= 0), correct, owner, n_samples, roles)
    return stats_from_fold(table, token_roles is not None)


# Positions per chunk of the statistics-only cross-entropy: at Qwen-VL's vocabulary (151,936) one float32 chunk is
# 156 MB, against 2.5 GB for the logits of batch 2 x 2,048 tokens.
CHUNK_TOKENS = 256


def _chunked(project, labels: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses, mask, correct)`` like :func:`token_losses`, from ``project(row, positions)``: the logits at
    ``positions`` of ``row`` (they predict ``labels[row, positions + 1]``). Only supervised positions are
    projected, ``chunk_tokens`` at a time: one chunk of float32 logits lives at a time, and the prompt and
    image tokens (most of a VLM row) cost nothing. Which positions are supervised is read on the host once
    (one small transfer per batch)."""
    shift_labels = labels[:, 1:]
    batch, length = shift_labels.shape
    losses = torch.zeros((batch, length), dtype=torch.float32, device=labels.device)
    correct = torch.zeros((batch, length), dtype=torch.bool, device=labels.device)
    mask = shift_labels != IGNORE_INDEX
    supervised = mask.cpu()
    for row in range(batch):
        where = torch.nonzero(supervised[row]).flatten()
        for start in range(0, len(where), chunk_tokens):
            positions = where[start:start + chunk_tokens].to(labels.device)
            logits = project(row, positions)
            target = shift_labels[row, positions].to(logits.device)
            losses[row, positions] = F.cross_entropy(logits.float(), target, reduction="none").to(losses.device)
            correct[row, positions] = (logits.argmax(dim=-1) == target).to(correct.device)
            del logits
    return losses, mask, correct


@torch.no_grad()
def chunked_token_stats(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_losses` without gradient, for a trainer that keeps its own loss.

    The cross-entropy runs over ``chunk_tokens`` positions of one row at a time, so at most one chunk of
    float32 logits exists beside the trainer's own (never a full float32 copy).

    Args:
        logits: ``[batch, seq, vocab]``, any dtype (not modified).
        labels: ``[batch, seq]``, unshifted, -100 where not supervised.
        chunk_tokens: positions per chunk.

    Naive equivalent: ``token_losses(logits.detach(), labels)`` (per-token values equal).
    """
    return _chunked(lambda row, positions: logits[row, positions], labels, chunk_tokens)


@torch.no_grad()
def hidden_token_stats(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                       chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_losses` without gradient from the last hidden states, for losses that never materialise the
    logits (fused / chunked LM-head losses): ``lm_head`` is applied to ``chunk_tokens`` positions at a time.

    Args:
        hidden: ``[batch, seq, hidden]``, the decoder's final (normed) hidden states.
        lm_head: the model's output embeddings (``model.get_output_embeddings()``), LoRA-wrapped or not.
        labels: ``[batch, seq]``, unshifted, -100 where not supervised.
        chunk_tokens: positions per chunk.

    Naive equivalent: ``token_losses(lm_head(hidden), labels)`` for a model without logit scaling or softcapping.
    """
    return _chunked(lambda row, positions: lm_head(hidden[row, positions]), labels, chunk_tokens)


def batch_stats(losses: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, meta: HsmMeta) -> torch.Tensor:
    """``[len(STAT_ROWS), len(meta)]`` statistics of one batch, one column per sample of ``meta``.

    :func:`per_sample_stats` of a padded batch, or split by the sequence boundaries with
    :func:`packed_sample_stats` when the batch was padding-free (``meta.token_sample``). With
    ``meta.answer_mask`` (``[rows, seq]``, aligned with the unshifted labels) only the supervised tokens inside
    it count: the answers, not a prompt the trainer also trains on.

    Args:
        losses: ``[rows, seq - 1]`` token losses of the shifted labels.
        mask: ``[rows, seq - 1]`` supervised tokens.
        correct: ``[rows, seq - 1]`` argmax == label.
        meta: the batch's metadata (its token layouts).
    """
    if meta.answer_mask is not None:
        mask = mask & meta.answer_mask[:, 1:].to(mask.device, non_blocking=True).bool()
        losses, correct = torch.where(mask, losses.detach(), 0.0), correct & mask
    if meta.token_sample is None:
        return per_sample_stats(losses, mask, correct, meta.token_roles)
    return packed_sample_stats(losses, mask, correct, meta.token_sample, len(meta), meta.token_roles)
