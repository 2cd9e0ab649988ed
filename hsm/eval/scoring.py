"""``hsm eval`` files: answers in, one folder per dataset out.

Answers are JSONL, one ``{"id": <record id>, "answer": "<raw model text>"}`` per
line; a record's id is its ``id``, else its 0-based line index (as a number or a
string). A record with no answer line has no predictions. Per dataset, under the
output folder::

    <dataset>/answers.jsonl        (hsm eval run only) the raw answers
    <dataset>/gt.json              COCO ground truth; images[].id = record index,
                                   images[].file_name = the record's image as in the JSONL
    <dataset>/detections.json      COCO results [x, y, w, h] in original pixels, score 1.0
    <dataset>/per_sample.parquet   PER_SAMPLE_SCHEMA
    <dataset>/metrics.json         {"<dataset>": {mAP, AP50, AP75, AR100, per_class, ...}}
    metrics.json                   every dataset of the call
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from hsm.eval.metrics import DatasetScore, score_dataset
from hsm.io import write_bytes_atomic, write_json_atomic
from hsm.data.answer import needs_resized, resized_size
from hsm.data.records import Record, json_lines, read_jsonl

__all__ = [
    "PER_SAMPLE_SCHEMA",
    "AnswerError",
    "record_keys",
    "read_image_names",
    "read_answers",
    "write_answers",
    "score_records_file",
    "write_dataset",
    "write_metrics",
    "summary_table",
]

PER_SAMPLE_SCHEMA = pa.schema([
    pa.field("id", pa.string()),            # the record's id, else its line index
    pa.field("index", pa.int64()),          # 0-based record index (= gt.json images[].id)
    pa.field("status", pa.string()),        # parse status: ok | bare_objects | truncated | failed | missing
    pa.field("n_pred", pa.int32()),         # scored boxes (known labels, non-empty)
    pa.field("tp", pa.int32()),             # matches at IoU 0.5
    pa.field("fp", pa.int32()),             # unmatched boxes + unknown-label boxes
    pa.field("fn", pa.int32()),             # unmatched ground truth
    pa.field("duplicates", pa.int32()),     # boxes repeating an earlier same-label box (IoU >= 0.9)
    pa.field("invalid", pa.int32()),        # malformed objects
    pa.field("degenerate", pa.int32()),     # empty boxes (as written or after clipping)
    pa.field("unknown_label", pa.int32()),  # labels outside the dataset's categories
    pa.field("over_cap", pa.int32()),       # objects past hsm.data.answer.MAX_BOXES, not scored
    pa.field("mean_iou", pa.float64()),     # mean IoU of the matches (NaN without one)
])


class AnswerError(ValueError):
    """A bad answers file; the message starts with ``file:line``."""


def record_keys(records: list[Record]) -> list[str]:
    """The id answers use for each record: its ``id``, else its index as a string."""
    return [r.id if r.id is not None else str(i) for i, r in enumerate(records)]


def read_image_names(path: str | Path) -> list[str]:
    """Each record's ``image`` exactly as written in the JSONL (blank lines skipped, as ``read_jsonl`` does)."""
    names = []
    for _, _, obj, problem in json_lines(Path(path)):
        if problem is not None:
            raise AnswerError(problem)
        names.append(obj["image"])
    return names


def read_answers(path: str | Path, keys: list[str]) -> list[str | None]:
    """Answers aligned with ``keys`` (None where a record has no answer line).

    Raises:
        AnswerError: malformed line, missing ``id``/``answer``, repeated id, or an id
            that names no record; the message gives ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise AnswerError(f"{path}: file not found")
    position = {key: i for i, key in enumerate(keys)}
    answers: list[str | None] = [None] * len(keys)
    seen: dict[str, int] = {}
    for number, where, obj, problem in json_lines(path):
        if problem is not None:
            raise AnswerError(problem)
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("answer"), str):
            raise AnswerError(f'{where}: expected {{"id": <record id>, "answer": "<text>"}}')
        key = obj["id"]
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise AnswerError(f"{where}: 'id' must be a string or a line index, got {key!r}")
        key = str(key)
        if key in seen:
            raise AnswerError(f"{where}: duplicate id {key!r} (first at line {seen[key]})")
        if key not in position:
            raise AnswerError(f"{where}: id {key!r} names no record (ids are the records' 'id', else their "
                              "0-based line index)")
        seen[key] = number
        answers[position[key]] = obj["answer"]
    return answers


def write_answers(path: str | Path, keys: list[str], answers: list[str]) -> None:
    """Write the answers JSONL (atomically)."""
    text = "".join(json.dumps({"id": k, "answer": a}, ensure_ascii=False) + "\n" for k, a in zip(keys, answers))
    write_bytes_atomic(text.encode("utf-8"), path)


def score_records_file(records_path: str | Path, answers: list[str | None], coord_format: str, *,
                       processor=None, records: list[Record] | None = None) -> DatasetScore:
    """Score answers aligned with the records of ``records_path``.

    ``records``: the file's records already read, or their first ``n`` (``max_samples``).
    ``coord_format: abs`` needs ``processor`` (its resize, :func:`hsm.data.answer.resized_size`).
    """
    if needs_resized(coord_format) and processor is None:
        raise ValueError(f"coord_format {coord_format!r} needs the processor that resized the images (--processor)")
    if records is None:
        records = read_jsonl(records_path, check_images=False)
    resized = None
    if needs_resized(coord_format):
        resized = [resized_size(processor, r.width, r.height) for r in records]
    names = read_image_names(records_path)[: len(records)]
    return score_dataset(records, names, answers, coord_format, resized, record_keys(records))


def write_dataset(score: DatasetScore, directory: str | Path, name: str) -> None:
    """Write gt.json, detections.json, per_sample.parquet and metrics.json under ``directory``."""
    from hsm.io import write_parquet_atomic

    directory = Path(directory)
    for payload, file_name in ((score.ground_truth, "gt.json"), (score.detections, "detections.json")):
        write_bytes_atomic(json.dumps(payload, separators=(",", ":")).encode("utf-8"), directory / file_name)
    write_parquet_atomic(pa.Table.from_pydict(score.per_sample, schema=PER_SAMPLE_SCHEMA), directory / "per_sample.parquet")
    write_json_atomic({name: score.metrics}, directory / "metrics.json")


def write_metrics(metrics: dict[str, dict], path: str | Path) -> None:
    """``{"<dataset>": metrics}`` for every dataset of the call."""
    write_json_atomic(metrics, path)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(metrics: dict[str, dict]):
    """A rich table: one row per metric, one column per dataset."""
    from rich.table import Table

    rows = ["mAP", "AP50", "AP75", "AR100", "mean_best_iou", "precision50", "recall50", "n_images", "n_gt", "n_pred",
            "parse_failures", "truncated", "bare_objects", "invalid_objects", "degenerate_boxes", "boxes_over_cap", "duplicate_rate",
            "unknown_labels", "missing_answers"]
    table = Table(title="hsm eval", caption="every box scores 1.0 (VLM answers carry no confidence)")
    table.add_column("metric")
    for name in metrics:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row, *(_cell(m.get(row)) for m in metrics.values()))
    return table
