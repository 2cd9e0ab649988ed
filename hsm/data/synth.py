"""A synthetic detection corpus for the demo and tests: a target domain and two
source domains of rendered images, where a minority of target images is
genuinely hard (small, crowded objects and a rare class), so mining has something
to find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["CLASS_NAMES", "DOMAINS", "DEFAULT_PROMPTS", "SLICES", "render_image", "synthesize", "synthesize_slices"]

# name -> (classes, background tint)
DOMAINS = {
    "bbu": (["bolt", "cable", "label", "screw", "crack"], (70, 80, 90)),
    "lvis": (["cup", "cat", "lamp"], (120, 110, 90)),
    "coco": (["car", "person", "dog"], (90, 120, 80)),
}
CLASS_NAMES = [name for classes, _ in DOMAINS.values() for name in classes]
RARE_CLASS = "crack"
DEFAULT_PROMPTS = {
    "target": ("你是一个检测助手。", "检测图中所有目标，输出 JSON。"),
    "source": ("You are a detection assistant.", "Detect every object and answer in JSON."),
}
_COLORS = {name: tuple(int(c) for c in np.random.default_rng(i).integers(40, 255, 3)) for i, name in enumerate(CLASS_NAMES)}
_SHAPES = {name: i % 3 for i, name in enumerate(CLASS_NAMES)}


def render_image(rng: np.random.Generator, width: int, height: int, tint, objects_spec):
    """Draw the objects (label, box) on a noisy tinted background; returns a PIL image."""
    from PIL import Image, ImageDraw

    base = np.clip(rng.normal(0, 12, (height, width, 3)) + np.array(tint), 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for label, (x1, y1, x2, y2) in objects_spec:
        color = _COLORS[label]
        shape = _SHAPES[label]
        box = [x1, y1, x2 - 1, y2 - 1]
        if label == RARE_CLASS:
            draw.line([x1, y1, x2 - 1, y2 - 1], fill=color, width=2)
            draw.line([x1, y2 - 1, x2 - 1, y1], fill=color, width=1)
        elif shape == 0:
            draw.rectangle(box, fill=color)
        elif shape == 1:
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(x1, y2 - 1), ((x1 + x2) // 2, y1), (x2 - 1, y2 - 1)], fill=color)
    return image


def _objects(rng, classes, width, height, hard: bool):
    count = int(rng.integers(10, 18)) if hard else int(rng.integers(1, 4))
    out = []
    for _ in range(count):
        size = int(rng.integers(4, 9)) if hard else int(rng.integers(14, 34))
        w = min(width - 1, max(3, int(size * rng.uniform(0.7, 1.3))))
        h = min(height - 1, max(3, int(size * rng.uniform(0.7, 1.3))))
        x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        pool = classes if hard else [c for c in classes if c != RARE_CLASS]
        out.append((str(rng.choice(pool)), (x1, y1, x1 + w, y1 + h)))
    return out


def synthesize(out_dir: str | Path, *, n_target: int = 96, n_source: int = 48, n_val: int = 16,
               hard_fraction: float = 0.2, size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write ``<out>/<domain>/{train,val}.jsonl`` and images; returns domain -> train JSONL."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    paths = {}
    for domain, (classes, tint) in DOMAINS.items():
        is_target = domain == "bbu"
        root = out_dir / domain
        (root / "images").mkdir(parents=True, exist_ok=True)
        for split, count in (("train", n_target if is_target else n_source), ("val", n_val)):
            lines = []
            for i in range(count):
                hard = is_target and rng.random() < hard_fraction
                width, height = size, size if is_target else size + 32 * int(rng.integers(0, 2))
                spec = _objects(rng, classes, width, height, hard)
                name = f"images/{split}-{i:05d}.png"
                render_image(rng, width, height, tint, spec).save(root / name)
                lines.append({
                    "id": f"{domain}-{split}-{i:05d}", "image": name, "width": width, "height": height,
                    "objects": [{"label": label, "bbox": list(box)} for label, box in spec],
                })
            path = root / f"{split}.jsonl"
            path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
            if split == "train":
                paths[domain] = path
    return paths


# Slices of the mining-effect corpus (synthesize_slices): what makes an image hard, by construction.
SLICES = ("clean", "rare", "small", "crowded")
_SLICE_SHARES = {"rare": 0.05, "small": 0.12, "crowded": 0.12}  # clean takes the rest


def _slice_objects(rng: np.random.Generator, slice_name: str, classes: list[str], size: int):
    common = [c for c in classes if c != RARE_CLASS]
    if slice_name == "crowded":
        count, sizes = int(rng.integers(6, 9)), (9, 16)
    elif slice_name == "small":
        count, sizes = int(rng.integers(1, 4)), (4, 8)
    else:
        count, sizes = int(rng.integers(1, 4)), (size // 5, size // 2)
    out = []
    for k in range(count):
        side = int(rng.integers(*sizes))
        w = min(size - 1, max(3, int(side * rng.uniform(0.8, 1.25))))
        h = min(size - 1, max(3, int(side * rng.uniform(0.8, 1.25))))
        x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        label = RARE_CLASS if slice_name == "rare" and k == 0 else str(rng.choice(common))
        out.append((label, (x1, y1, x1 + w, y1 + h)))
    return out


def synthesize_slices(out_dir: str | Path, *, n_train: int = 240, n_val_per_slice: int = 32, n_source: int = 64,
                      size: int = 64, seed: int = 0, shares: dict[str, float] | None = None) -> dict[str, Path]:
    """A target corpus whose hard slices are known by construction, plus one source.

    Target ``bbu`` train: a share of images per slice (default: ``rare`` 5%,
    ``small`` 12%, ``crowded`` 12%, ``clean`` the rest), in shuffled order:

    - ``clean``: 1-3 medium objects of the common classes;
    - ``rare``: the same, but the first object is the rare class ``crack``
      (the only images where it appears);
    - ``small``: 1-3 objects of 4-8 px;
    - ``crowded``: 6-8 objects of 9-16 px.

    The val split holds ``n_val_per_slice`` images of every slice. Source ``coco``
    (its own classes) has ``n_source`` clean images. Writes
    ``<out>/{bbu,coco}/{train,val}.jsonl``, the images, and
    ``<out>/bbu/slices.json`` (``{"train": {id: slice}, "val": {id: slice}, "shares": {...}}``).
    Returns ``{"bbu": train, "bbu_val": val, "coco": train, "slices": slices.json}``.
    """
    out_dir = Path(out_dir)
    shares = dict(_SLICE_SHARES if shares is None else shares)
    shares["clean"] = 1.0 - sum(v for k, v in shares.items() if k != "clean")
    if shares["clean"] < 0:
        raise ValueError(f"shares: the hard slices take {1 - shares['clean']:.2f} > 1 of the images")
    rng = np.random.default_rng([seed, 8])
    counts = {name: int(round(shares[name] * n_train)) for name in SLICES if name != "clean"}
    counts["clean"] = n_train - sum(counts.values())
    train_slices = [name for name in SLICES for _ in range(counts[name])]
    train_slices = [train_slices[i] for i in rng.permutation(len(train_slices))]
    val_slices = [name for name in SLICES for _ in range(n_val_per_slice)]
    classes, tint = DOMAINS["bbu"]
    root = out_dir / "bbu"
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    slice_map: dict[str, dict[str, str]] = {}
    for split, names in (("train", train_slices), ("val", val_slices)):
        lines, slice_map[split] = [], {}
        for i, name in enumerate(names):
            spec = _slice_objects(rng, name, classes, size)
            record_id = f"bbu-{split}-{i:05d}"
            image = f"images/{split}-{i:05d}.png"
            render_image(rng, size, size, tint, spec).save(root / image)
            lines.append({"id": record_id, "image": image, "width": size, "height": size,
                          "objects": [{"label": label, "bbox": list(box)} for label, box in spec]})
            slice_map[split][record_id] = name
        paths["bbu" if split == "train" else "bbu_val"] = root / f"{split}.jsonl"
        paths["bbu" if split == "train" else "bbu_val"].write_text(
            "".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    source_classes, source_tint = DOMAINS["coco"]
    source_root = out_dir / "coco"
    (source_root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_source):
        spec = _slice_objects(rng, "clean", source_classes, size)
        image = f"images/train-{i:05d}.png"
        render_image(rng, size, size, source_tint, spec).save(source_root / image)
        lines.append({"id": f"coco-train-{i:05d}", "image": image, "width": size, "height": size,
                      "objects": [{"label": label, "bbox": list(box)} for label, box in spec]})
    paths["coco"] = source_root / "train.jsonl"
    paths["coco"].write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    paths["slices"] = root / "slices.json"
    paths["slices"].write_text(json.dumps({**slice_map, "shares": shares}, indent=1), encoding="utf-8")
    return paths
