"""What every trainer integration shares: a row-indexed dataset addressed by hsm's schedule slots, and a
collator wrapper that carries each row's identity (``hsm_meta``) past a foreign collator."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

from hsm.config import FusionConfig, TargetConfig
from hsm.mining.plan import DatasetInfo

__all__ = ["SlotDataset", "MetaCollator", "single_target_fusion", "fingerprint_ids"]

_TELEMETRY_DEFAULTS = {"augmented": False, "object_capped": False, "oversize": False, "aug_dropped": 0}


def fingerprint_ids(sample_ids: Sequence[str]) -> str:
    """sha256 over the ordered sample ids: a plan is only valid for the same rows in the same order."""
    digest = hashlib.sha256()
    for sample_id in sample_ids:
        digest.update(sample_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def single_target_fusion(name: str) -> FusionConfig:
    """The fusion of a foreign trainer's dataset: one target, no sources (the trainer mixes its own data)."""
    return FusionConfig(target=TargetConfig(name=name))


class SlotDataset:
    """A row-indexed dataset read by schedule slots ``(dataset_code, base_idx, is_hard, epoch, position)``.

    ``rows[base_idx]`` is returned unchanged plus ``hsm_meta``: the identity the events need. Integer indices
    (evaluation, a plain sampler) return the row without metadata.
    """

    def __init__(self, rows, name: str, sample_ids: Sequence[str]):
        if len(sample_ids) != len(rows):
            raise ValueError(f"sample_ids: {len(sample_ids)} ids for {len(rows)} rows of dataset '{name}'")
        self.rows = rows
        self.name = name
        self.sample_ids = list(sample_ids)
        self.info = DatasetInfo(name, len(rows), fingerprint_ids(self.sample_ids))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, slot) -> dict[str, Any]:
        if isinstance(slot, int):
            return self.rows[slot]
        code, base_idx, is_hard, epoch, position = slot
        if code != 0:
            raise IndexError(f"dataset code {code}: a foreign trainer's dataset has only the target (code 0)")
        row = dict(self.rows[int(base_idx)])
        row["hsm_meta"] = {
            "sample_id": self.sample_ids[int(base_idx)], "dataset": self.name, "base_idx": int(base_idx),
            "epoch": int(epoch), "aug_seed": 0, "drawn_as_hard": bool(is_hard), "position": int(position),
            **_TELEMETRY_DEFAULTS,
        }
        return row


class MetaCollator:
    """Wraps a collator: pops ``hsm_meta`` from each item, collates the rest, adds ``batch['hsm_meta']`` (lists)."""

    def __init__(self, inner: Callable[[list[dict]], dict]):
        self.inner = inner

    def __call__(self, items: list[dict]) -> dict:
        metas = [item.pop("hsm_meta", None) for item in items]
        batch = self.inner(items)
        if metas and metas[0] is not None:
            meta = {key: [m[key] for m in metas] for key in metas[0]}
            mask = batch.get("attention_mask")
            meta["input_len"] = mask.sum(dim=1).tolist() if mask is not None else [0] * len(items)
            batch["hsm_meta"] = meta
        return batch
