"""The unified fusion loader (docs/design.md §3): one target, any number of sources, one shared template.

Items are addressed by schedule slots ``(dataset_code, base_idx, is_hard, epoch,
position)`` that the sampler yields, so DataLoader workers need no shared state:
everything an item needs (its augmentation seed included) is in its address.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hsm.data.answer import needs_resized, resized_size
from hsm.data.augment import augment, curriculum_strength, derive_aug_seed
from hsm.config import AugmentationConfig, FusionConfig, MiningConfig, ModelConfig
from hsm.data.encoding import Template, format_answer, resolve_prompts, supervised_positions
from hsm.data.meta import META_KEY, HsmMeta, SampleMeta
from hsm.mining.plan import DatasetInfo
from hsm.data.records import Record, RecordError, declared_size_problems, file_fingerprint, read_jsonl

__all__ = ["Slot", "cap_objects", "FusionDataset", "EvalDataset", "DetectionCollator", "sample_id_of"]

_CAP_STREAM = 7


@dataclass(frozen=True)
class Slot:
    """The address of one item: what the sampler yields."""

    dataset_code: int
    base_idx: int
    is_hard: bool
    epoch: int
    position: int


def sample_id_of(record: Record, dataset: str, base_idx: int) -> str:
    """The record's own ``id``, else ``dataset:base_idx``."""
    return record.id if record.id is not None else f"{dataset}:{base_idx}"


def cap_objects(record: Record, cap: int | None, *, seed: int, code: int, base_idx: int) -> tuple[list, list, bool]:
    """``(boxes, labels, capped)``: at most ``cap`` of the record's objects, a draw seeded by
    ``(seed, code, base_idx)`` kept in record order, the same in every epoch.

    Args:
        record: the record.
        cap: the dataset's ``max_objects_per_image`` (None: all objects).
        seed: the fusion seed.
        code: the dataset's index in the fusion (0 is the target).
        base_idx: the record's index in its dataset.
    """
    boxes = [o.bbox for o in record.objects]
    labels = [o.label for o in record.objects]
    if cap is None or len(boxes) <= cap:
        return boxes, labels, False
    rng = np.random.default_rng([seed, code, base_idx, _CAP_STREAM])
    keep = np.sort(rng.choice(len(boxes), size=cap, replace=False))
    return [boxes[i] for i in keep], [labels[i] for i in keep], True


class FusionDataset:
    """Map-style dataset over fusion slots; ``names[0]`` is the target."""

    def __init__(self, fusion: FusionConfig, processor, model: ModelConfig, *, mining: MiningConfig | None = None,
                 num_train_epochs: float = 1.0, check_images: bool = True):
        self.fusion = fusion
        self.model_cfg = model
        self.mine_clean = bool(mining and mining.mine_clean)
        self.num_train_epochs = max(float(num_train_epochs), 1.0)
        specs = [fusion.target, *fusion.sources]
        missing = [f"custom.fusion_config.{'target' if i == 0 else f'sources.{i - 1}'}.train_jsonl"
                   for i, d in enumerate(specs) if d.train_jsonl is None]
        if missing:
            raise ValueError(f"hsm train needs dataset files: {', '.join(missing)} not set")
        self.names = [d.name for d in specs]
        self.records = [read_jsonl(d.train_jsonl, check_images=check_images) for d in specs]
        # Every record's declared size, before anything is written or trained (no image decoded).
        oversized = [p for records in self.records for p in declared_size_problems(records, fusion.max_image_side)]
        if oversized:
            listed = "\n".join(f"  {p}" for p in oversized[:50])
            more = f"\n  ... and {len(oversized) - 50} more" if len(oversized) > 50 else ""
            raise RecordError(f"{len(oversized)} record(s) over custom.fusion_config.max_image_side="
                              f"{fusion.max_image_side}:\n{listed}{more}")
        self.ratios = [s.ratio for s in fusion.sources]
        self.prompts = [resolve_prompts(fusion, name) for name in self.names]
        self.policies = [fusion.target.augmentation or fusion.augmentation] + [
            s.augmentation or AugmentationConfig(enabled=False) for s in fusion.sources
        ]
        self.caps = [d.max_objects_per_image for d in specs]
        self.template = Template(processor)
        self.target_info = DatasetInfo(self.names[0], len(self.records[0]), file_fingerprint(specs[0].train_jsonl))

    @property
    def sizes(self) -> list[int]:
        return [len(r) for r in self.records]

    def __len__(self) -> int:
        return self.sizes[0]

    def __getitem__(self, slot) -> dict:
        slot = Slot(*slot) if not isinstance(slot, Slot) else slot
        return self.load(slot, train=True)

    def capped_objects(self, code: int, base_idx: int, record: Record) -> tuple[list, list, bool]:
        """``(boxes, labels, capped)`` of a record after the dataset's ``max_objects_per_image``."""
        return cap_objects(record, self.caps[code], seed=self.fusion.seed, code=code, base_idx=base_idx)

    def load(self, slot: Slot, *, train: bool, records: list[Record] | None = None) -> dict:
        """Load, cap, augment and encode one item, with its metadata and telemetry.

        ``records`` replaces the dataset's training records (evaluation splits).
        """
        from PIL import Image

        from hsm.data.images import load_rgb

        code = slot.dataset_code
        records = self.records[code] if records is None else records
        if not 0 <= slot.base_idx < len(records):
            raise IndexError(f"base_idx {slot.base_idx} out of range for dataset '{self.names[code]}' (n={len(records)})")
        record = records[slot.base_idx]
        image = load_rgb(record, self.fusion.max_image_side)
        boxes, labels, capped = self.capped_objects(code, slot.base_idx, record)
        policy = self.policies[code]
        use_aug = train and policy.enabled and not (self.mine_clean and slot.is_hard)
        aug_seed = derive_aug_seed(self.fusion.seed, slot.epoch, code, slot.base_idx, slot.position)
        dropped = 0
        if use_aug:
            strength = curriculum_strength(policy, slot.epoch / self.num_train_epochs)
            image, boxes, labels, dropped = augment(image, boxes, labels, policy, seed=aug_seed, strength=strength)
        height, width = image.shape[:2]
        resized = None
        if needs_resized(self.model_cfg.coord_format):
            resized = resized_size(self.template.processor, width, height)  # the processor's own factor and limits
        answer = format_answer(boxes, labels, width, height, self.model_cfg.coord_format, resized)
        prompts = self.prompts[code]
        encoded = self.template.encode(Image.fromarray(image), prompts.user, answer, system=prompts.system)
        encoded["meta"] = SampleMeta(
            sample_id=sample_id_of(record, self.names[code], slot.base_idx),
            dataset=self.names[code],
            base_idx=slot.base_idx,
            epoch=slot.epoch,
            aug_seed=aug_seed,
            drawn_as_hard=bool(slot.is_hard),
            augmented=use_aug,
            object_capped=capped,
            # Larger than the processor's pixel budget, so the processor shrinks it (over max_image_side raises).
            oversize=record.width * record.height > self.model_cfg.image_max_pixels,
            aug_dropped=dropped,
            input_len=int(len(encoded["input_ids"])),
        )
        return encoded


class EvalDataset:
    """Evaluation over the target's ``val_jsonl`` (and sources' when ``eval_sources``), in file order."""

    def __init__(self, train: FusionDataset):
        specs = [train.fusion.target, *train.fusion.sources]
        self.train = train
        self.slots: list[Slot] = []
        self.records: dict[int, list[Record]] = {}
        for code, spec in enumerate(specs):
            if spec.val_jsonl is None or (code > 0 and not train.fusion.eval_sources):
                continue
            records = read_jsonl(spec.val_jsonl)
            self.records[code] = records
            self.slots += [Slot(code, i, False, 0, i) for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> dict:
        slot = self.slots[i]
        return self.train.load(slot, train=False, records=self.records[slot.dataset_code])


class DetectionCollator:
    """Pads a list of encoded items into a batch; their metadata rides beside the tensors.

    ``batch["hsm_meta"]`` is the items' :class:`~hsm.data.meta.SampleMeta` stacked into one
    :class:`~hsm.data.meta.HsmMeta`, with ``token_roles`` (``int8 [batch, seq]``, padded with
    ``ROLE_OTHER``) when the items carry them, and ``supervised_index``
    (:func:`hsm.data.encoding.supervised_positions` of the labels).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict:
        import torch

        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            length = int(math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        n = len(items)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        token_types = torch.zeros((n, length), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            input_ids[i, :k] = torch.as_tensor(it["input_ids"])
            attention[i, :k] = torch.as_tensor(it["attention_mask"])
            labels[i, :k] = torch.as_tensor(it["labels"])
            token_types[i, :k] = torch.as_tensor(it["mm_token_type_ids"])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "mm_token_type_ids": token_types,
            "pixel_values": torch.as_tensor(np.concatenate([it["pixel_values"] for it in items])),
            "image_grid_thw": torch.as_tensor(np.concatenate([it["image_grid_thw"] for it in items])),
        }
        if "meta" in items[0]:
            roles = None
            if all("token_roles" in it for it in items):
                # Answer-token roles (hsm.data.encoding.ROLE_*) for coord_loss/label_loss; they ride
                # in the metadata, which the trainer removes before model(**inputs).
                roles = torch.zeros((n, length), dtype=torch.int8)
                for i, it in enumerate(items):
                    roles[i, :len(it["token_roles"])] = torch.as_tensor(it["token_roles"])
            # Found here on the host, so that the loss runs its token-accuracy argmax over these positions only,
            # with no device sync.
            batch[META_KEY] = HsmMeta.stack([it["meta"] for it in items], token_roles=roles,
                                            supervised_index=supervised_positions(labels))
        return batch
