"""Box-aware augmentation with albumentations, reproducible from an item's ``aug_seed``."""

from __future__ import annotations

import hashlib

import numpy as np

from hsm.config import AugmentationConfig

__all__ = ["derive_aug_seed", "curriculum_strength", "augment"]


def derive_aug_seed(seed: int, epoch: int, dataset_code: int, base_idx: int, draw: int) -> int:
    """A 31-bit seed from ``(seed, epoch, dataset, base_idx, draw index)``: any item can be replayed."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{dataset_code}:{base_idx}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def curriculum_strength(cfg: AugmentationConfig, progress: float) -> float:
    """1.0 without curriculum; else linear from ``curriculum_start`` at progress 0 to 1.0 at progress 1."""
    if not cfg.curriculum:
        return 1.0
    return cfg.curriculum_start + (1.0 - cfg.curriculum_start) * min(max(progress, 0.0), 1.0)


def augment(image: np.ndarray, boxes: list, labels: list, cfg: AugmentationConfig, *, seed: int, strength: float):
    """Augment an HxWx3 uint8 image and its pascal_voc boxes; boxes pushed out are dropped.

    Returns ``(image, boxes, labels, n_dropped)``. The output keeps the input size.
    """
    import albumentations as A

    height, width = image.shape[:2]
    low = 1.0 - (1.0 - cfg.scale[0]) * strength
    transform = A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip_p),
            A.RandomResizedCrop(size=(height, width), scale=(min(low, cfg.scale[1]), cfg.scale[1]), ratio=(0.9, 1.1), p=1.0),
            A.ColorJitter(brightness=cfg.color_jitter * strength, contrast=cfg.color_jitter * strength, saturation=0.0, hue=0.0, p=1.0),
        ],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.3, clip=True),
        seed=seed,
    )
    out = transform(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=list(labels))
    kept = [tuple(float(v) for v in b) for b in out["bboxes"]]
    return out["image"], kept, list(out["labels"]), len(boxes) - len(kept)
