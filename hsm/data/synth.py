"""A synthetic detection corpus for the demo and tests: a target domain and two
source domains of rendered images, where a minority of target images is
genuinely hard (small, crowded objects and a rare class), so mining has something
to find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["CLASS_NAMES", "DOMAINS", "DEFAULT_PROMPTS", "SLICES", "GRID_CLASSES", "GRID_SLICES", "GRID_SHARES",
           "render_image", "render_grid_image", "synthesize", "synthesize_slices", "synthesize_grid", "synthesize_generic"]

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
    """Write ``<out>/<domain>/{train,val}.jsonl`` and images; returns domain -> train JSONL.

    Args:
        out_dir: where to write.
        n_target: target (``bbu``) train images.
        n_source: train images of each source (``lvis``, ``coco``).
        n_val: val images per domain.
        hard_fraction: share of target images with many small objects.
        size: image side in pixels.
        seed: corpus seed.
    """
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


# The grid corpus of bench/mining_effect.py (synthesize_grid): objects snapped to a grid of
# GRID_CELL px squares (one visual token of the tiny model at patch 8, merge 2) on a grey
# background; a class is a colour and a shape. Small objects are half a cell on a half-cell
# grid (finer than a visual token); the rare class is a square of nearly the first colour.
GRID_CELL = 16
GRID_CLASSES = {  # label -> (colour, shape); shape 0 square, 1 circle
    "bolt": ((210, 50, 50), 0), "cable": ((210, 50, 50), 1),
    "label": ((50, 90, 210), 0), "screw": ((50, 90, 210), 1),
    "crack": ((210, 95, 50), 0),
}
GRID_RARE = "crack"
GRID_SLICES = ("clean", "rare", "small", "crowded", "low_contrast", "noise")
GRID_SHARES = {"rare": 0.04, "small": 0.06, "crowded": 0.06, "low_contrast": 0.06, "noise": 0.04}
_GREY = 128
_LOW_CONTRAST = 0.35  # low_contrast objects: this fraction of their colour's distance from the grey
# slice -> (object count range, side range in units, unit in px); ranges are half-open
_LAYOUTS = {"clean": ((1, 4), (1, 3), GRID_CELL), "small": ((1, 4), (1, 2), GRID_CELL // 2),
            "crowded": ((5, 8), (1, 2), GRID_CELL)}


def _grid_objects(rng: np.random.Generator, slice_name: str, size: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Non-overlapping grid-aligned objects of one slice, in raster order (top to bottom, left to right)."""
    common = [c for c in GRID_CLASSES if c != GRID_RARE]
    count, sides, unit = _LAYOUTS.get(slice_name, _LAYOUTS["clean"])
    cells = size // unit
    n = int(rng.integers(*count))
    taken = np.zeros((cells, cells), dtype=bool)
    out = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        side = int(rng.integers(*sides))
        x, y = int(rng.integers(0, cells - side + 1)), int(rng.integers(0, cells - side + 1))
        if taken[y:y + side, x:x + side].any():
            continue
        taken[y:y + side, x:x + side] = True
        out.append((str(rng.choice(common)), (x, y, x + side, y + side)))
    if slice_name == "rare":
        out[0] = (GRID_RARE, out[0][1])
    out.sort(key=lambda o: (o[1][1], o[1][0]))
    return [(label, tuple(v * unit for v in box)) for label, box in out]


def render_grid_image(rng: np.random.Generator, size: int, objects, *, contrast: float = 1.0):
    """Grey noisy background, solid squares and circles; ``contrast`` < 1 pulls colours toward the grey."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.clip(rng.normal(_GREY, 6, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for label, (x1, y1, x2, y2) in objects:
        colour, shape = GRID_CLASSES[label]
        fill = tuple(int(round(_GREY + contrast * (c - _GREY))) for c in colour)
        (draw.rectangle if shape == 0 else draw.ellipse)([x1, y1, x2 - 1, y2 - 1], fill=fill)
    return image


def _corrupt(rng: np.random.Generator, objects, size: int):
    """The noise slice's train labels: one object's box shifted by one cell (clipped to the image), or its label swapped."""
    objects = list(objects)
    k = int(rng.integers(len(objects)))
    label, (x1, y1, x2, y2) = objects[k]
    if rng.random() < 0.5:
        swap = {"bolt": "label", "label": "bolt", "cable": "screw", "screw": "cable"}
        objects[k] = (swap[label], (x1, y1, x2, y2))
    else:
        # One cell along each axis, toward the inside where the box touches a border.
        dx, dy = ((GRID_CELL if lo < GRID_CELL else -GRID_CELL if hi > size - GRID_CELL else int(rng.choice([-1, 1])) * GRID_CELL)
                  for lo, hi in ((x1, x2), (y1, y2)))
        objects[k] = (label, (x1 + dx, y1 + dy, x2 + dx, y2 + dy))
    return objects


def synthesize_grid(out_dir: str | Path, *, n_train: int = 4000, n_val_per_slice: int = 48, size: int = 64,
                    seed: int = 0, shares: dict[str, float] | None = None) -> dict[str, Path]:
    """The mining-effect corpus: target ``bbu`` only, hard slices known by construction.

    Train slices (default shares): ``rare`` 4% (one object is ``crack``, a square of
    nearly ``bolt``'s colour), ``small`` 6% (1-3 objects of half a cell on a half-cell
    grid), ``crowded`` 6% (5-7 objects of one cell), ``low_contrast`` 6% (clean layouts,
    colours at 35% contrast), ``noise`` 4% (clean images whose label list has one box
    shifted by a cell or one label swapped), ``clean`` the rest (1-3 objects of 1-2 cells).
    Val holds ``n_val_per_slice`` images of every slice but ``noise``, with true labels. Writes
    ``<out>/bbu/{train,val}.jsonl``, the images and ``<out>/bbu/slices.json``
    (``{"train": {id: slice}, "val": {id: slice}, "shares": {...}, "noise": {id: true objects}}``).

    Args:
        out_dir: where to write.
        n_train: train images.
        n_val_per_slice: val images per slice.
        size: image side (a multiple of ``GRID_CELL``).
        seed: corpus seed.
        shares: train share per hard slice (clean takes the rest).
    """
    if size % GRID_CELL:
        raise ValueError(f"size: {size} is not a multiple of the grid cell {GRID_CELL}")
    out_dir = Path(out_dir)
    shares = dict(GRID_SHARES if shares is None else shares)
    shares["clean"] = 1.0 - sum(v for k, v in shares.items() if k != "clean")
    rng = np.random.default_rng([seed, 17])
    counts = {name: int(round(shares.get(name, 0.0) * n_train)) for name in GRID_SLICES if name != "clean"}
    counts["clean"] = n_train - sum(counts.values())
    train = [name for name in GRID_SLICES for _ in range(counts[name])]
    train = [train[i] for i in rng.permutation(len(train))]
    val = [name for name in GRID_SLICES if name != "noise" for _ in range(n_val_per_slice)]
    root = out_dir / "bbu"
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    info: dict = {"shares": shares, "noise": {}}
    for split, names in (("train", train), ("val", val)):
        lines, info[split] = [], {}
        for i, name in enumerate(names):
            truth = _grid_objects(rng, "clean" if name in ("noise", "low_contrast") else name, size)
            contrast = _LOW_CONTRAST if name == "low_contrast" else 1.0
            record_id, image = f"bbu-{split}-{i:05d}", f"images/{split}-{i:05d}.png"
            render_grid_image(rng, size, truth, contrast=contrast).save(root / image)
            shown = _corrupt(rng, truth, size) if name == "noise" else truth
            if name == "noise":
                info["noise"][record_id] = [[label, list(box)] for label, box in truth]
            lines.append({"id": record_id, "image": image, "width": size, "height": size,
                          "objects": [{"label": label, "bbox": list(box)} for label, box in shown]})
            info[split][record_id] = name
        key = "bbu" if split == "train" else "bbu_val"
        paths[key] = root / f"{split}.jsonl"
        paths[key].write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    paths["slices"] = root / "slices.json"
    paths["slices"].write_text(json.dumps(info, indent=1), encoding="utf-8")
    return paths


def synthesize_generic(out_dir: str | Path, *, name: str = "generic", n_train: int = 8000, n_val: int = 192,
                       size: int = 64, seed: int = 0) -> dict[str, Path]:
    """A generic detection corpus in the grid corpus's style: clean images of the common classes only.

    What a pretrained detector has seen before it meets the target domain: the ``clean``
    layouts of :func:`synthesize_grid` (1-3 objects of 1-2 cells, the four common classes,
    full contrast, true labels), and none of what makes the target hard (no ``crack``, no
    small, crowded or low-contrast images, no label noise). Used to pretrain the benchmark's
    base model and, with another seed, as the generic source mixed into fine-tuning.
    Writes ``<out>/<name>/{train,val}.jsonl`` (``n_val`` 0: no val file) and the images;
    deterministic given ``seed``.

    Args:
        out_dir: where to write.
        name: the dataset's folder and id prefix.
        n_train: train images.
        n_val: val images.
        size: image side (a multiple of ``GRID_CELL``).
        seed: corpus seed.

    Returns:
        ``{"train": train JSONL, "val": val JSONL (absent when n_val is 0)}``.
    """
    if size % GRID_CELL:
        raise ValueError(f"size: {size} is not a multiple of the grid cell {GRID_CELL}")
    root = Path(out_dir) / name
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 23])
    paths: dict[str, Path] = {}
    for split, count in (("train", n_train), ("val", n_val)):
        if count == 0:
            continue
        lines = []
        for i in range(count):
            objects = _grid_objects(rng, "clean", size)
            image = f"images/{split}-{i:05d}.png"
            render_grid_image(rng, size, objects).save(root / image)
            lines.append({"id": f"{name}-{split}-{i:05d}", "image": image, "width": size, "height": size,
                          "objects": [{"label": label, "bbox": list(box)} for label, box in objects]})
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return paths
