"""Real detection data for a trial run: the tree-crown images the ``deepforest`` wheel ships, as COCO.

The wheel holds four annotated aerial RGB images (NEON sites YELL, OSBS, SOAP;
Pascal VOC XML, 951 crowns) under ``deepforest/data/``. This script reads them
straight from the wheel file (nothing is installed or imported from it), cuts
them into square chips and writes ``instances.json`` in COCO format plus the
chip images; boxes cut by a chip border are kept whole, so ``hsm data
import-coco`` clips them (and says how many).

    pip download --no-deps deepforest==2.1.0 -d /tmp/wheels
    python scripts/deepforest_coco.py /tmp/wheels/deepforest-2.1.0-py3-none-any.whl deepforest_run/coco
    hsm data import-coco deepforest_run/coco/instances.json --images deepforest_run/coco/images \\
        --out deepforest_run/data/trees.jsonl --val-fraction 0.1 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from PIL import Image


def _voc_boxes(text: bytes) -> list[tuple[str, float, float, float, float]]:
    root = ET.fromstring(text)
    boxes = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        boxes.append((obj.findtext("name", "Tree"), *(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return boxes


def convert(wheel: Path, out: Path, chip: int = 200) -> dict:
    """Write ``out/instances.json`` and ``out/images/*.png``; returns the COCO dict."""
    images, annotations, categories = [], [], {}
    (out / "images").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("deepforest/data/") and n.endswith(".xml"))
        for xml_name in names:
            png_name = xml_name[:-4] + ".png"
            if png_name not in z.namelist():
                continue
            boxes = _voc_boxes(z.read(xml_name))
            with Image.open(io.BytesIO(z.read(png_name))) as img:
                rgb = img.convert("RGB")
            stem = Path(png_name).stem
            for top in range(0, rgb.height - chip + 1, chip):
                for left in range(0, rgb.width - chip + 1, chip):
                    inside = [b for b in boxes if b[3] > left and b[1] < left + chip and b[4] > top and b[2] < top + chip]
                    if not inside:
                        continue
                    image_id = len(images) + 1
                    file_name = f"{stem}_{top:04d}_{left:04d}.png"
                    rgb.crop((left, top, left + chip, top + chip)).save(out / "images" / file_name)
                    images.append({"id": image_id, "file_name": file_name, "width": chip, "height": chip})
                    for label, x1, y1, x2, y2 in inside:
                        category = categories.setdefault(label, len(categories) + 1)
                        annotations.append({
                            "id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0,
                            "bbox": [x1 - left, y1 - top, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                        })
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n.lower()} for n, i in categories.items()]}
    (out / "instances.json").write_text(json.dumps(coco))
    return coco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="deepforest-*.whl")
    parser.add_argument("out", type=Path, help="output folder (instances.json, images/)")
    parser.add_argument("--chip", type=int, default=200, help="chip side in pixels")
    args = parser.parse_args()
    coco = convert(args.wheel, args.out, args.chip)
    print(f"{len(coco['images'])} chips, {len(coco['annotations'])} boxes -> {args.out / 'instances.json'}")


if __name__ == "__main__":
    main()
