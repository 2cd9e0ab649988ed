"""The answer text, both directions: boxes -> answer (training) and answer -> boxes (evaluation).

The template writes a JSON list of ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``;
evaluation reads model text back with :func:`parse_answer` and maps its coordinates
to original-image pixels with :func:`answer_boxes_to_pixels`. Both directions use
one scale (:func:`answer_scale`), so coordinates cannot drift between them.

Coordinate formats:

- ``rel1000``: ``answer = pixel / size * 1000`` (Qwen2-VL, Qwen3-VL).
- ``abs``: ``answer = pixel * resized / size``, pixels of the image as the processor
  resized it (Qwen2.5-VL). The resized size is the processor's own ``smart_resize``
  with ``factor = patch_size * merge_size`` (28 for Qwen2.5-VL, 32 for Qwen3-VL)
  and its ``min/max`` pixels: see :func:`resized_size`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from hsm.data.json_values import MAX_DEPTH, decode_value, skip_ws

__all__ = [
    "COORD_FORMATS",
    "needs_resized",
    "PARSE_STATUSES",
    "ParsedAnswer",
    "format_answer",
    "parse_answer",
    "MAX_DEPTH",
    "MAX_BOXES",
    "answer_scale",
    "answer_boxes_to_pixels",
    "resize_factor",
    "resized_size",
    "ROLE_OTHER",
    "ROLE_COORD",
    "ROLE_LABEL",
    "answer_char_roles",
]

COORD_FORMATS = ("rel1000", "abs")
# The formats whose coordinates are pixels of the processor-resized image: writing or reading
# them needs the processor's resize (:func:`resized_size`). Every caller asks :func:`needs_resized`,
# so a new format is this table and :func:`answer_scale`.
_RESIZED_FORMATS = frozenset({"abs"})
# ok: one complete JSON list; bare_objects: objects without an enclosing list;
# truncated: the list (or object run) stops early, complete objects kept;
# failed: no list or object found; missing: no answer at all (set by evaluation).
PARSE_STATUSES = ("ok", "bare_objects", "truncated", "failed", "missing")
_BOX_KEYS = ("bbox_2d", "bbox")
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
# Where an answer may start: a run of "[" (one match, see _starts), or a "{" that can open an
# object (followed by a key or "}"): a "{" followed by anything else never decodes.
_START = re.compile(r'\[|\{(?=[ \t\n\r]*["}])')
_BRACKET_RUN = re.compile(r"[\[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_FAST_TRIES = 4
# Boxes kept per answer: every box past it is dropped and counted (``n_over_cap``), so scoring an
# answer (IoU against its ground truth, duplicates among its boxes) holds at most this many rows.
# Ten times COCO's maxDets (100): no real answer reaches it, a runaway generation does.
MAX_BOXES = 1000


def needs_resized(coord_format: str) -> bool:
    """Whether answers in ``coord_format`` are in pixels of the processor-resized image.

    Args:
        coord_format: one of :data:`COORD_FORMATS`.
    """
    if coord_format not in COORD_FORMATS:
        raise ValueError(f"coord_format must be one of {COORD_FORMATS}, got {coord_format!r}")
    return coord_format in _RESIZED_FORMATS


def answer_scale(coord_format: str, width: int, height: int, resized: tuple[int, int] | None = None) -> tuple[float, float]:
    """``(sx, sy)`` with ``answer = pixel * s``, ``pixel = answer / s``.

    ``rel1000``: ``s = 1000 / size``; ``abs``: ``s = resized / size`` (``resized=(w, h)``,
    the processor-resized image; ``None`` means the image was not resized).
    """
    if coord_format == "rel1000":
        return 1000.0 / width, 1000.0 / height
    if coord_format == "abs":
        rw, rh = resized or (width, height)
        return rw / width, rh / height
    raise ValueError(f"coord_format must be one of {COORD_FORMATS}, got {coord_format!r}")


def format_answer(boxes, labels, width: int, height: int, coord_format: str, resized: tuple[int, int] | None = None) -> str:
    """JSON list of ``{"bbox_2d": [...], "label": ...}``; 0-1000 relative, or absolute pixels
    in the processor's resized image (``resized=(w, h)``, Qwen2.5-VL convention).

    Each coordinate is ``round(pixel * s)`` with ``s`` from :func:`answer_scale`.

    Args:
        boxes: ``[x1, y1, x2, y2]`` in original-image pixels.
        labels: one label per box.
        width: the original image width.
        height: the original image height.
        coord_format: ``rel1000`` or ``abs``.
        resized: the processor-resized ``(w, h)`` for ``abs``.
    """
    answer_scale(coord_format, width, height, resized)  # rejects an unknown format
    items = []
    for (x1, y1, x2, y2), label in zip(boxes, labels):
        # The two expressions are kept exactly as trained on: a different float order
        # rounds some .5 cases the other way.
        if coord_format == "rel1000":
            coords = [round(x1 / width * 1000), round(y1 / height * 1000), round(x2 / width * 1000), round(y2 / height * 1000)]
        else:
            rw, rh = resized or (width, height)
            sx, sy = rw / width, rh / height
            coords = [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
        items.append({"bbox_2d": coords, "label": label})
    return json.dumps(items, ensure_ascii=False)


@dataclass(frozen=True)
class ParsedAnswer:
    """What :func:`parse_answer` read from one answer, with every problem counted.

    Attributes:
        boxes: valid boxes ``(x1, y1, x2, y2)`` in answer coordinates, in answer order.
        labels: their labels.
        status: one of :data:`PARSE_STATUSES`.
        n_invalid: objects dropped as malformed (not an object, no ``bbox_2d``/``bbox``,
            not 4 finite numbers, no string ``label``).
        n_degenerate: objects dropped because ``x2 <= x1`` or ``y2 <= y1``.
        n_over_cap: objects past the first :data:`MAX_BOXES` of the answer, dropped unread.
    """

    boxes: tuple[tuple[float, float, float, float], ...] = ()
    labels: tuple[str, ...] = ()
    status: str = "failed"
    n_invalid: int = 0
    n_degenerate: int = 0
    n_over_cap: int = 0

    @property
    def n_objects(self) -> int:
        """Objects the answer held: kept plus dropped."""
        return len(self.boxes) + self.n_invalid + self.n_degenerate + self.n_over_cap


def _decode_list(text: str, pos: int, memo: dict) -> tuple[list, str]:
    """Elements of the list opened just before ``pos`` and how it ended: ``complete`` (``]``),
    ``end`` (the text ran out), ``object`` (an element ``{...`` that does not decode: cut) or
    ``other`` (something that is not JSON)."""
    items: list = []
    while True:
        pos = skip_ws(text, pos)
        if pos >= len(text):
            return items, "end"
        if text[pos] == "]":  # also forgives a trailing comma
            return items, "complete"
        found = decode_value(text, pos, memo)
        if found is None:
            return items, "object" if text[pos] == "{" else "other"
        value, pos = found
        items.append(value)
        pos = skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] not in "]{":  # a missing comma between objects is forgiven
            return items, "other"


def _decode_objects(text: str, pos: int, memo: dict) -> tuple[list, bool] | None:
    """A run of bare objects ``{..}, {..}`` starting at ``pos``, or None when none decodes."""
    items: list = []
    while True:
        found = decode_value(text, pos, memo)
        if found is None:
            return (items, False) if items else None
        value, pos = found
        items.append(value)
        pos = skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(text, pos + 1)
        if pos >= len(text) or text[pos] != "{":
            return items, True


def _starts(text: str):
    """Positions of the ``[`` and ``{`` where an answer may start, in order.

    In a run of ``[`` only the last ``MAX_DEPTH + 2`` can: the first element of an earlier
    one is the next ``[``, which holds more than :data:`MAX_DEPTH` levels, does not decode,
    and makes the list prose. Skipping them keeps 1 MB of ``[`` linear.
    """
    pos = 0
    while (match := _START.search(text, pos)) is not None:
        start = match.start()
        if text[start] == "{":
            yield start
            pos = start + 1
            continue
        run_end = _BRACKET_RUN.match(text, start).end()
        last: list[int] = []
        end = run_end
        while len(last) < MAX_DEPTH + 2 and end > start:
            end = text.rfind("[", start, end)
            last.append(end)
        yield from reversed(last)
        pos = run_end


def _try_fast(text: str, pos: int, memo: dict) -> None:
    """Decodes the value at ``pos`` with json's C scanner into ``memo`` when it is plain JSON.

    The usual answer is, and this reads it 5x faster than :func:`_decode_value`. Only the
    first :data:`_FAST_TRIES` starts try it: a failure costs a line count over the text.
    """
    try:
        memo[pos] = _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):  # not JSON, too many digits, or nested too deep
        pass


def _inside_list(text: str, pos: int) -> bool:
    """Whether the ``[`` at ``pos`` is an element of a list (the text before it, spaces aside, ends in ``[`` or ``,``)."""
    j = pos - 1
    while j >= 0 and text[j] in " \t\n\r":  # each space is scanned for one "[" only: linear overall
        j -= 1
    return j >= 0 and text[j] in "[,"


def _find_objects(text: str) -> tuple[list, str]:
    match = _FENCE.search(text)
    if match is not None:
        text = match.group(1)
    memo: dict = {}  # start -> decoded value: each string and container is decoded once
    for n_tried, pos in enumerate(_starts(text)):
        if n_tried < _FAST_TRIES:
            _try_fast(text, pos, memo)
        if text[pos] == "[":
            if memo.get(pos) is not None:
                items, ending = memo[pos][0], "complete"  # a JSON list reads as its elements
            else:
                items, ending = _decode_list(text, pos + 1, memo)
            # A complete list with no object in it ("[1]", "[see below]") is prose: look further on. An empty
            # list is the answer "no objects" only on its own: one inside another list ("[[]]") is not.
            has_object = any(isinstance(item, dict) for item in items)
            is_empty_answer = ending == "complete" and not items and not _inside_list(text, pos)
            if has_object or ending in ("end", "object") or is_empty_answer:
                return items, "ok" if ending == "complete" else "truncated"
        else:
            found = _decode_objects(text, pos, memo)
            if found is not None:
                return found[0], "bare_objects" if found[1] else "truncated"
    return [], "failed"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_answer(text: str) -> ParsedAnswer:
    """Read a model answer into boxes and labels; never raises, counts every problem.

    Handles text and ```` ```json ```` fences around the list, truncated lists (the
    complete objects are kept), bare objects without a list, ``bbox_2d`` or ``bbox``
    keys (``bbox_2d`` wins when both are present). Malformed and degenerate objects
    are dropped and counted (:class:`ParsedAnswer`), and so is every object after the
    first :data:`MAX_BOXES` valid boxes. An empty list is the answer "no objects"
    (``ok``); an empty list nested in another (``[[]]``) is no answer (``failed``). Labels are not checked against
    any dataset here and duplicates are kept: evaluation counts both.

    Linear in the length of the text and iterative: containers nested deeper than
    :data:`MAX_DEPTH` do not decode, numbers with more digits than ``int()`` reads are
    not numbers, and no input raises (1 MB of ``{`` or ``[`` reads in well under a second).

    The naive equivalent for a clean answer: ``[(o["bbox_2d"], o["label"]) for o in
    json.loads(text)]``.

    Args:
        text: the model's raw answer.
    """
    if not isinstance(text, str):
        return ParsedAnswer()
    items, status = _find_objects(text)
    n_over_cap = 0
    boxes, labels, n_invalid, n_degenerate = [], [], 0, 0
    for k, item in enumerate(items):
        if len(boxes) == MAX_BOXES:
            n_over_cap = len(items) - k
            break
        box = None
        if isinstance(item, dict):
            box = next((item[k] for k in _BOX_KEYS if k in item), None)
        label = item.get("label") if isinstance(item, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box) and isinstance(label, str)):
            n_invalid += 1
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 > x1 and y2 > y1):
            n_degenerate += 1
            continue
        boxes.append((x1, y1, x2, y2))
        labels.append(label)
    return ParsedAnswer(tuple(boxes), tuple(labels), status, n_invalid, n_degenerate, n_over_cap)


def answer_boxes_to_pixels(boxes, width: int, height: int, coord_format: str,
                           resized: tuple[int, int] | None = None) -> np.ndarray:
    """Answer-coordinate boxes -> original-image pixel boxes ``(n, 4)``, clipped to the image.

    ``pixel = clip(answer / s, 0, size)`` with ``s`` from :func:`answer_scale`. A box may
    become degenerate by clipping (wholly outside the image); the caller counts those.
    """
    sx, sy = answer_scale(coord_format, width, height, resized)
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([sx, sy, sx, sy])
    out[:, 0::2] = out[:, 0::2].clip(0.0, width)
    out[:, 1::2] = out[:, 1::2].clip(0.0, height)
    return out


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def _smart_resize():
    """transformers' own ``smart_resize``: transformers 5 keeps a torchvision-free copy in the
    PIL image processor module (the torchvision module needs torchvision to import)."""
    import importlib
    import importlib.util

    pil = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
    name = pil if importlib.util.find_spec(pil) is not None else "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    return importlib.import_module(name).smart_resize


def resize_factor(processor) -> int:
    """``patch_size * merge_size`` of the processor (or image processor): the side multiple
    of every resized image (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    image_processor = _image_processor(processor)
    return int(image_processor.patch_size) * int(image_processor.merge_size)


def resized_size(processor, width: int, height: int) -> tuple[int, int]:
    """``(w, h)`` of the image as the processor resizes it: its ``smart_resize`` with its own
    factor (:func:`resize_factor`) and ``size`` (``shortest_edge`` = min pixels,
    ``longest_edge`` = max pixels)."""
    smart_resize = _smart_resize()
    image_processor = _image_processor(processor)
    size = image_processor.size
    rh, rw = smart_resize(height, width, factor=resize_factor(image_processor),
                          min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return rw, rh


# What an answer character (and token) is, for coord_loss / label_loss: JSON structure, a box coordinate, or a label.
ROLE_OTHER, ROLE_COORD, ROLE_LABEL = 0, 1, 2
_NUMBER_CHARS = frozenset("+-.0123456789eE")


def answer_char_roles(answer: str) -> np.ndarray:
    """Role of every character of an answer (``int8``, ``len(answer)``): a scan of the JSON text.

    Characters of the numbers inside a ``bbox_2d`` (or ``bbox``) list are
    :data:`ROLE_COORD`; the characters between the quotes of a ``label`` string
    value (escapes included) are :data:`ROLE_LABEL`; everything else (brackets,
    keys, quotes, commas, spaces) is :data:`ROLE_OTHER`. Text that is not JSON
    is scanned the same way and simply finds fewer roles.
    Naive equivalent for an answer from :func:`format_answer`: mark
    ``str(c)`` for every coordinate and ``json.dumps(label)[1:-1]`` for every
    label, in writing order.
    """
    roles = np.zeros(len(answer), dtype=np.int8)
    key: str | None = None  # the key whose value comes next
    in_box = False
    i, n = 0, len(answer)
    while i < n:
        c = answer[i]
        if c == '"':
            j = i + 1
            while j < n and answer[j] != '"':
                j += 2 if answer[j] == "\\" else 1
            k = j + 1
            while k < n and answer[k] in " \t\r\n":
                k += 1
            if k < n and answer[k] == ":" and not in_box:
                try:
                    key = json.loads(answer[i:j + 1])
                except ValueError:
                    key = None
            else:
                if key == "label" and not in_box:
                    roles[i + 1:min(j, n)] = ROLE_LABEL
                key = None
            i = j + 1
        elif c == "[" and key in _BOX_KEYS:
            in_box, key = True, None
            i += 1
        elif c == "]" and in_box:
            in_box = False
            i += 1
        elif in_box and c in _NUMBER_CHARS:
            j = i
            while j < n and answer[j] in _NUMBER_CHARS:
                j += 1
            roles[i:j] = ROLE_COORD
            i = j
        else:
            if c in ",{}" and not in_box:
                key = None
            i += 1
    return roles
