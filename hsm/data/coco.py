"""COCO detection annotations -> hsm JSONL records (``hsm data import-coco``), saying what it drops.

Only boxes are imported: keypoints, segmentations and categories no kept box uses are
ignored, and the result says so with counts. Every dropped annotation and missing image
is named (the first :data:`SHOWN`, and the count). Image paths: a relative ``file_name``
is looked up under ``images_dir`` and written relative to the JSONL; an absolute one is
used and written as it is (``images_dir`` does not apply to it) and the result counts those.
A repeated or non-integer image id is an error; annotations of an unknown image id are dropped and named. Nothing is
written when no image is found, unless ``allow_missing``. The index (images and categories by id, the boxes of each
image) is faster-coco-eval's ``COCO``; the checks it does not make run before it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hsm.data.records import RecordError
from hsm.utf8 import NotUtf8Error, read_utf8

__all__ = ["CocoImport", "import_coco", "SHOWN"]

SHOWN = 10  # names listed per kind of problem; the count covers the rest


def _count(n: int, singular: str, plural: str) -> str:
    """``"1 category"``, ``"3 categories"``."""
    return f"{n} {singular if n == 1 else plural}"


def _listed(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:SHOWN])
    return shown + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


@dataclass
class CocoImport:
    """What :func:`import_coco` wrote and what it dropped, changed or ignored on the way.

    The lists hold annotation ids (``annotations[k]`` for an annotation without an ``id``)
    and image paths, so a warning can name them.
    """

    train_path: Path
    val_path: Path | None
    n_train: int = 0
    n_val: int = 0
    crowd_dropped: list = field(default_factory=list)
    zero_area_dropped: list = field(default_factory=list)
    negative_size_dropped: list = field(default_factory=list)
    unknown_image_dropped: list = field(default_factory=list)
    outside_dropped: list = field(default_factory=list)
    clipped: list = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    absolute_file_names: int = 0
    keypoints_ignored: int = 0
    segmentations_ignored: int = 0
    unused_categories: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return self.n_train + self.n_val

    def warnings(self) -> list[str]:
        """One line per kind of dropped, changed or ignored input: its count and the first names."""
        out = []
        for ids, what in ((self.crowd_dropped, ("crowd annotation", "crowd annotations", "(iscrowd=1)")),
                          (self.zero_area_dropped, ("zero-area box", "zero-area boxes", "(width or height 0)")),
                          (self.negative_size_dropped, ("box with a negative size", "boxes with a negative size",
                                                        "(width or height < 0)")),
                          (self.outside_dropped, ("box lying wholly outside its image", "boxes lying wholly outside "
                                                  "their image", "")),
                          (self.unknown_image_dropped, ("annotation of an unknown image", "annotations of unknown "
                                                        "images", "(image_id not among the images)"))):
            if ids:
                out.append(f"dropped {_count(len(ids), what[0], what[1])}{' ' + what[2] if what[2] else ''}: "
                           f"annotation ids {_listed(ids)}")
        if self.clipped:
            out.append(f"clipped {_count(len(self.clipped), 'box', 'boxes')} to the image bounds: annotation ids "
                       f"{_listed(self.clipped)}")
        if self.missing_images:
            out.append(f"skipped {_count(len(self.missing_images), 'image', 'images')} whose file is missing: "
                       f"{_listed(self.missing_images)}")
        if self.absolute_file_names:
            n = self.absolute_file_names
            out.append(f"{_count(n, 'image has', 'images have')} an absolute file_name: written as it is (absolute), "
                       "--images applies only to relative names")
        if self.keypoints_ignored:
            out.append(f"ignored the keypoints of {_count(self.keypoints_ignored, 'annotation', 'annotations')}: "
                       "only boxes are imported")
        if self.segmentations_ignored:
            out.append(f"ignored the segmentation of {_count(self.segmentations_ignored, 'annotation', 'annotations')}: "
                       "only boxes are imported")
        if self.unused_categories:
            n = len(self.unused_categories)
            out.append(f"{_count(n, 'category has', 'categories have')} no imported box and "
                       f"{'is' if n == 1 else 'are'} not in the records: {_listed(self.unused_categories)}")
        return out


def _read(coco_json: Path) -> dict:
    """The annotation file as JSON, read here rather than by ``COCO(path)``: that opens the file in the
    locale's encoding and its JSON errors do not name the file; :func:`read_utf8` names the line."""
    try:
        data = json.loads(read_utf8(coco_json))
    except (OSError, NotUtf8Error, json.JSONDecodeError) as e:
        raise RecordError(f"{coco_json}: not a readable COCO JSON ({e})") from e
    if not isinstance(data, dict):
        raise RecordError(f"{coco_json}: not a COCO detection file (a JSON object with images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise RecordError(f"{coco_json}: missing '{key}'; not a COCO detection file")
    return data


def _check_image_ids(coco_json: Path, images: list) -> set:
    """The images' ids, each an integer of its own; a repeated id is an error naming the ids.

    Checked before the COCO index is built: ``COCO`` keeps the last image of a repeated id
    without a word (its boxes could not be told apart) and turns an id ``"7"`` into ``7``.
    """
    seen: dict = {}
    repeated: dict = {}
    for k, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image:
            raise RecordError(f"{coco_json}: images[{k}] has no 'id'; not a COCO detection file")
        if not isinstance(image["id"], int) or isinstance(image["id"], bool):
            raise RecordError(f"{coco_json}: images[{k}] has id {image['id']!r}; COCO image ids are integers")
        if image["id"] in seen:
            repeated.setdefault(image["id"], [seen[image["id"]]]).append(k)
        else:
            seen[image["id"]] = k
    if repeated:
        shown = [f"{i} (images{positions})" for i, positions in repeated.items()]
        raise RecordError(f"{coco_json}: {_count(len(repeated), 'image id is', 'image ids are')} repeated: "
                          f"{_listed(shown)}; each image needs its own id (annotations name images by id); "
                          "nothing written")
    return set(seen)


def _index(coco_json: Path, data: dict, result: CocoImport):
    """The ``faster_coco_eval.COCO`` index of the images, categories and the annotations kept.

    Crowd annotations and those of unknown images are dropped (and counted in ``result``)
    here, in file order, before ``COCO`` sees them: it would join an ``image_id`` of ``"1"``
    to image 1. Each kept annotation carries its name as ``id`` (``annotations[k]`` when it
    has none), so the index's annotations name themselves in warnings.
    """
    import warnings

    from faster_coco_eval import COCO

    image_ids = _check_image_ids(coco_json, data["images"])
    category_ids = {c["id"] for c in data["categories"]}
    kept = []
    for k, ann in enumerate(data["annotations"]):
        name = ann.get("id", f"annotations[{k}]")
        result.keypoints_ignored += bool(ann.get("keypoints"))
        result.segmentations_ignored += bool(ann.get("segmentation"))
        if ann.get("iscrowd"):
            result.crowd_dropped.append(name)
            continue
        if ann.get("category_id") not in category_ids:
            raise RecordError(f"{coco_json}: annotations[{k}] has unknown category_id {ann.get('category_id')}")
        image_id = ann.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id not in image_ids:
            result.unknown_image_dropped.append(name)
            continue
        kept.append({**ann, "id": name})
    with warnings.catch_warnings():
        # Its warning about annotation id 0 concerns evaluation (0 marks "unmatched"), not an import.
        warnings.filterwarnings("ignore", message="Found annotation id 0")
        return COCO({"images": data["images"], "annotations": kept, "categories": data["categories"]})


def _objects(anns: list, width: int, height: int, categories: dict, result: CocoImport) -> list[dict]:
    """The kept boxes of one image, clipped to it; drops counted in ``result``."""
    objects = []
    for ann in anns:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w < 0 or h < 0:
            result.negative_size_dropped.append(ann["id"])
            continue
        if w == 0 or h == 0:
            result.zero_area_dropped.append(ann["id"])
            continue
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(width), x + w), min(float(height), y + h)
        if not (x2 > x1 and y2 > y1):
            result.outside_dropped.append(ann["id"])
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            result.clipped.append(ann["id"])
        objects.append({"label": categories[ann["category_id"]]["name"], "bbox": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]})
    return objects


def import_coco(coco_json: str | Path, images_dir: str | Path, out: str | Path, *, id_prefix: str | None = None,
                val_fraction: float = 0.0, seed: int = 0, val_out: str | Path | None = None,
                allow_missing: bool = False) -> CocoImport:
    """Convert COCO detection annotations (xywh) to hsm JSONL, optionally split into train and val.

    Crowd, zero-area and negative-size annotations are dropped, boxes are clipped to the image, images
    whose file is missing are skipped; :meth:`CocoImport.warnings` names them. Record ids
    are ``{id_prefix}-{image_id}`` (default prefix: ``out``'s stem). With ``val_fraction``
    > 0, ``round(val_fraction * n)`` images drawn by ``numpy.random.default_rng(seed)`` go
    to ``val_out`` (default ``<out stem>_val.jsonl``). An absolute ``file_name`` is written
    as it is; a relative one relative to the JSONL's folder (so the pair can move together).
    A repeated image id is an error; an annotation whose ``image_id`` names no image is
    dropped and counted.

    Args:
        coco_json: the annotations (``instances_*.json``).
        images_dir: the folder relative ``file_name`` s are under.
        out: the JSONL to write (the train split with ``val_fraction``).
        id_prefix: record id prefix.
        val_fraction: share of images for the val split.
        seed: seed of the split.
        val_out: the val JSONL.
        allow_missing: write (empty) files even when no image is found, instead of raising.

    Raises:
        RecordError: unreadable or non-COCO JSON, an unknown category, a repeated image id, or no image found
            (names the first missing files; ``--allow-missing`` writes anyway).
    """
    import numpy as np

    coco_json, images_dir, out = Path(coco_json), Path(images_dir), Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise RecordError(f"val_fraction must be in [0, 1), got {val_fraction}")
    prefix = id_prefix if id_prefix is not None else out.stem
    val_path = None
    if val_fraction > 0:
        val_path = Path(val_out) if val_out is not None else out.with_name(f"{out.stem}_val{out.suffix or '.jsonl'}")
    result = CocoImport(out, val_path)
    data = _read(coco_json)
    coco = _index(coco_json, data, result)
    lines = []
    for image_id in sorted(coco.getImgIds()):
        image = coco.imgs[image_id]
        is_absolute = Path(image["file_name"]).is_absolute()
        result.absolute_file_names += is_absolute
        path = Path(image["file_name"]) if is_absolute else images_dir / image["file_name"]
        if not path.is_file():
            result.missing_images.append(str(path))
            continue
        width, height = int(image["width"]), int(image["height"])
        objects = _objects(coco.imgToAnns.get(image_id, []), width, height, coco.cats, result)
        lines.append((path, {"id": f"{prefix}-{image_id}", "width": width, "height": height, "objects": objects,
                               "is_absolute": is_absolute}))
    used = {o["label"] for _, line in lines for o in line["objects"]}
    result.unused_categories = sorted({c["name"] for c in coco.cats.values()} - used)
    if not lines and not allow_missing:
        where = f"under --images {images_dir}" if not result.absolute_file_names else "at their file_name"
        raise RecordError(f"{coco_json}: none of its {len(data['images'])} image(s) found {where} "
                          f"(missing: {_listed(result.missing_images)}); check --images, or pass --allow-missing "
                          "to write empty files; nothing written")
    is_val = np.zeros(len(lines), dtype=bool)
    if val_path is not None and lines:
        n_val = int(round(val_fraction * len(lines)))
        is_val[np.random.default_rng(seed).choice(len(lines), size=n_val, replace=False)] = True
    targets = [(out, [line for line, v in zip(lines, is_val) if not v])]
    if val_path is not None:
        targets.append((val_path, [line for line, v in zip(lines, is_val) if v]))
    _write_all(targets)
    result.n_train = len(targets[0][1])
    result.n_val = len(targets[1][1]) if val_path is not None else 0
    return result


def _write_all(targets: list[tuple[Path, list]]) -> None:
    """Every JSONL built in memory first, then each written atomically (:func:`hsm.io.write_bytes_atomic`):
    a failure while building leaves no file written."""
    from hsm.io import write_bytes_atomic

    contents = []
    for path, chosen in targets:
        lines = []
        for image_path, record in chosen:
            # An absolute file_name stays absolute: a relative path up to the root breaks when the JSONL moves.
            written = str(image_path) if record["is_absolute"] else os.path.relpath(image_path.resolve(),
                                                                                     path.parent.resolve())
            lines.append(json.dumps({"id": record["id"], "image": written, "width": record["width"],
                                     "height": record["height"], "objects": record["objects"]}) + "\n")
        contents.append((path, "".join(lines).encode("utf-8")))
    for path, data in contents:
        write_bytes_atomic(data, path)
