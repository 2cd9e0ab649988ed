"""What the report shows, gathered from a run directory into plain values.

Reads the run's ``hsm/`` artefacts (manifests, plans, events, the saved config)
once; everything after this module is a pure function of :class:`RunData`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hsm.mining.suspects import DataMap, data_map, read_epoch_metrics
from hsm.mining.planner import epoch_ranges
from hsm.layout import RunPaths

__all__ = ["ReportError", "SampleStats", "RunData", "load_run", "read_predictions", "order_by_score", "SampleRecords",
           "read_sample_records"]


class ReportError(ValueError):
    """The run directory cannot be reported on; the message says what is missing."""


@dataclass
class SampleStats:
    """Per target sample aggregates over the whole event log, keyed by ``base_idx``."""

    loss_by_epoch: dict[int, dict[int, float]]
    token_acc: dict[int, float]  # mean over the run
    times_drawn: dict[int, int]


@dataclass
class RunData:
    """Everything the report needs from one run."""

    run_dir: Path
    config_text: str
    config: dict[str, Any]
    target: str
    metric: str
    manifests: dict[int, dict[str, Any]]  # plan epoch -> manifest
    plans: dict[int, pa.Table]  # plan epoch -> plan rows
    epoch: int  # the plan epoch shown in galleries and the weight histogram
    dataset_loss: dict[str, dict[int, float]]  # dataset -> epoch -> mean train loss
    draws: dict[int, dict[int, int]]  # event epoch -> base_idx -> times drawn (target)
    stats: SampleStats
    data_map: DataMap
    dataset_info: dict[str, Any] | None
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _config(hsm_dir: Path) -> tuple[str, dict[str, Any]]:
    import yaml

    path = RunPaths.at(hsm_dir).config
    if not path.is_file():
        raise ReportError(f"{path}: not found; is {hsm_dir.parent} the output_dir of an hsm train run?")
    text = _recorded_text(path)
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise ReportError(f"{path}: not a config (a YAML mapping), got {type(config).__name__}")
    return text, config


def _recorded_text(path: Path) -> str:
    """A file training wrote, as UTF-8 text, checked against its sha256 record (:func:`hsm.io.read_recorded`)."""
    from hsm.io import ChecksumMismatch, read_recorded

    try:
        return read_recorded(path).decode("utf-8")
    except ChecksumMismatch as e:
        raise ReportError(str(e)) from e
    except OSError as e:
        raise ReportError(f"{path}: unreadable ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text ({e}); the file is damaged") from e


def _dataset_info(hsm_dir: Path) -> dict[str, Any] | None:
    """``hsm/dataset.json`` (the target's name, size, fingerprint), checked; None when the run has none."""
    path = RunPaths.at(hsm_dir).dataset_info
    if not path.is_file():
        return None
    try:
        info = json.loads(_recorded_text(path))
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(info, dict) or not isinstance(info.get("target"), dict):
        raise ReportError(f"{path}: not the dataset record hsm train writes (no 'target' object)")
    return info


def _plans(hsm_dir: Path) -> tuple[dict[int, dict[str, Any]], dict[int, pa.Table]]:
    """Every published plan and its manifest, verified by the plan module (manifest, sha256, page checksums)."""
    from hsm.mining.plan import PlanError, plan_epochs, read_manifest, read_plan_table

    manifests, tables = {}, {}
    try:
        for epoch in plan_epochs(hsm_dir):
            if read_manifest(hsm_dir, epoch) is not None:  # an empty plan directory holds no plan
                manifests[epoch], tables[epoch] = read_plan_table(hsm_dir, epoch)
    except PlanError as e:
        raise ReportError(str(e)) from e
    return manifests, tables


def _with_sample_ids(hsm_dir: Path, epoch: int, plan: pa.Table) -> pa.Table:
    """The plan with its ``sample_id`` column, joined from the append-only id table (plans are keyed by base_idx)."""
    if "sample_id" in plan.column_names:
        return plan
    from hsm.mining.state import read_sample_ids

    ids = read_sample_ids(hsm_dir, epoch - 1, dataset=None).select(["dataset", "base_idx", "sample_id"])
    plan = plan.cast(pa.schema([f.with_type(pa.string()) if f.name == "dataset" else f for f in plan.schema]))
    ids = ids.cast(pa.schema([f.with_type(pa.string()) if f.name == "dataset" else f for f in ids.schema]))
    joined = plan.join(ids, keys=["dataset", "base_idx"], join_type="left outer")
    return joined.sort_by([("base_idx", "ascending")])


def load_run(run_dir: str | Path, *, epoch: int | None = None, skip_corrupt: bool = False) -> RunData:
    """Read a run for the report; ``epoch`` picks the plan shown (default: the latest); ``skip_corrupt``
    leaves damaged event parts out (warned) instead of refusing the run."""
    import duckdb

    from hsm.mining.queries import connect

    run_dir = Path(run_dir)
    hsm_dir = RunPaths.of(run_dir).root
    if not hsm_dir.is_dir():
        raise ReportError(f"{run_dir}: no hsm/ directory; is this a run's output_dir?")
    config_text, config = _config(hsm_dir)
    manifests, plan_tables = _plans(hsm_dir)
    if not manifests:
        mining = ((config.get("custom") or {}) if isinstance(config, dict) else {}).get("hard_sample_mining")
        if not (isinstance(mining, dict) and mining.get("enabled")):
            # hsm plan would refuse too: say why instead of pointing at it.
            raise ReportError(f"{hsm_dir / 'config.yaml'}: mining is off in this run (custom.hard_sample_mining "
                              "absent or enabled: false), so there are no plans to report on; train with "
                              "custom.hard_sample_mining.enabled=true to get one")
        raise ReportError(f"{hsm_dir / 'plans'}: no plans yet; train for 2+ epochs or run hsm plan --epoch 1")
    if epoch is None:
        epoch = max(manifests)
    elif epoch not in manifests:
        raise ReportError(f"--epoch {epoch}: no plan for it; plans exist for epochs {epoch_ranges(manifests)}")
    from hsm.io import ChecksumMismatch
    from hsm.schemas import SchemaError

    dataset_info = _dataset_info(hsm_dir)
    try:
        plans = {e: _with_sample_ids(hsm_dir, e, plan_tables[e]) for e in manifests}
    except (SchemaError, ChecksumMismatch) as e:
        raise ReportError(str(e)) from e
    latest = manifests[max(manifests)]
    target = latest["target"]["name"]
    metric = latest.get("metric") or "loss"
    try:
        con = connect(run_dir, skip_corrupt=skip_corrupt)  # checks plans, states, event parts and id tables first
    except (ValueError, RuntimeError) as e:
        raise ReportError(str(e)) from e
    try:
        per_dataset = con.sql(
            "SELECT dataset, epoch, avg(loss) FROM events GROUP BY ALL ORDER BY dataset, epoch").fetchall()
        per_sample = con.execute(
            "SELECT base_idx, epoch, avg(loss), sum(token_acc), count(*) FROM events WHERE dataset = ? "
            "GROUP BY ALL ORDER BY base_idx, epoch", [target]).fetchall()
    except duckdb.Error as e:
        raise ReportError(f"{hsm_dir / 'events'}: cannot read the event log ({e})") from e
    dataset_loss: dict[str, dict[int, float]] = {}
    for dataset, e, loss in per_dataset:
        dataset_loss.setdefault(str(dataset), {})[int(e)] = float(loss)
    loss_by_epoch: dict[int, dict[int, float]] = {}
    acc_sum: dict[int, float] = {}
    drawn: dict[int, int] = {}
    draws: dict[int, dict[int, int]] = {}
    for idx, e, loss, acc, count in per_sample:
        loss_by_epoch.setdefault(idx, {})[int(e)] = float(loss)
        acc_sum[idx] = acc_sum.get(idx, 0.0) + float(acc)
        drawn[idx] = drawn.get(idx, 0) + int(count)
        draws.setdefault(int(e), {})[idx] = int(count)
    stats = SampleStats(loss_by_epoch, {i: acc_sum[i] / drawn[i] for i in drawn}, drawn)
    epochs = sorted(draws)
    dm = data_map(read_epoch_metrics(hsm_dir, epochs, target, metric, skip_corrupt=True))
    return RunData(run_dir=run_dir, config_text=config_text, config=config, target=target, metric=metric,
                   manifests=manifests, plans=plans, epoch=epoch, dataset_loss=dataset_loss, draws=draws,
                   stats=stats, data_map=dm, dataset_info=dataset_info,
                   predictions=read_predictions(run_dir, target))


def read_predictions(run_dir: Path, target: str) -> dict[str, dict[str, Any]]:
    """What ``hsm eval`` wrote for the target under the run, per record id, or ``{}``.

    Reads the newest ``RUN_DIR/**/eval/**/<target>/per_sample.parquet`` (``tp``, ``fp``,
    ``fn`` at IoU 0.5, from hsm.eval's matching) and, beside it, ``answers.jsonl``
    (``hsm eval run``: the raw answers, whose boxes the gallery draws).
    """
    found = [p for p in Path(run_dir).glob("**/eval/**/per_sample.parquet") if p.parent.name == target]
    if not found:
        return {}
    path = max(found, key=lambda p: p.stat().st_mtime)
    try:
        rows = pq.read_table(path, columns=["id", "tp", "fp", "fn"]).to_pylist()
    except (pa.ArrowException, OSError, KeyError) as e:
        raise ReportError(f"{path}: not a readable hsm eval per_sample table ({e})") from e
    out = {str(r["id"]): {"tp": r["tp"], "fp": r["fp"], "fn": r["fn"], "answer": None} for r in rows}
    answers = path.with_name("answers.jsonl")
    if answers.is_file():
        with answers.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if str(row["id"]) in out:
                        out[str(row["id"])]["answer"] = row["answer"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ReportError(f"{answers}:{number}: not an answer line ({e})") from e
    return out


def order_by_score(plan: pa.Table, *, hardest: bool) -> np.ndarray:
    """Row indices in the planner's rank order (:func:`hsm.mining.select.rank_order`): score desc,
    then sample_id asc, a NaN score last; for the easiest, score asc with NaN still last."""
    from hsm.mining.select import rank_order

    scores = plan.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    ids = plan.column("sample_id").combine_chunks()
    return rank_order(scores if hardest else -scores, ids, np.arange(len(scores)), seed=None)


class SampleRecords:
    """The target's records by ``base_idx``, built from ``hsm/samples.parquet`` (written by the TRL and ms-swift
    integrations: each ``base_idx``'s image path and answer as the trainer held them, after its own loading and
    shuffling) one at a time, when a card needs it.

    Boxes come from ms-swift's ``objects`` column (pixels) when the row has one, else from the answer text
    (:func:`hsm.data.answer.parse_answer`, in ``coord_format``); the image size is read from the file's header.
    """

    def __init__(self, table: pa.Table, coord_format: str, where: str):
        self.rows = table.sort_by([("base_idx", "ascending")]).to_pylist()
        self.coord_format = coord_format
        self.where = where

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, base_idx: int):
        from PIL import Image

        from hsm.data.answer import answer_boxes_to_pixels, parse_answer
        from hsm.data.records import DetectionObject, Record

        row = self.rows[base_idx]
        image = Path(row["image"] or "")
        width = height = 1
        if row["image"] and image.is_file():
            try:
                with Image.open(image) as img:  # the header only
                    width, height = img.size
            except (OSError, Image.DecompressionBombError):
                pass  # the card says the image cannot be decoded
        objects = json.loads(row["objects"]) if row["objects"] else None
        if objects and objects.get("bbox"):
            boxes, labels = [tuple(map(float, b)) for b in objects["bbox"]], list(objects.get("ref") or [])
        else:
            parsed = parse_answer(row["answer"] or "")
            boxes = [tuple(b) for b in answer_boxes_to_pixels(parsed.boxes, width, height, self.coord_format).tolist()]
            labels = list(parsed.labels)
        labels += [""] * (len(boxes) - len(labels))
        return Record(image=image, width=width, height=height, id=row["sample_id"],
                      objects=tuple(DetectionObject(label, box) for label, box in zip(labels, boxes)),
                      where=f"{self.where} base_idx {base_idx}")


def read_sample_records(hsm_dir: Path, coord_format: str = "rel1000", *, required: bool = False) -> SampleRecords | None:
    """:class:`SampleRecords` of ``hsm_dir/samples.parquet``, or None when the run has none (``hsm train`` runs
    name their target ``train_jsonl`` in the config instead).

    A missing table is an error when its sha256 record is still there (deleted after it was written), or when
    ``required`` (the config names no target ``train_jsonl``) and hsm wrote the run (its ``config.yaml`` has a
    record): the table is then the only record of what each ``base_idx`` names, and a report would otherwise
    show every card as "no record". A log written by another tool, with a config by hand, reports without images.
    """
    from hsm.io import ChecksumMismatch, checksum_record_path, read_recorded_parquet

    paths = RunPaths.at(hsm_dir)
    path = paths.samples
    if not path.is_file():
        required = required and checksum_record_path(paths.config).is_file()
        if required or checksum_record_path(path).is_file():
            raise ReportError(
                f"{path}: not found; it records the image and answer of every target base_idx of a run made "
                f"by the TRL or ms-swift integration{' (its sha256 record is still there)' if not required else ''}. "
                "Restore it from a copy of the run; without it the report cannot show the samples")
        return None

    try:
        table = read_recorded_parquet(path, columns=["base_idx", "sample_id", "image", "answer", "objects"])
    except ChecksumMismatch as e:
        raise ReportError(str(e)) from e
    except (pa.ArrowException, OSError) as e:
        raise ReportError(f"{path}: not a readable hsm samples table ({e})") from e
    return SampleRecords(table, coord_format, str(path))
