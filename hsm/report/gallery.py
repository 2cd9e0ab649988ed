"""Gallery cards: thumbnails with boxes drawn by Pillow, and their captions.

Only the images of the cards shown are decoded; a thumbnail is JPEG bytes
embedded in the page as a data URI.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

from hsm.data.records import Record

__all__ = ["Card", "record_thumbnails", "predicted_labels", "data_uri", "GT_COLOR", "PRED_COLOR"]

GT_COLOR = (46, 204, 113)
PRED_COLOR = (230, 57, 70)
THUMB_SIDE = 200


@dataclass
class Card:
    """One gallery card: images (data URIs) and the caption values."""

    sample_id: str
    dataset: str
    base_idx: int
    score: float
    loss_by_epoch: dict[int, float]
    token_acc: float | None
    times_drawn: int
    image: str | None  # data URI with ground-truth boxes, None when the image is missing
    predicted: str | None  # data URI with predicted boxes, when hsm eval wrote predictions
    counts: dict[str, int] | None  # TP/FP/FN when predictions exist
    note: str = ""
    labels: list[str] = field(default_factory=list)  # ground-truth box labels, in box order (numbered on the image)
    predicted_labels: list[str] | None = None  # the eval answer's box labels, when it exists
    n_objects: int | None = None  # ground-truth boxes; 0 is an empty answer ("[]"), None when there is no record


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _encode(rgb, boxes, color, side, decoded_w, decoded_h, Image, ImageDraw, labels=()) -> bytes:
    """JPEG of ``rgb`` scaled to ``side`` on its longer side, with ``boxes`` (decoded pixels) outlined
    and each box's number and label written at its top-left corner."""
    factor = side / max(decoded_w, decoded_h)
    size = (max(1, round(decoded_w * factor)), max(1, round(decoded_h * factor)))
    resample = Image.Resampling.NEAREST if factor > 1 else Image.Resampling.BILINEAR
    small = rgb.resize(size, resample)
    draw = ImageDraw.Draw(small)
    width = max(1, round(side / 100))
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1 * factor, y1 * factor, x2 * factor - 1, y2 * factor - 1], outline=color, width=width)
    for number, ((x1, y1, _, _), label) in enumerate(zip(boxes, labels), start=1):
        # Pillow's built-in bitmap font: no font file to ship; the caption lists the labels in full.
        text = f"{number} {label}"[:24]
        left, top, right, bottom = draw.textbbox((x1 * factor + 1, y1 * factor + 1), text)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
        draw.text((x1 * factor + 1, y1 * factor + 1), text, fill=color)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def scaled_boxes(record: Record, decoded_size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """The record's boxes in the pixel space of the decoded (possibly draft-reduced) image."""
    sx, sy = decoded_size[0] / record.width, decoded_size[1] / record.height
    return [(o.bbox[0] * sx, o.bbox[1] * sy, o.bbox[2] * sx, o.bbox[3] * sy) for o in record.objects]


def record_thumbnails(record: Record, prediction: dict[str, Any] | None, coord_format: str = "rel1000",
                      side: int = THUMB_SIDE):
    """``(gt_uri, pred_uri)`` for one record; one decode serves both.

    The predicted boxes are the eval answer's, parsed by :mod:`hsm.data.answer` (the one parser);
    ``pred_uri`` is None without an answer, or for ``abs`` answers (their pixels are the
    processor-resized image's).
    """
    from PIL import Image, ImageDraw

    from hsm.data.answer import answer_boxes_to_pixels, needs_resized, parse_answer

    with Image.open(record.image) as img:
        img.draft("RGB", (side, side))
        rgb = img.convert("RGB")
    size = rgb.size
    labels = [o.label for o in record.objects]
    gt = data_uri(_encode(rgb, scaled_boxes(record, size), GT_COLOR, side, *size, Image, ImageDraw, labels))
    pred = None
    if prediction is not None and prediction.get("answer") is not None and not needs_resized(coord_format):
        parsed = parse_answer(prediction["answer"])
        pixels = answer_boxes_to_pixels(parsed.boxes, record.width, record.height, coord_format)
        sx, sy = size[0] / record.width, size[1] / record.height
        boxes = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in pixels.tolist()]
        pred = data_uri(_encode(rgb, boxes, PRED_COLOR, side, *size, Image, ImageDraw, parsed.labels))
    return gt, pred


def predicted_labels(prediction: dict[str, Any] | None) -> list[str] | None:
    """The box labels of an eval answer, in answer order (what the predicted thumbnail numbers),
    or None without an answer.

    Args:
        prediction: what :func:`hsm.report.data.read_predictions` holds for the record.
    """
    from hsm.data.answer import parse_answer

    if prediction is None or prediction.get("answer") is None:
        return None
    return list(parse_answer(prediction["answer"]).labels)
