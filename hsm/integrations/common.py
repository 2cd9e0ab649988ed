"""What every trainer integration shares, and the one call that plugs hsm into a foreign trainer.

:func:`attach` wraps a ``transformers.Trainer`` subclass (mixed with
:class:`hsm.train.trainer.HsmTrainerMixin`) that keeps its own loss: its train dataset becomes a
:class:`SlotDataset` read by hsm's schedule slots, its collator a :class:`MetaCollator` that carries each
row's identity (``hsm_meta``) and answer-token roles past it, and the mixin logs events and plans at epoch end.
The trainer's ``compute_loss`` then calls :meth:`~hsm.train.trainer.HsmTrainerMixin.take_hsm_meta`, computes
:func:`sample_stats` from its own pass and hands them to :meth:`~hsm.train.trainer.HsmTrainerMixin.record_stats`.

A padding-free batch (a collator that concatenates the batch's samples into one row, positions restarting at 0 for
each) still carries one ``hsm_meta`` entry per sample, in order: :class:`MetaCollator` adds which sample each token's
label belongs to (``token_sample``), and :func:`sample_stats` splits the statistics by it.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hsm.config import FusionConfig, MiningConfig, SourceConfig, TargetConfig
from hsm.data.encoding import IGNORE_INDEX, answer_roles_in_ids
from hsm.data.sampler import HsmSampler
from hsm.mining.plan import DatasetInfo
from hsm.train.stats import packed_sample_stats, per_sample_stats, sequence_index, token_samples
from hsm.train.trainer import resume_attempt, write_dataset_info

__all__ = ["attach", "Part", "SlotDataset", "MetaCollator", "fingerprint_ids", "supervised_runs", "packed_layout",
           "sample_stats"]

_TELEMETRY_DEFAULTS = {"augmented": False, "object_capped": False, "oversize": False, "aug_dropped": 0}


def fingerprint_ids(sample_ids: Sequence[str]) -> str:
    """sha256 over the ordered sample ids: a plan is only valid for the same rows in the same order."""
    digest = hashlib.sha256()
    for sample_id in sample_ids:
        digest.update(sample_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class Part:
    """One dataset inside a foreign trainer's train set: its name, the trainer's row of each of its rows (in
    ``base_idx`` order) and each row's stable sample id."""

    name: str
    rows: Sequence[int]
    sample_ids: Sequence[str]


class SlotDataset:
    """A row-indexed dataset read by schedule slots ``(dataset_code, base_idx, is_hard, epoch, position)``.

    Code 0 is the target, codes 1.. the sources, each a :class:`Part` of ``rows`` (by default the target is all
    of ``rows``). ``rows[part.rows[base_idx]]`` is returned unchanged plus ``hsm_meta``: the identity the events
    need. Integer indices (evaluation, a plain sampler) return the row without metadata.
    """

    def __init__(self, rows, name: str, sample_ids: Sequence[str], *, target_rows: Sequence[int] | None = None,
                 sources: Sequence[Part] = ()):
        target = Part(name, list(target_rows) if target_rows is not None else range(len(rows)), list(sample_ids))
        for part in (target, *sources):
            if len(part.sample_ids) != len(part.rows):
                raise ValueError(f"sample_ids: {len(part.sample_ids)} ids for {len(part.rows)} rows of dataset "
                                 f"'{part.name}'")
        self.rows = rows
        self.name = name
        self.parts = [target, *sources]
        self.info = DatasetInfo(name, len(target.rows), fingerprint_ids(target.sample_ids))

    def __len__(self) -> int:
        return len(self.rows)

    # What write_dataset_info reads: target first, then the sources.
    @property
    def names(self) -> list[str]:
        return [part.name for part in self.parts]

    @property
    def sizes(self) -> list[int]:
        return [len(part.rows) for part in self.parts]

    @property
    def target_info(self) -> DatasetInfo:
        return self.info

    def __getitem__(self, slot) -> dict[str, Any]:
        if isinstance(slot, int):
            return self.rows[slot]
        code, base_idx, is_hard, epoch, position = slot
        if not 0 <= code < len(self.parts):
            raise IndexError(f"dataset code {code}: this train set has {len(self.parts)} datasets ({self.names})")
        part = self.parts[code]
        row = dict(self.rows[int(part.rows[int(base_idx)])])
        row["hsm_meta"] = {
            "sample_id": part.sample_ids[int(base_idx)], "dataset": part.name, "base_idx": int(base_idx),
            "epoch": int(epoch), "aug_seed": 0, "drawn_as_hard": bool(is_hard), "position": int(position),
            **_TELEMETRY_DEFAULTS,
        }
        return row


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


def sample_stats(losses: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, meta: dict) -> torch.Tensor:
    """``[6, n_samples]`` statistics of one batch, one column per entry of ``meta`` (pops its ``token_roles`` and
    ``token_sample``): :func:`hsm.train.stats.per_sample_stats` of a padded batch, or split by the sequence
    boundaries with :func:`hsm.train.stats.packed_sample_stats` when the batch was padding-free.

    Args:
        losses: ``[rows, seq - 1]`` token losses of the shifted labels.
        mask: ``[rows, seq - 1]`` supervised tokens.
        correct: ``[rows, seq - 1]`` argmax == label.
        meta: the batch's ``hsm_meta``.
    """
    roles = meta.pop("token_roles", None)
    owners = meta.pop("token_sample", None)
    if owners is None:
        return per_sample_stats(losses, mask, correct, roles)
    return packed_sample_stats(losses, mask, correct, owners, len(meta["sample_id"]), roles)


class MetaCollator:
    """Wraps a collator: pops ``hsm_meta`` from each item, collates the rest, adds ``batch['hsm_meta']`` (lists).

    With a ``tokenizer``, ``batch['hsm_meta']['token_roles']`` (``[rows, seq]`` int8, aligned with
    ``batch['input_ids']``) gives each token's role for ``coord_loss`` / ``label_loss``: the answers of each item
    (``answers(item)``, read before the inner collator sees the item; None: the decoded supervised runs of the
    collated row) are located in the collated ids by their tokens.

    When the inner collator is padding-free (fewer rows than items), ``batch['hsm_meta']['token_sample']``
    (:func:`packed_layout`) says which item each label belongs to, and ``input_len`` is each item's own length.
    """

    def __init__(self, inner: Callable[[list[dict]], dict], tokenizer=None,
                 answers: Callable[[dict], list[str]] | None = None):
        self.inner = inner
        self.tokenizer = tokenizer
        self.answers = answers
        self._warned = False

    def __call__(self, items: list[dict]) -> dict:
        metas = [item.pop("hsm_meta", None) for item in items]
        texts = [self.answers(item) for item in items] if self.tokenizer is not None and self.answers else None
        items = list(items)  # ms-swift's padding-free collator replaces the list's contents with the packed row
        n_items = len(items)
        batch = self.inner(items)
        if metas and metas[0] is not None:
            meta = {key: [m[key] for m in metas] for key in metas[0]}
            input_ids = batch.get("input_ids")
            if input_ids is not None and input_ids.shape[0] != n_items:
                meta["token_sample"], meta["input_len"] = packed_layout(batch, n_items)
            else:
                mask = batch.get("attention_mask")
                meta["input_len"] = mask.sum(dim=1).tolist() if mask is not None else [0] * n_items
            if self.tokenizer is not None:
                meta["token_roles"] = self._roles(batch, texts, meta.get("token_sample"))
            batch["hsm_meta"] = meta
        return batch

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
            warnings.warn(f"hsm: {missing} answer(s) in a batch tokenise differently alone than in context; their "
                          "coord_loss / label_loss are NaN", stacklevel=2)
        return torch.from_numpy(roles)


def attach(trainer, rows, name: str, *, mining: MiningConfig | None, seed: int, sample_ids: Sequence[str] | None = None,
           hsm_dir: str | Path | None = None, tokenizer=None, answers: Callable[[dict], list[str]] | None = None,
           world=None, run_id: str | None = None, target_rows: Sequence[int] | None = None,
           sources: Sequence[Part] = ()) -> SlotDataset:
    """Plug hsm into ``trainer``, a Trainer subclass mixed with ``HsmTrainerMixin`` that keeps its own loss.

    Replaces ``trainer.train_dataset`` with a :class:`SlotDataset` over ``rows`` and ``trainer.data_collator``
    with a :class:`MetaCollator` around it, writes ``dataset.json``, and starts the mixin on hsm's schedule
    (``setup_hsm(owns_loss=False)``; with ``mining=None`` only the schedule, no events). Collective
    (:func:`~hsm.train.trainer.resume_attempt`): call it on every rank.

    Args:
        trainer: the trainer, built with its own dataset and collator.
        rows: the target rows, indexable by row number (the trainer's train dataset).
        name: the target's name in events and plans.
        mining: the mining configuration, or None to train on hsm's schedule without mining.
        seed: the schedule seed (keep it when switching mining on, so epoch 0 is unchanged).
        sample_ids: one stable id per row; default ``<name>:<row>``.
        hsm_dir: default ``<output_dir>/hsm``.
        tokenizer: a fast tokenizer for answer-token roles (``coord_loss`` / ``label_loss``); None: no roles.
        answers: ``item -> assistant texts`` for the roles; None: the decoded supervised runs.
        world: the sampler's world when the trainer's loader is not accelerate-prepared (it then deals
            each rank its batches itself); None otherwise.
        run_id: the run's name in events; default the output directory's name.
        target_rows: the target's rows of ``rows`` (default all of them), when ``rows`` also holds sources.
        sources: the other datasets of ``rows``: never mined, each drawn its own row count per epoch (with
            replacement, as ``hsm train`` draws a source of ratio ``len(source) / len(target)``).

    Returns:
        The :class:`SlotDataset` now training.
    """
    hsm_dir = Path(hsm_dir) if hsm_dir is not None else Path(trainer.args.output_dir) / "hsm"
    ids = [str(i) for i in sample_ids] if sample_ids is not None else []
    n_target = len(target_rows) if target_rows is not None else len(rows)
    if sample_ids is None:
        ids = [f"{name}:{i}" for i in range(n_target)]
    slots = SlotDataset(rows, name, ids, target_rows=target_rows, sources=sources)
    trainer.train_dataset = slots
    trainer.data_collator = MetaCollator(trainer.data_collator, tokenizer=tokenizer, answers=answers)
    ratios = [len(part.rows) / n_target for part in sources]  # source_quota gives back each source's row count
    sampler = HsmSampler(sizes=slots.sizes, ratios=ratios, target=slots.info, seed=seed,
                         batch_size=trainer.args.per_device_train_batch_size,
                         hsm_dir=hsm_dir if mining is not None else None, world=world)
    fusion = FusionConfig(target=TargetConfig(name=name),
                          sources=[SourceConfig(name=part.name, ratio=ratio) for part, ratio in zip(sources, ratios)])
    if trainer.is_world_process_zero():
        if not trainer.args.dataloader_drop_last:
            sampler.warn_if_ranks_repeat(trainer.args.world_size)  # world=None only: accelerate deals the ranks
        hsm_dir.mkdir(parents=True, exist_ok=True)
        write_dataset_info(hsm_dir, slots)
    if mining is None:
        trainer.use_sampler(sampler, fusion)
    else:
        trainer.setup_hsm(mining=mining, fusion=fusion, hsm_dir=hsm_dir, sampler=sampler,
                          num_train_epochs=trainer.args.num_train_epochs, attempt=resume_attempt(hsm_dir),
                          run_id=run_id or Path(trainer.args.output_dir).name, owns_loss=False)
    return slots
