"""The identity each training item carries past the collator: who it is, how it was drawn, how it was built.

A dataset returns one :class:`SampleMeta` per item (the fusion dataset under the item's ``"meta"`` key, a
foreign trainer's :class:`~hsm.integrations.slots.SlotDataset` under ``"hsm_meta"``); a collator
stacks a batch's into one :class:`HsmMeta` (``batch["hsm_meta"]``), adding the per-token layouts the
statistics need. The trainer removes it before ``model(**inputs)`` and hands it, with the loss pass's
per-token values, to :meth:`hsm.train.session.MiningSession.record`. Both are frozen: a stage that needs
other token layouts (ms-swift trims them to the kept logits) builds a new one with :meth:`HsmMeta.with_tokens`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["META_KEY", "TELEMETRY", "SampleMeta", "HsmMeta"]

# The batch key (and item key) the metadata rides under.
META_KEY = "hsm_meta"
# What the fusion telemetry counts per dataset, each a SampleMeta field (bools count as 0/1).
TELEMETRY = ("augmented", "object_capped", "oversize", "aug_dropped", "input_len", "drawn_as_hard")


@dataclass(frozen=True)
class SampleMeta:
    """One item's identity and how it was built.

    Attributes:
        sample_id: the logical record's stable id (across epochs and augmented views).
        dataset: the dataset's name (the target's is the one mined).
        base_idx: the record's index in its dataset.
        epoch: the epoch whose schedule drew it.
        drawn_as_hard: drawn from the plan's hard set.
        aug_seed: the seed of its augmentation (0 when none ran).
        augmented: augmentation ran on it.
        object_capped: ``max_objects_per_image`` dropped some of its objects.
        oversize: its image is over the processor's pixel budget (the processor shrinks it).
        aug_dropped: boxes the augmentation dropped.
        input_len: its token count (0 when the collator counts it).
    """

    sample_id: str
    dataset: str
    base_idx: int
    epoch: int
    drawn_as_hard: bool = False
    aug_seed: int = 0
    augmented: bool = False
    object_capped: bool = False
    oversize: bool = False
    aug_dropped: int = 0
    input_len: int = 0


@dataclass(frozen=True)
class HsmMeta:
    """One batch's :class:`SampleMeta` as columns (one entry per sample, in batch order) plus token layouts.

    Attributes:
        sample_id, dataset, base_idx, epoch, drawn_as_hard, aug_seed, augmented, object_capped, oversize,
            aug_dropped, input_len: the samples' :class:`SampleMeta` fields, as tuples.
        token_roles: ``[rows, seq]`` int8 answer-token roles (``hsm.data.encoding.ROLE_*``), aligned with the
            unshifted labels, or None (no ``coord_loss`` / ``label_loss``).
        answer_mask: ``[rows, seq]`` the tokens the statistics count (the answers, not a prompt the trainer also
            trains on), or None: every supervised token.
        token_sample: ``[rows, seq]`` the sample each label belongs to in a padding-free batch
            (:func:`hsm.train.stats.token_samples`), or None for one sample per row.
        supervised_index: :func:`hsm.data.encoding.supervised_positions` of the labels, or None.
    """

    sample_id: tuple[str, ...]
    dataset: tuple[str, ...]
    base_idx: tuple[int, ...]
    epoch: tuple[int, ...]
    drawn_as_hard: tuple[bool, ...]
    aug_seed: tuple[int, ...]
    augmented: tuple[bool, ...]
    object_capped: tuple[bool, ...]
    oversize: tuple[bool, ...]
    aug_dropped: tuple[int, ...]
    input_len: tuple[int, ...]
    token_roles: Any = None
    answer_mask: Any = None
    token_sample: Any = None
    supervised_index: Any = None

    @classmethod
    def stack(cls, samples: Sequence[SampleMeta], **tokens: Any) -> HsmMeta:
        """The batch of ``samples`` (in order); ``tokens`` sets the token layouts (``token_roles``, ...)."""
        columns = {f.name: tuple(getattr(s, f.name) for s in samples) for f in dataclasses.fields(SampleMeta)}
        return cls(**columns, **tokens)

    def with_tokens(self, **tokens: Any) -> HsmMeta:
        """This batch with other token layouts (or ``input_len``)."""
        return dataclasses.replace(self, **tokens)

    def __len__(self) -> int:
        return len(self.sample_id)
