"""What every trainer integration shares, and the one call that plugs hsm into a foreign trainer.

:func:`attach` wraps a ``transformers.Trainer`` subclass (mixed with
:class:`hsm.train.trainer.HsmTrainerMixin`) that keeps its own loss: its train dataset becomes a
:class:`SlotDataset` read by hsm's schedule slots, its collator a :class:`MetaCollator` that carries each
row's identity (``hsm_meta``) and answer-token roles past it, and the mixin logs events and plans at epoch end.
The trainer's ``compute_loss`` then calls :meth:`~hsm.train.trainer.HsmTrainerMixin.take_hsm_meta`, computes
:func:`sample_stats` from its own pass and hands them to :meth:`~hsm.train.trainer.HsmTrainerMixin.record_stats`.

The statistics count the assistant answer's tokens only (and the end-of-turn token after each answer, as ``hsm
train`` supervises it), whatever the trainer trains on: TRL trains on the prompt too by default, and a prompt's
loss says nothing about how hard the image's answer is. :class:`MetaCollator` hands :func:`sample_stats` the mask
of those tokens (``answer_mask``); the trainer's loss is left alone.

:func:`attach` also leaves a whole hsm run under ``hsm/``, as ``hsm train`` does: ``config.yaml`` (the resolved
mining and fusion config, what ``hsm plan`` and ``hsm report`` read without flags), ``dataset.json`` and
``samples.parquet`` (each target row's ``base_idx``, sample id, image path and answer: what ``base_idx`` points
to after the trainer's own loading and shuffling, so the report can show its images).

A padding-free batch (a collator that concatenates the batch's samples into one row, positions restarting at 0 for
each) still carries one ``hsm_meta`` entry per sample, in order: :class:`MetaCollator` adds which sample each token's
label belongs to (``token_sample``), and :func:`sample_stats` splits the statistics by it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hsm.config import FusionConfig, HsmConfig, MiningConfig, SourceConfig, TargetConfig
from hsm.data.encoding import IGNORE_INDEX, answer_roles_in_ids
from hsm.data.sampler import HsmSampler
from hsm.mining.plan import DatasetInfo
from hsm.train.stats import packed_sample_stats, per_sample_stats, sequence_index, token_samples
from hsm.train.trainer import resume_attempt
from hsm.layout import RunPaths

__all__ = ["attach", "Part", "SlotDataset", "MetaCollator", "fingerprint_ids", "fingerprint_contents",
           "supervised_runs", "packed_layout", "sample_stats", "assistant_texts", "row_contents", "answer_mask", "supervised_answer_mask",
           "refuse_unsupported", "write_run_files"]


_TELEMETRY_DEFAULTS = {"augmented": False, "object_capped": False, "oversize": False, "aug_dropped": 0}


def fingerprint_ids(sample_ids: Sequence[str]) -> str:
    """sha256 over the ordered sample ids: a plan is only valid for the same rows in the same order."""
    digest = hashlib.sha256()
    for sample_id in sample_ids:
        digest.update(sample_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def fingerprint_contents(sample_ids: Sequence[str], contents: Sequence[dict]) -> str:
    """sha256 over each row's id and the content it names (image paths or digests, answer, ``objects``), in order.

    An id that is a position (ms-swift's ``<name>:<row>``) then changes the fingerprint when the row at that
    position changes (another shuffle, another file), so a plan built for other rows is refused.

    Naive equivalent: ``sha256("".join(f"{id}\\0{json.dumps(content, sort_keys=True)}\\0" for ...))``.

    Args:
        sample_ids: one id per row.
        contents: :func:`row_contents` of the same rows.
    """
    digest = hashlib.sha256()
    for sample_id, content in zip(sample_ids, contents, strict=True):
        digest.update(sample_id.encode())
        digest.update(b"\0")
        digest.update(json.dumps(content, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def assistant_texts(row: dict) -> list[str]:
    """The assistant turns' texts of a conversational row (``messages``), in order.

    Args:
        row: a dataset row with ``messages``; content a string or a list of ``{"type": "text", "text": ...}`` parts.
    """
    texts = []
    for message in row.get("messages") or []:
        if message.get("role") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif content:
            texts.append("".join(part.get("text") or "" for part in content if part.get("type") == "text"))
    return texts


def _image_names(images) -> list[str]:
    """Each image of a row as a path, or ``sha256:<hex>`` of its bytes when it carries no path."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        images = [images]
    names = []
    for image in images:
        if isinstance(image, Mapping):  # datasets' Image storage, or ms-swift's {"path", "bytes"}
            path, data = image.get("path"), image.get("bytes")
        else:
            path, data = (image, None) if isinstance(image, str) else (getattr(image, "filename", None) or None, None)
        if path:
            names.append(str(path))
        elif data:
            names.append("sha256:" + hashlib.sha256(data).hexdigest())
        else:
            names.append("")
    return names


def row_contents(rows) -> list[dict]:
    """What each row of a conversational dataset names: ``{"images", "answer", "objects"}`` (image paths, or
    digests of embedded bytes; the assistant turns joined by newlines; ms-swift's ``objects`` column as JSON).

    A Hugging Face ``datasets.Dataset`` is read as Arrow, so no image is decoded; anything else row by row.

    Args:
        rows: rows with ``messages`` and optionally ``images`` and ``objects``.
    """
    columns = getattr(rows, "column_names", None)
    if columns is not None and hasattr(rows, "with_format"):
        keep = [c for c in ("messages", "images", "objects") if c in columns]
        table = rows.select_columns(keep).with_format("arrow")[:] if keep else None
        records = table.to_pylist() if table is not None else [{} for _ in range(len(rows))]
    else:
        records = [rows[i] for i in range(len(rows))]
    out = []
    for row in records:
        # ms-swift stores messages and objects as JSON text in Arrow (its Json feature), decoded only on access.
        messages = [json.loads(m) if isinstance(m, str) else m for m in row.get("messages") or []]
        objects = row.get("objects")
        objects = json.loads(objects) if isinstance(objects, str) else objects
        answer = "\n".join(assistant_texts({"messages": messages}))
        out.append({"images": _image_names(row.get("images")), "answer": answer,
                    "objects": json.dumps(objects, sort_keys=True) if objects else None})
    return out


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
    need. Integer indices (evaluation, a plain sampler) return the row without metadata. The target's fingerprint
    covers each id and, given ``target_contents`` (:func:`row_contents` of the target rows), what it names.
    """

    def __init__(self, rows, name: str, sample_ids: Sequence[str], *, target_rows: Sequence[int] | None = None,
                 sources: Sequence[Part] = (), target_contents: Sequence[dict] | None = None):
        target = Part(name, list(target_rows) if target_rows is not None else range(len(rows)), list(sample_ids))
        for part in (target, *sources):
            if len(part.sample_ids) != len(part.rows):
                raise ValueError(f"sample_ids: {len(part.sample_ids)} ids for {len(part.rows)} rows of dataset "
                                 f"'{part.name}'")
        self.rows = rows
        self.name = name
        self.parts = [target, *sources]
        fingerprint = (fingerprint_ids(target.sample_ids) if target_contents is None
                       else fingerprint_contents(target.sample_ids, target_contents))
        self.info = DatasetInfo(name, len(target.rows), fingerprint)

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
    """``[6, n_samples]`` statistics of one batch, one column per entry of ``meta`` (pops its ``token_roles``,
    ``token_sample`` and ``answer_mask``): :func:`hsm.train.stats.per_sample_stats` of a padded batch, or split by
    the sequence boundaries with :func:`hsm.train.stats.packed_sample_stats` when the batch was padding-free.

    With ``answer_mask`` (``[rows, seq]``, aligned with the unshifted labels) only the supervised tokens inside it
    count: the answers, not a prompt the trainer also trains on.

    Args:
        losses: ``[rows, seq - 1]`` token losses of the shifted labels.
        mask: ``[rows, seq - 1]`` supervised tokens.
        correct: ``[rows, seq - 1]`` argmax == label.
        meta: the batch's ``hsm_meta``.
    """
    roles = meta.pop("token_roles", None)
    owners = meta.pop("token_sample", None)
    answers = meta.pop("answer_mask", None)
    if answers is not None:
        mask = mask & answers[:, 1:].to(mask.device, non_blocking=True).bool()
        losses, correct = torch.where(mask, losses.detach(), 0.0), correct & mask
    if owners is None:
        return per_sample_stats(losses, mask, correct, roles)
    return packed_sample_stats(losses, mask, correct, owners, len(meta["sample_id"]), roles)


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
    """Wraps a collator: pops ``hsm_meta`` from each item, collates the rest, adds ``batch['hsm_meta']`` (lists).

    With a ``tokenizer``, ``batch['hsm_meta']['token_roles']`` (``[rows, seq]`` int8, aligned with
    ``batch['input_ids']``) gives each token's role for ``coord_loss`` / ``label_loss``: the answers of each item
    (``answers(item)``, read before the inner collator sees the item; None: the decoded supervised runs of the
    collated row) are located in the collated ids by their tokens.

    When the inner collator is padding-free (fewer rows than items), ``batch['hsm_meta']['token_sample']``
    (:func:`packed_layout`) says which item each label belongs to, and ``input_len`` is each item's own length.

    With a ``tokenizer``, ``batch['hsm_meta']['answer_mask']`` (``[rows, seq]`` int8) marks the tokens the
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
        metas = [item.pop("hsm_meta", None) for item in items]
        texts = [self.answers(item) for item in items] if self.tokenizer is not None and self.answers else None
        items = list(items)  # ms-swift's padding-free collator replaces the list's contents with the packed row
        n_items = len(items)
        batch = self.inner(items)
        if isinstance(batch, Mapping) and not isinstance(batch, dict):
            batch = dict(batch)
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
                meta["answer_mask"] = self._answer_mask(batch, texts, meta.get("token_sample"))
            batch["hsm_meta"] = meta
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


def refuse_unsupported(mining: MiningConfig | None, stack: str, source: str = "<config>") -> None:
    """Refuse, at start-up, mining settings the foreign-trainer integrations cannot follow.

    ``metric: det_f1`` needs hsm's own generation pass over the target (``hsm train``); under another stack no
    such pass runs, so every plan would be empty.

    Args:
        mining: the mining config (None: nothing to check).
        stack: the trainer's name in the message (``TRL``, ``ms-swift``).
        source: the config file, for the message.
    """
    from hsm.config import ConfigError

    if mining is not None and mining.metric == "det_f1":
        raise ConfigError(source, [
            f"custom.hard_sample_mining.metric: 'det_f1' is measured by hsm train's own generation pass, which "
            f"{stack} does not run (every plan would be empty); use loss, token_acc or a box-aware metric under "
            f"{stack}, or train with hsm train"])


def write_run_files(hsm_dir: Path, slots: SlotDataset, contents: Sequence[dict], mining: MiningConfig | None,
                    fusion: FusionConfig, config: HsmConfig | None = None) -> None:
    """Write what ``hsm plan`` and ``hsm report`` read from a run, as ``hsm train`` leaves it (rank 0 only).

    ``config.yaml``: ``config`` (or an empty one) with the mining config resolved (its defaults filled in;
    disabled when ``mining`` is None) and ``fusion`` (the datasets actually trained on). ``dataset.json``: the
    datasets and the target's fingerprint. ``samples.parquet``: one row per target ``base_idx``: ``sample_id``,
    ``image`` (the first image's path or digest), ``answer`` and ``objects`` (:func:`row_contents`).
    Each is written with its sha256 record (:func:`hsm.io.write_recorded`), as ``hsm train`` writes its run files.

    Args:
        hsm_dir: the run's hsm directory.
        slots: the trainer's :class:`SlotDataset`.
        contents: :func:`row_contents` of the target rows, in ``base_idx`` order.
        mining: the mining config in force, or None.
        fusion: the datasets as the sampler draws them.
        config: the user's hsm config (ms-swift's ``HSM_CONFIG``), or None.
    """
    import pyarrow as pa
    import yaml

    from hsm.io import parquet_bytes, write_recorded
    from hsm.train.trainer import write_dataset_info

    base = config if config is not None else HsmConfig()
    resolved = mining if mining is not None else (base.custom.hard_sample_mining or MiningConfig()).model_copy(
        update={"enabled": False})
    custom = base.custom.model_copy(update={"hard_sample_mining": resolved, "fusion_config": fusion})
    payload = {"model": {"coord_format": base.model.coord_format},
               "custom": custom.model_dump(mode="json")}
    hsm_dir.mkdir(parents=True, exist_ok=True)
    write_recorded(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True).encode("utf-8"),
                   RunPaths.at(hsm_dir).config)
    write_dataset_info(hsm_dir, slots)
    target = slots.parts[0]
    table = pa.table({
        "base_idx": pa.array(range(len(target.rows)), pa.int64()),
        "sample_id": pa.array([str(i) for i in target.sample_ids], pa.string()),
        "image": pa.array([(c["images"] or [None])[0] for c in contents], pa.string()),
        "answer": pa.array([c["answer"] for c in contents], pa.string()),
        "objects": pa.array([c["objects"] for c in contents], pa.string()),
    })
    write_recorded(parquet_bytes(table), RunPaths.at(hsm_dir).samples)


def attach(trainer, rows, name: str, *, mining: MiningConfig | None, seed: int, sample_ids: Sequence[str] | None = None,
           hsm_dir: str | Path | None = None, tokenizer=None, answers: Callable[[dict], list[str]] | None = None,
           world=None, run_id: str | None = None, target_rows: Sequence[int] | None = None,
           sources: Sequence[Part] = (), raw=None, config: HsmConfig | None = None, stack: str = "this trainer"
           ) -> SlotDataset:
    """Plug hsm into ``trainer``, a Trainer subclass mixed with ``HsmTrainerMixin`` that keeps its own loss.

    Replaces ``trainer.train_dataset`` with a :class:`SlotDataset` over ``rows`` and ``trainer.data_collator``
    with a :class:`MetaCollator` around it, writes the run's files (:func:`write_run_files`), and starts the mixin
    on hsm's schedule (``setup_hsm(owns_loss=False)``; with ``mining=None`` only the schedule, no events).
    Collective (:func:`~hsm.train.trainer.resume_attempt`): call it on every rank.

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
        raw: the rows before the trainer's encoding, with ``messages`` (and ``images``, ``objects``), row for row
            with ``rows``; default ``rows``. What each id names (:func:`row_contents`) is read from them.
        config: the user's hsm config, written resolved to ``hsm/config.yaml``; None: the mining config alone.
        stack: the trainer's name in start-up errors.

    Returns:
        The :class:`SlotDataset` now training.
    """
    refuse_unsupported(mining, stack, config.source if config is not None else "<config>")
    hsm_dir = Path(hsm_dir) if hsm_dir is not None else RunPaths.of(trainer.args.output_dir).root
    ids = [str(i) for i in sample_ids] if sample_ids is not None else []
    n_target = len(target_rows) if target_rows is not None else len(rows)
    if sample_ids is None:
        ids = [f"{name}:{i}" for i in range(n_target)]
    every_row = row_contents(raw if raw is not None else rows)
    contents = [every_row[i] for i in target_rows] if target_rows is not None else every_row
    slots = SlotDataset(rows, name, ids, target_rows=target_rows, sources=sources, target_contents=contents)
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
        write_run_files(hsm_dir, slots, contents, mining, fusion, config)
    if mining is None:
        trainer.use_sampler(sampler, fusion)
    else:
        trainer.setup_hsm(mining=mining, fusion=fusion, hsm_dir=hsm_dir, sampler=sampler,
                          num_train_epochs=trainer.args.num_train_epochs, attempt=resume_attempt(hsm_dir),
                          run_id=run_id or Path(trainer.args.output_dir).name, owns_loss=False)
    return slots
