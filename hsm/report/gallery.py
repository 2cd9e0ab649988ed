"""Gallery cards: thumbnails with boxes drawn by Pillow, and their captions.

Only the images of the cards shown are decoded; a thumbnail is JPEG bytes
embedded in the page as a data URI.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsm.records import Record

__all__ = ["Card", "record_thumbnails", "data_uri", "match_counts", "GT_COLOR", "PRED_COLOR"]

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


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _encode(rgb, boxes, color, side, decoded_w, decoded_h, Image, ImageDraw) -> bytes:
    """JPEG of ``rgb`` scaled to ``side`` on its longer side, with ``boxes`` (decoded pixels) outlined."""
    factor = side / max(decoded_w, decoded_h)
    size = (max(1, round(decoded_w * factor)), max(1, round(decoded_h * factor)))
    resample = Image.Resampling.NEAREST if factor > 1 else Image.Resampling.BILINEAR
    small = rgb.resize(size, resample)
    draw = ImageDraw.Draw(small)
    width = max(1, round(side / 100))
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1 * factor, y1 * factor, x2 * factor - 1, y2 * factor - 1], outline=color, width=width)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def scaled_boxes(record: Record, decoded_size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """The record's boxes in the pixel space of the decoded (possibly draft-reduced) image."""
    sx, sy = decoded_size[0] / record.width, decoded_size[1] / record.height
    return [(o.bbox[0] * sx, o.bbox[1] * sy, o.bbox[2] * sx, o.bbox[3] * sy) for o in record.objects]


def record_thumbnails(record: Record, prediction: dict[str, Any] | None, side: int = THUMB_SIDE):
    """``(gt_uri, pred_uri)`` for one record; one decode serves both."""
    from PIL import Image, ImageDraw

    with Image.open(record.image) as img:
        img.draft("RGB", (side, side))
        rgb = img.convert("RGB")
    size = rgb.size
    gt = data_uri(_encode(rgb, scaled_boxes(record, size), GT_COLOR, side, *size, Image, ImageDraw))
    pred = None
    if prediction is not None:
        sx, sy = size[0] / record.width, size[1] / record.height
        boxes = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in (o["bbox"] for o in prediction.get("objects", []))]
        pred = data_uri(_encode(rgb, boxes, PRED_COLOR, side, *size, Image, ImageDraw))
    return gt, pred


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_counts(record: Record, prediction: dict[str, Any], iou: float = 0.5) -> dict[str, int]:
    """TP/FP/FN: the prediction's own counts when given, else greedy same-label matching at IoU >= ``iou``.

    Naive equivalent: for each predicted box in order, match it to the unmatched
    ground-truth box of the same label with the highest IoU, if that IoU >= ``iou``.
    """
    if all(k in prediction for k in ("tp", "fp", "fn")):
        return {k: int(prediction[k]) for k in ("tp", "fp", "fn")}
    unmatched = list(record.objects)
    tp = 0
    for obj in prediction.get("objects", []):
        best, best_iou = None, iou
        for gt in unmatched:
            if gt.label == obj.get("label"):
                value = _iou(gt.bbox, obj["bbox"])
                if value >= best_iou:
                    best, best_iou = gt, value
        if best is not None:
            unmatched.remove(best)
            tp += 1
    return {"tp": tp, "fp": len(prediction.get("objects", [])) - tp, "fn": len(unmatched)}
