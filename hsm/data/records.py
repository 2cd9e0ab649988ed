"""Detection records: one image per JSONL line, validated with file and line in every error.

Format (one JSON object per line)::

    {"id": "bbu-000123",                 # optional; the sample_id when present
     "image": "images/000123.png",       # relative to the JSONL file (or absolute)
     "width": 640, "height": 480,        # must agree with the image file
     "objects": [{"label": "bolt", "bbox": [x1, y1, x2, y2]}, ...]}   # pixels, x2 > x1, y2 > y1

A record's ``sample_id`` is its ``id`` if it has one, else ``dataset:line_index``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hsm.io import file_sha256
from hsm.utf8 import NotUtf8Error, decode_utf8_line

__all__ = ["DetectionObject", "Record", "RecordError", "json_lines", "read_jsonl", "validate_jsonl", "file_fingerprint", "readable_records",
           "check_image_size", "image_size_problems", "declared_size_problems"]


class RecordError(ValueError):
    """A bad record; the message starts with ``file:line``."""


@dataclass(frozen=True)
class DetectionObject:
    label: str
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Record:
    image: Path
    width: int
    height: int
    objects: tuple[DetectionObject, ...]
    id: str | None
    where: str  # "file:line", for errors raised later (missing image, size mismatch)


def _fail(where: str, message: str) -> RecordError:
    return RecordError(f"{where}: {message}")


def _parse(obj: object, where: str, root: Path) -> Record:
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "image", "width", "height", "objects"}
    if unknown:
        raise _fail(where, f"unknown keys {sorted(unknown)} (accepted: id, image, width, height, objects)")
    for key in ("image", "width", "height", "objects"):
        if key not in obj:
            raise _fail(where, f"missing key '{key}'")
    width, height = obj["width"], obj["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise _fail(where, f"width/height must be positive integers, got {width!r}x{height!r}")
    if not isinstance(obj["image"], str) or not obj["image"]:
        raise _fail(where, "'image' must be a non-empty path string")
    if obj.get("id") is not None and not isinstance(obj["id"], str):
        raise _fail(where, f"'id' must be a string, got {obj['id']!r}")
    if not isinstance(obj["objects"], list):
        raise _fail(where, "'objects' must be a list")
    objects = []
    for j, item in enumerate(obj["objects"]):
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) or not isinstance(item.get("bbox"), list):
            raise _fail(where, f"objects[{j}] must be {{'label': str, 'bbox': [x1, y1, x2, y2]}}")
        box = item["bbox"]
        if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise _fail(where, f"objects[{j}].bbox must be 4 numbers, got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 > x1 and y2 > y1):
            raise _fail(where, f"objects[{j}].bbox {box} is degenerate (need x2 > x1 and y2 > y1)")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise _fail(where, f"objects[{j}].bbox {box} lies outside the {width}x{height} image")
        objects.append(DetectionObject(item["label"], (x1, y1, x2, y2)))
    image = Path(obj["image"])
    return Record(image if image.is_absolute() else root / image, width, height, tuple(objects), obj.get("id"), where)


def json_lines(path: Path):
    """Yield ``(line number, "file:line", object or None, problem or None)`` for every non-empty JSONL line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = decode_utf8_line(raw, path, number)
            except NotUtf8Error as e:
                yield number, where, None, str(e)
                continue
            if not line.strip():
                continue
            try:
                yield number, where, json.loads(line), None
            except json.JSONDecodeError as e:
                yield number, where, None, f"{where}: malformed JSON ({e.msg} at column {e.colno})"


def _read_lines(path: Path, check_images: bool):
    """Yield ``(record, None)`` or ``(None, problem)`` for every non-empty line."""
    seen_ids: dict[str, int] = {}
    for number, where, obj, problem in json_lines(path):
        if problem is not None:
            yield None, problem
            continue
        try:
            record = _parse(obj, where, path.parent)
        except RecordError as e:
            yield None, str(e)
            continue
        if record.id is not None:
            if record.id in seen_ids:
                yield None, f"{where}: duplicate id {record.id!r} (first at line {seen_ids[record.id]})"
                continue
            seen_ids[record.id] = number
        if check_images and not record.image.is_file():
            yield None, f"{where}: image {record.image} not found"
            continue
        yield record, None




def read_jsonl(path: str | Path, *, check_images: bool = True) -> list[Record]:
    """Parse and validate every line; ``check_images`` also requires each image file to exist.

    Raises :class:`RecordError` at the first bad line (``file:line: what``).
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    records = []
    for record, problem in _read_lines(path, check_images):
        if problem is not None:
            raise RecordError(problem)
        records.append(record)
    if not records:
        raise RecordError(f"{path}: no records")
    return records


def readable_records(path: str | Path) -> list[Record]:
    """The records of the lines that parse, in file order, images not checked; bad lines are
    skipped (:func:`validate_jsonl` reports them)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [record for record, problem in _read_lines(path, check_images=False) if record is not None]


def validate_jsonl(path: str | Path, *, max_side: int | None = None, decode: bool = True) -> tuple[int, list[str]]:
    """Check every line and every image; returns ``(n_records, problems)``.

    Each image's header is read (format, size against the record, ``max_side``, the decoding
    bound) and, with ``decode``, its pixels are decoded (a truncated file is found only so):
    :func:`hsm.data.images.image_problems`. Unlike :func:`read_jsonl` it does not stop at the
    first problem: every bad line is reported.
    """
    from hsm.data.images import header_problems, image_problems

    path = Path(path)
    if not path.is_file():
        return 0, [f"{path}: file not found"]
    check = image_problems if decode else header_problems
    count, problems = 0, []
    for record, problem in _read_lines(path, check_images=True):
        if problem is not None:
            problems.append(problem)
            continue
        count += 1
        problems += check(record, max_side)
    if count == 0 and not problems:
        problems.append(f"{path}: no records")
    return count, problems


def image_size_problems(record: Record, actual: tuple[int, int], max_side: int | None) -> list[str]:
    """What is wrong with an image of size ``actual`` for ``record`` (empty when nothing is)."""
    problems = []
    if tuple(actual) != (record.width, record.height):
        problems.append(f"{record.where}: image {record.image} is {actual[0]}x{actual[1]}, the record says {record.width}x{record.height}")
    if max_side is not None and max(actual) > max_side:
        problems.append(
            f"{record.where}: image {record.image} is {actual[0]}x{actual[1]}, over fusion_config.max_image_side={max_side}; "
            "hsm does not resize online: pre-scale the image or add an explicit resize augmentation"
        )
    return problems


def declared_size_problems(records: list[Record], max_side: int) -> list[str]:
    """Records whose declared ``width``/``height`` exceed ``max_side``: a start-up check, no image decoded."""
    return [problem for r in records for problem in image_size_problems(r, (r.width, r.height), max_side)]


def check_image_size(record: Record, actual: tuple[int, int], max_side: int) -> None:
    """Raise if the file's size disagrees with the record or exceeds ``max_side`` (no smart-resize)."""
    problems = image_size_problems(record, actual, max_side)
    if problems:
        raise RecordError("; ".join(problems))


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the JSONL bytes: a plan built for other data is refused."""
    return file_sha256(path)

