"""A foreign trainer's train set as hsm's schedule reads it: rows addressed by schedule slots, each with its identity.

:class:`SlotDataset` wraps the trainer's own rows (TRL's or ms-swift's train dataset): the target and any
sources are :class:`Part` s of it, and a slot ``(dataset_code, base_idx, is_hard, epoch, position)`` returns
the row plus its :class:`~hsm.data.meta.SampleMeta`. The target's fingerprint covers each id and what it
names (:func:`row_contents`), so a plan built for other rows is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

from hsm.data.meta import META_KEY, SampleMeta
from hsm.mining.plan import DatasetInfo

__all__ = ["Part", "SlotDataset", "fingerprint_ids", "fingerprint_contents", "assistant_texts", "row_contents"]


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
    of ``rows``). ``rows[part.rows[base_idx]]`` is returned unchanged plus ``hsm_meta``: its
    :class:`~hsm.data.meta.SampleMeta`, the identity the events need. Integer indices (evaluation, a plain sampler) return the row without metadata. The target's fingerprint
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
        code, base_idx, is_hard, epoch, _ = slot
        if not 0 <= code < len(self.parts):
            raise IndexError(f"dataset code {code}: this train set has {len(self.parts)} datasets ({self.names})")
        part = self.parts[code]
        row = dict(self.rows[int(part.rows[int(base_idx)])])
        row[META_KEY] = SampleMeta(sample_id=part.sample_ids[int(base_idx)], dataset=part.name,
                                   base_idx=int(base_idx), epoch=int(epoch), drawn_as_hard=bool(is_hard))
        return row
