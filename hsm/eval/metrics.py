"""Detection metrics of VLM answers against records: pure functions, no files.

COCO bbox metrics (mAP@[.5:.95], AP50, AP75, AR@100, per-class AP) come from
faster-coco-eval. VLM answers carry no confidence, so **every box scores 1.0**;
COCO sorts detections by score with a stable sort, so ties keep answer order: an
earlier box of an answer is matched first, and past 100 boxes per image (COCO's
``maxDets``) the later ones are not scored. Beside COCO, each sample gets greedy
matches at IoU 0.5 (TP/FP/FN, the IoU of each match), duplicates and the parse
problems of its answer, all counted, none silently dropped. An answer's boxes past
:data:`hsm.data.answer.MAX_BOXES` are counted (``over_cap``) and not scored, so
matching one answer holds at most ``MAX_BOXES x n_ground_truth`` IoUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hsm.data.answer import answer_boxes_to_pixels, parse_answer
from hsm.data.records import Record

__all__ = [
    "MATCH_IOU",
    "DUPLICATE_IOU",
    "SamplePrediction",
    "DatasetScore",
    "iou_matrix",
    "match_boxes",
    "duplicate_flags",
    "predict_sample",
    "coco_ground_truth",
    "coco_detections",
    "coco_summary",
    "score_dataset",
]

MATCH_IOU = 0.5
DUPLICATE_IOU = 0.9


@dataclass(frozen=True)
class SamplePrediction:
    """One answer read against its record.

    Attributes:
        boxes: ``(n, 4)`` pixel boxes ``x1, y1, x2, y2`` of known labels, clipped to the image.
        labels: their labels, in answer order.
        status: the parse status (:data:`hsm.data.answer.PARSE_STATUSES`).
        n_invalid: malformed objects.
        n_degenerate: empty boxes, before or after clipping to the image.
        n_unknown_label: well-formed boxes whose label is not a dataset category (false positives).
        n_over_cap: objects past the first :data:`hsm.data.answer.MAX_BOXES` of the answer, not scored.
    """

    boxes: np.ndarray
    labels: list[str]
    status: str
    n_invalid: int = 0
    n_degenerate: int = 0
    n_unknown_label: int = 0
    n_over_cap: int = 0


@dataclass
class DatasetScore:
    """Everything ``hsm eval`` writes for one dataset."""

    metrics: dict
    ground_truth: dict
    detections: list[dict]
    per_sample: dict[str, list] = field(default_factory=dict)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``(n, 4)`` with every box of ``b`` ``(m, 4)``, xyxy.

    Naive equivalent: ``[[area(a_i & b_j) / area(a_i | b_j) for b_j in b] for a_i in a]``.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0)
    h = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(0)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(pred_boxes, pred_labels, gt_boxes, gt_labels, iou_threshold: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """Greedy matches ``(pred_index, gt_index, iou)`` as COCO makes them at one threshold.

    Predictions in answer order each take the still-unmatched ground truth of the
    same label with the highest IoU ``>= iou_threshold`` (the first on ties).
    """
    ious = iou_matrix(pred_boxes, gt_boxes)
    taken = np.zeros(len(gt_labels), dtype=bool)
    gt_labels = np.asarray(gt_labels, dtype=object)
    matches = []
    for i, label in enumerate(pred_labels):
        candidates = np.where(~taken & (gt_labels == label), ious[i], -1.0)
        if len(candidates) == 0:
            continue
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_threshold:
            taken[j] = True
            matches.append((i, j, float(candidates[j])))
    return matches


def duplicate_flags(boxes, labels, iou_threshold: float = DUPLICATE_IOU) -> np.ndarray:
    """``flags[i]``: box ``i`` repeats an earlier box of the same label (IoU ``>= iou_threshold``)."""
    ious = iou_matrix(boxes, boxes)
    labels = np.asarray(labels, dtype=object)
    same = (labels[:, None] == labels[None, :]) & (ious >= iou_threshold)
    return np.tril(same, k=-1).any(axis=1)


def predict_sample(answer: str | None, record: Record, coord_format: str, categories,
                   resized: tuple[int, int] | None = None) -> SamplePrediction:
    """Parse one answer and map its boxes to the record's pixels (``answer=None``: no answer).

    Boxes are clipped to the image; a box left empty by clipping counts as degenerate;
    a label outside ``categories`` counts as unknown and is not scored by COCO.
    """
    if answer is None:
        return SamplePrediction(np.zeros((0, 4)), [], "missing")
    parsed = parse_answer(answer)
    pixels = answer_boxes_to_pixels(parsed.boxes, record.width, record.height, coord_format, resized)
    non_empty = (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])
    known = np.array([label in categories for label in parsed.labels], dtype=bool)
    keep = non_empty & known
    return SamplePrediction(
        boxes=pixels[keep], labels=[label for label, k in zip(parsed.labels, keep) if k], status=parsed.status,
        n_invalid=parsed.n_invalid, n_degenerate=parsed.n_degenerate + int((~non_empty).sum()),
        n_unknown_label=int((non_empty & ~known).sum()), n_over_cap=parsed.n_over_cap,
    )


def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_ground_truth(records: list[Record], image_names: list[str], categories: list[str]) -> dict:
    """COCO ground truth: image ``id`` = the record's index, ``file_name`` = its ``image`` as
    written in the JSONL, category ids ``1..K`` in ``categories`` order, annotation ids from 1."""
    category_id = {name: i + 1 for i, name in enumerate(categories)}
    images, annotations = [], []
    for index, (record, name) in enumerate(zip(records, image_names)):
        images.append({"id": index, "file_name": name, "width": record.width, "height": record.height})
        for obj in record.objects:
            x, y, w, h = _xywh(obj.bbox)
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": category_id[obj.label],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": category_id[name], "name": name} for name in categories]}


def coco_detections(predictions: list[SamplePrediction], categories: list[str]) -> list[dict]:
    """COCO results ``[x, y, w, h]`` in original pixels, ``score`` 1.0, in answer order."""
    category_id = {name: i + 1 for i, name in enumerate(categories)}
    return [{"image_id": index, "category_id": category_id[label], "bbox": _xywh(box), "score": 1.0}
            for index, p in enumerate(predictions) for box, label in zip(p.boxes, p.labels)]


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) and value >= 0 else None


def coco_summary(ground_truth: dict, detections: list[dict]) -> dict:
    """``mAP`` (@[.5:.95]), ``AP50``, ``AP75``, ``AR100`` and ``per_class`` AP by faster-coco-eval.

    A value COCO leaves undefined (no ground truth) is ``None``.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if not ground_truth["annotations"]:
        return {"mAP": None, "AP50": None, "AP75": None, "AR100": None, "per_class": {}}
    quiet = lambda *args, **kwargs: None  # noqa: E731
    # COCO adds keys to annotation dicts (ignore, area, id, segmentation): hand it copies of ours.
    gt = COCO({**ground_truth, "annotations": [dict(a) for a in ground_truth["annotations"]]}, print_function=quiet)
    dt = gt.loadRes([dict(d) for d in detections])
    evaluator = COCOeval_faster(gt, dt, "bbox", print_function=quiet)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = evaluator.stats
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]; area "all", maxDets 100.
    precision = evaluator.eval["precision"]
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        per_class[names[cat_id]] = float(values[values > -1].mean()) if (values > -1).any() else None
    return {"mAP": _finite(stats[0]), "AP50": _finite(stats[1]), "AP75": _finite(stats[2]), "AR100": _finite(stats[8]),
            "per_class": per_class}


def score_dataset(records: list[Record], image_names: list[str], answers: list[str | None], coord_format: str,
                  resized: list[tuple[int, int]] | None = None, sample_ids: list[str] | None = None) -> DatasetScore:
    """Score ``answers[i]`` (raw text, or None when there is none) against ``records[i]``.

    Categories are the labels of the records, sorted. ``resized[i]`` is record ``i``'s
    processor-resized size (``coord_format: abs``). The per-sample table has, at IoU 0.5:
    ``tp``, ``fp`` (unmatched boxes, unknown labels included), ``fn``, and
    ``mean_iou`` (mean IoU of the matches, NaN without one).

    Args:
        records: the ground truth.
        image_names: each record's image name in the COCO files.
        answers: one raw answer per record (None: missing).
        coord_format: ``rel1000`` or ``abs``.
        resized: per record, the processor-resized ``(w, h)`` (``abs`` only).
        sample_ids: per record, its id in the per-sample table (default: the record ids).
    """
    if len(answers) != len(records):
        raise ValueError(f"{len(answers)} answers for {len(records)} records")
    categories = sorted({obj.label for record in records for obj in record.objects})
    known = set(categories)
    predictions = [predict_sample(a, r, coord_format, known, resized[i] if resized else None)
                   for i, (a, r) in enumerate(zip(answers, records))]
    ground_truth = coco_ground_truth(records, image_names, categories)
    detections = coco_detections(predictions, categories)
    rows: dict[str, list] = {key: [] for key in (
        "id", "index", "status", "n_pred", "tp", "fp", "fn", "duplicates", "invalid", "degenerate", "unknown_label",
        "over_cap", "mean_iou")}
    matched_ious: list[float] = []
    for index, (record, p) in enumerate(zip(records, predictions)):
        gt_boxes = [o.bbox for o in record.objects]
        gt_labels = [o.label for o in record.objects]
        matches = match_boxes(p.boxes, p.labels, gt_boxes, gt_labels)
        ious = [iou for _, _, iou in matches]
        matched_ious += ious
        n_pred = len(p.labels)
        rows["id"].append(sample_ids[index] if sample_ids else (record.id if record.id is not None else str(index)))
        rows["index"].append(index)
        rows["status"].append(p.status)
        rows["n_pred"].append(n_pred)
        rows["tp"].append(len(matches))
        rows["fp"].append(n_pred - len(matches) + p.n_unknown_label)
        rows["fn"].append(len(gt_labels) - len(matches))
        rows["duplicates"].append(int(duplicate_flags(p.boxes, p.labels).sum()))
        rows["invalid"].append(p.n_invalid)
        rows["degenerate"].append(p.n_degenerate)
        rows["unknown_label"].append(p.n_unknown_label)
        rows["over_cap"].append(p.n_over_cap)
        rows["mean_iou"].append(float(np.mean(ious)) if ious else float("nan"))
    statuses = rows["status"]
    n_pred_total = sum(rows["n_pred"])
    tp, fp, fn = sum(rows["tp"]), sum(rows["fp"]), sum(rows["fn"])
    metrics = {
        **coco_summary(ground_truth, detections),
        "parse_failures": statuses.count("failed"),
        "duplicate_rate": sum(rows["duplicates"]) / n_pred_total if n_pred_total else 0.0,
        "unknown_labels": sum(rows["unknown_label"]),
        "mean_best_iou": float(np.mean(matched_ious)) if matched_ious else None,
        "n_images": len(records),
        "n_gt": len(ground_truth["annotations"]),
        "n_pred": n_pred_total,
        "tp50": tp, "fp50": fp, "fn50": fn,
        "precision50": tp / (tp + fp) if tp + fp else 0.0,
        "recall50": tp / (tp + fn) if tp + fn else 0.0,
        "duplicates": sum(rows["duplicates"]),
        "invalid_objects": sum(rows["invalid"]),
        "degenerate_boxes": sum(rows["degenerate"]),
        "boxes_over_cap": sum(rows["over_cap"]),
        "truncated": statuses.count("truncated"),
        "bare_objects": statuses.count("bare_objects"),
        "missing_answers": statuses.count("missing"),
    }
    return DatasetScore(metrics, ground_truth, detections, rows)
