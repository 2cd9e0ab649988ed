"""A synthetic detection corpus for the demo and tests: a target domain and two
source domains of rendered images, where a minority of target images is
genuinely hard (small, crowded objects and a rare class), so mining has something
to find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["CLASS_NAMES", "DOMAINS", "DEFAULT_PROMPTS", "render_image", "synthesize"]

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
