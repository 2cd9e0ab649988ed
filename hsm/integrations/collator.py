"""The collator wrapper that carries each row's identity and its answer tokens past a foreign trainer's collator.

The statistics count the assistant answer's tokens only (and the end-of-turn token after each answer, as ``hsm
train`` supervises it), whatever the trainer trains on: TRL trains on the prompt too by default, and a prompt's
loss says nothing about how hard the image's answer is. :class:`MetaCollator` hands the statistics the mask of
those tokens (``answer_mask``); the trainer's loss is left alone.

A padding-free batch (a collator that concatenates the batch's samples into one row, positions restarting at 0 for
each) still carries one metadata entry per sample, in order: :class:`MetaCollator` adds which sample each token's
label belongs to (``token_sample``), and :func:`hsm.train.stats.batch_stats` splits the statistics by it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hsm.data.encoding import IGNORE_INDEX, answer_roles_in_ids
from hsm.data.meta import META_KEY, HsmMeta
from hsm.train.stats import sequence_index, token_samples

__all__ = ["MetaCollator", "supervised_runs", "packed_layout", "answer_mask", "supervised_answer_mask"]


def supervised_runs(tokenizer, input_ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """The texts of a row's contiguous supervised runs (``labels != -100``), decoded with special tokens kept:
    the answers as the trainer's template rendered them (ms-swift masks everything but the assistant turns).

    Args:
        tokenizer: the tokenizer that encoded the row.
        input_ids: one row's ids.
        labels: the same row's unshifted labels.
    """
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    if not len(supervised):
        return []
    breaks = np.flatnonzero(np.diff(supervised) > 1) + 1
    return [tokenizer.decode(input_ids[run].tolist(), skip_special_tokens=False)
            for run in np.split(supervised, breaks)]


def packed_layout(batch: dict, n_samples: int) -> tuple[torch.Tensor, list[int]]:
    """``(token_sample, lengths)`` of a padding-free batch: ``n_samples`` samples concatenated into fewer rows.

    ``token_sample`` is :func:`hsm.train.stats.token_samples` of the batch's text positions (``text_position_ids``,
    ms-swift's Qwen-VL templates, else ``position_ids``); ``lengths`` are the samples' token counts.

    Args:
        batch: the collated batch (``input_ids``, ``labels``, positions), on the host.
        n_samples: the items collated into it, in order.

    Raises:
        ValueError: the batch has no 2-D positions to split it by, a row does not start a sample, it holds fewer
            sequences than samples, or a sequence past the last sample has supervised labels.
    """
    positions = batch.get("text_position_ids")
    if positions is None:
        positions = batch.get("position_ids")
    rows = batch["input_ids"].shape[0]
    if positions is None or positions.dim() != 2:
        raise ValueError(f"hsm: a padding-free batch ({n_samples} samples in {rows} row(s)) carries no 2-D "
                         "position_ids or text_position_ids to split its samples by")
    positions = positions.cpu()
    if (positions[:, 0] != 0).any():
        raise ValueError("hsm: a padding-free row does not start at position 0, so its first sample's start is unknown")
    index = sequence_index(positions)
    n_sequences = int(index[-1, -1]) + 1
    labels = batch.get("labels")
    past = index >= n_samples
    if n_sequences < n_samples or (labels is not None and (labels.cpu()[past] != IGNORE_INDEX).any()):
        raise ValueError(f"hsm: a padding-free batch of {n_samples} samples holds {n_sequences} position-0 restarts "
                         "(fewer than its samples, or more with supervised labels past the last sample); hsm cannot "
                         "tell its samples apart")
    lengths = torch.bincount(index[~past], minlength=n_samples)
    return token_samples(positions, n_samples), lengths.tolist()


def answer_mask(tokenizer, input_ids, answers: Sequence[str]) -> np.ndarray:
    """``bool`` per token of one encoded row: the tokens of each answer text and the one token after it (the
    end-of-turn token that closes the assistant turn, which ``hsm train`` supervises with the answer).

    Each answer is tokenised alone and looked up as a contiguous run of ``input_ids``, in order, after the previous
    one. A row where an answer is not found (tokenised differently in context) is all True: its statistics then
    cover every supervised token rather than none.

    Naive equivalent: ``[any(s <= t <= s + len(run) for s, run in located) for t in range(len(input_ids))]``.

    Args:
        tokenizer: the tokenizer that encoded the row.
        input_ids: the row's ids (padding included).
        answers: the row's assistant texts, in order.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    keep = np.zeros(len(ids), dtype=bool)
    cursor = 0
    for answer in answers:
        run = np.asarray(tokenizer(answer, add_special_tokens=False)["input_ids"], dtype=np.int64)
        hits: Sequence[int] = []
        if 0 < len(run) <= len(ids) - cursor:
            windows = np.lib.stride_tricks.sliding_window_view(ids[cursor:], len(run))
            hits = np.flatnonzero((windows == run).all(axis=1))
        if not len(hits):
            return np.ones(len(ids), dtype=bool)
        start = cursor + int(hits[0])
        cursor = start + len(run)
        keep[start:min(cursor + 1, len(ids))] = True
    return keep if answers else np.ones(len(ids), dtype=bool)


def supervised_answer_mask(tokenizer, input_ids, labels) -> np.ndarray:
    """``bool`` per token of one encoded row: its supervised tokens (``labels != -100``, unshifted) less each
    supervised run's trailing whitespace-only tokens (the newline ms-swift's template supervises after
    ``<|im_end|>``), so a run counts its answer and end-of-turn token, as ``hsm train`` supervises them.

    Naive equivalent: for each contiguous run of supervised positions, drop positions from its end while
    ``tokenizer.decode([input_ids[t]]).strip() == ""``.

    Args:
        tokenizer: the tokenizer that encoded the row.
        input_ids: the row's ids.
        labels: the row's unshifted labels.
    """
    keep = np.asarray(labels) != IGNORE_INDEX
    supervised = np.flatnonzero(keep)
    if not len(supervised):
        return keep
    ends = np.append(supervised[np.flatnonzero(np.diff(supervised) > 1)], supervised[-1])
    for end in ends:
        t = int(end)
        while t >= 0 and keep[t] and not tokenizer.decode([int(input_ids[t])]).strip():
            keep[t] = False
            t -= 1
    return keep


class MetaCollator:
    """Wraps a collator: pops ``hsm_meta`` from each item, collates the rest, adds ``batch['hsm_meta']`` (the items'
    :class:`~hsm.data.meta.SampleMeta` stacked into one :class:`~hsm.data.meta.HsmMeta`).

    With a ``tokenizer``, ``batch['hsm_meta'].token_roles`` (``[rows, seq]`` int8, aligned with
    ``batch['input_ids']``) gives each token's role for ``coord_loss`` / ``label_loss``: the answers of each item
    (``answers(item)``, read before the inner collator sees the item; None: the decoded supervised runs of the
    collated row) are located in the collated ids by their tokens.

    When the inner collator is padding-free (fewer rows than items), ``batch['hsm_meta'].token_sample``
    (:func:`packed_layout`) says which item each label belongs to, and ``input_len`` is each item's own length.

    With a ``tokenizer``, ``batch['hsm_meta'].answer_mask`` (``[rows, seq]`` int8) marks the tokens the
    statistics count: :func:`answer_mask` of the ``answers`` texts, or without a getter (a trainer that supervises
    only the assistant turns) :func:`supervised_answer_mask`. The batch comes back a plain ``dict`` (TRL's
    collator returns a ``BatchFeature``), so the trainer's ``_prepare_inputs`` finds ``hsm_meta`` in it.
    """

    def __init__(self, inner: Callable[[list[dict]], dict], tokenizer=None,
                 answers: Callable[[dict], list[str]] | None = None):
        self.inner = inner
        self.tokenizer = tokenizer
        self.answers = answers
        self._warned = False

    def __call__(self, items: list[dict]) -> dict:
        metas = [item.pop(META_KEY, None) for item in items]
        texts = [self.answers(item) for item in items] if self.tokenizer is not None and self.answers else None
        items = list(items)  # ms-swift's padding-free collator replaces the list's contents with the packed row
        n_items = len(items)
        batch = self.inner(items)
        if isinstance(batch, Mapping) and not isinstance(batch, dict):
            batch = dict(batch)
        if metas and metas[0] is not None:
            owners = None
            input_ids = batch.get("input_ids")
            if input_ids is not None and input_ids.shape[0] != n_items:
                owners, lengths = packed_layout(batch, n_items)
            else:
                mask = batch.get("attention_mask")
                lengths = mask.sum(dim=1).tolist() if mask is not None else [0] * n_items
            tokens: dict[str, Any] = {"token_sample": owners, "input_len": tuple(lengths)}
            if self.tokenizer is not None:
                tokens["token_roles"] = self._roles(batch, texts, owners)
                tokens["answer_mask"] = self._answer_mask(batch, texts, owners)
            batch[META_KEY] = HsmMeta.stack(metas).with_tokens(**tokens)
        return batch

    def _answer_mask(self, batch: dict, texts: list[list[str]] | None, owners: torch.Tensor | None) -> torch.Tensor:
        input_ids = batch["input_ids"].cpu().numpy()
        if texts is None:
            labels = batch["labels"].cpu().numpy()
            rows = [supervised_answer_mask(self.tokenizer, ids, row) for ids, row in zip(input_ids, labels)]
        else:
            if owners is not None:
                texts = [[text for i in sorted(set(row[row >= 0].tolist())) for text in texts[i]] for row in owners]
            rows = [answer_mask(self.tokenizer, ids, answers) for ids, answers in zip(input_ids, texts)]
        return torch.from_numpy(np.stack(rows).astype(np.int8))

    def _roles(self, batch: dict, texts: list[list[str]] | None, owners: torch.Tensor | None) -> torch.Tensor:
        input_ids = batch["input_ids"].cpu().numpy()
        labels = batch["labels"].cpu().numpy() if "labels" in batch else None
        if texts is not None and owners is not None:
            # A padding-free row holds several items: its answers are theirs, in order.
            texts = [[text for i in sorted(set(row[row >= 0].tolist())) for text in texts[i]] for row in owners]
        roles = np.zeros(input_ids.shape, dtype=np.int8)
        missing = 0
        for i, ids in enumerate(input_ids):
            answers = texts[i] if texts is not None else supervised_runs(self.tokenizer, ids, labels[i])
            roles[i], lost = answer_roles_in_ids(self.tokenizer, ids, answers)
            missing += lost
        if missing and not self._warned:
            self._warned = True
            counted = " and their rows' statistics count every supervised token" if texts is not None else ""
            warnings.warn(f"hsm: {missing} answer(s) in a batch tokenise differently alone than in context; their "
                          f"coord_loss / label_loss are NaN{counted}", stacklevel=2)
        return torch.from_numpy(roles)
