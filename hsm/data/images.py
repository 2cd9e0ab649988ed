"""Record images, read with a bound: every failure names the record's ``file:line``.

Three depths of checking, each a superset of the one before:

- :func:`header_problems` opens the file and reads its header only: a 0-byte or
  non-image file, a size that disagrees with the record, a side over
  ``max_image_side`` and a pixel count over the decoding bound (a decompression
  bomb) are found here without decoding a pixel.
- :func:`image_problems` also decodes the pixels: a truncated or corrupt file is
  found here. Decoding starts only after the header passed, so what a decode
  allocates is bounded (see below). ``hsm data validate`` runs it, and so does
  training, on every record before step 0 (:func:`check_record_images`, on a thread
  pool: Pillow releases the GIL while it decodes).
- :func:`load_rgb` decodes one image for training or evaluation and raises
  :class:`~hsm.data.records.RecordError` naming the record on any of the above, so
  an unreadable image is never mistaken for an output-folder problem.

An image is decoded only when its header shows the record's own size, within
``max_image_side`` and within Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 89 megapixels):
what a decode allocates is bounded before it starts.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

from hsm.data.records import Record, RecordError, image_size_problems

__all__ = ["decode_bound", "header_problems", "image_problems", "file_problems", "load_rgb", "check_record_images",
           "check_image_files", "SHOWN"]

SHOWN = 50  # problems listed in a start-up error; the count covers the rest


def decode_bound() -> int:
    """The most pixels an image may declare and still be decoded: Pillow's ``Image.MAX_IMAGE_PIXELS``."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises on a file it cannot read: unidentified or truncated files (``OSError``),
    broken chunks (``SyntaxError``, ``ValueError``, ``EOFError``, ``struct.error``, ``zlib.error``)
    and its own decompression-bomb guard."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def _open(record: Record):
    """Open the record's image: the header only (Pillow decodes on ``load``)."""
    from PIL import Image

    return Image.open(record.image)


def _unreadable(record: Record, error: BaseException) -> str:
    """Why the record's image cannot be read, from Pillow's error."""
    return _unreadable_file(record.where, record.image, error)


def _unreadable_file(where: str, image, error: BaseException) -> str:
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):  # Pillow's guard fires at open, past 2x its own bound
        return (f"{where}: image {image} is over Pillow's decoding bound ({error}): a decompression "
                "bomb or an image too large to train on; nothing decoded")
    what = "is empty (0 bytes)" if _is_empty(image) else f"cannot be decoded ({type(error).__name__}: {error})"
    return f"{where}: image {image} {what}"


def _header(img, record: Record, max_side: int | None) -> list[str]:
    """Problems visible in the header; an image with any is never decoded, so a decode holds at most
    ``min(record size, max_side ** 2, decode_bound())`` pixels."""
    width, height = img.size
    problems = image_size_problems(record, (width, height), max_side)
    if width * height > decode_bound():
        problems.append(f"{record.where}: image {record.image} declares {width}x{height} = {width * height} pixels, "
                        f"over the decoding bound of {decode_bound()}: a decompression bomb or an image too large to "
                        "train on; not decoded")
    return problems


def _read(record: Record, max_side: int | None, decode: bool) -> list[str]:
    try:
        with _open(record) as img:
            problems = _header(img, record, max_side)
            if decode and not problems:
                img.load()
    except FileNotFoundError:
        return [f"{record.where}: image {record.image} not found"]
    except _decode_errors() as e:
        return [_unreadable(record, e)]
    return problems


def _is_empty(image) -> bool:
    try:
        return os.path.getsize(image) == 0
    except OSError:
        return False


def header_problems(record: Record, max_side: int | None = None) -> list[str]:
    """What is wrong with the record's image from its header alone (empty when nothing is).

    Args:
        record: the record.
        max_side: ``fusion_config.max_image_side`` (None: no side limit; Pillow's pixel bound).
    """
    return _read(record, max_side, decode=False)


def image_problems(record: Record, max_side: int | None = None) -> list[str]:
    """:func:`header_problems`, then a full decode of the pixels (only when the header has no problem)."""
    return _read(record, max_side, decode=True)


def file_problems(where: str, image: str) -> list[str]:
    """:func:`image_problems` of an image file no record describes (a foreign trainer's row): missing, empty,
    over the decoding bound, or not decodable; each problem starts with ``where``.

    Args:
        where: what names the image in a message (the record's ``file:line``, or the dataset row).
        image: the image's path.
    """
    from PIL import Image

    try:
        with Image.open(image) as img:
            width, height = img.size
            if width * height > decode_bound():
                return [f"{where}: image {image} declares {width}x{height} = {width * height} pixels, over the "
                        f"decoding bound of {decode_bound()}: a decompression bomb or an image too large to train "
                        "on; not decoded"]
            img.load()
    except FileNotFoundError:
        return [f"{where}: image {image} not found"]
    except _decode_errors() as e:
        return [_unreadable_file(where, image, e)]
    return []


def check_image_files(named: Iterable[tuple[str, str]], *, n_threads: int | None = None) -> None:
    """:func:`check_record_images` for ``(where, image path)`` pairs (:func:`file_problems` of each, on a thread
    pool); raise once, listing every problem.

    Naive equivalent: ``[p for where, image in named for p in file_problems(where, image)]``, raised as one
    :class:`RecordError` when not empty.
    """
    named = list(named)
    workers = n_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for found in pool.map(lambda pair: file_problems(*pair), named, chunksize=64) for p in found]
    _raise_problems(problems, decoded=True)


def load_rgb(record: Record, max_side: int | None) -> np.ndarray:
    """The record's image as an ``uint8 (h, w, 3)`` array, checked and decoded with the bound.

    Raises:
        RecordError: missing, empty, undecodable, truncated, over the bound, or not the
            record's size; the message starts with the record's ``file:line``.
    """
    try:
        with _open(record) as img:
            problems = _header(img, record, max_side)
            if not problems:
                return np.asarray(img.convert("RGB"))
    except FileNotFoundError as e:
        raise RecordError(f"{record.where}: image {record.image} not found") from e
    except _decode_errors() as e:
        raise RecordError(f"{_unreadable(record, e)}; fix or remove the record (hsm data validate lists every "
                          "such record)") from e
    raise RecordError("; ".join(problems))


def check_record_images(record_lists: Iterable[list[Record]], max_side: int | None, *, n_threads: int | None = None,
                        decode: bool = True) -> None:
    """Read every record's image before training starts (bounded, as above); raise once, listing every problem.

    Naive equivalent: ``[p for records in record_lists for r in records for p in image_problems(r, max_side)]``
    (``header_problems`` when ``decode`` is False), raised as one :class:`RecordError` when not empty. Images are
    read on a thread pool, so a truncated file fails here, not an epoch into training.

    Args:
        record_lists: the records of each dataset (training and evaluation splits).
        max_side: ``fusion_config.max_image_side``.
        n_threads: reader threads (default: the CPU count, at most 8).
        decode: decode the pixels (default); False reads the headers only.
    """
    records = [r for records in record_lists for r in records]
    workers = n_threads or min(8, os.cpu_count() or 1)
    check = image_problems if decode else header_problems
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for found in pool.map(lambda r: check(r, max_side), records, chunksize=64) for p in found]
    _raise_problems(problems, decoded=decode)


def _raise_problems(problems: list[str], *, decoded: bool) -> None:
    """One :class:`RecordError` listing ``problems`` (the first :data:`SHOWN`). Only a header-only check sends the
    user to ``hsm data validate`` for the pixels: a decoding check has already read them."""
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        what = "1 image problem" if len(problems) == 1 else f"{len(problems)} image problems"
        how = "" if decoded else " (headers only: hsm data validate on the JSONL decodes the pixels too)"
        raise RecordError(f"{what} before training{how}:\n{listed}{more}")
