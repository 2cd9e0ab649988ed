"""``build_report``: a run directory in, one self-contained HTML page (and suspects.csv) out."""

from __future__ import annotations

import base64
import csv
import io
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hsm.config import describe_selector
from hsm.mining.suspects import metric_label
from hsm.report.data import RunData, load_run, order_by_score, read_sample_records
from hsm.report.gallery import Card, predicted_labels, record_thumbnails
from hsm.report.plots import REGION_COLORS, data_map_figure, difficulty_figure, weights_figure
from hsm.layout import RunPaths

__all__ = ["ReportResult", "build_report", "render_html", "write_suspects_csv", "MAX_SUSPECT_THUMBS"]

MAX_SUSPECT_THUMBS = 48


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    html: Path
    suspects_csv: Path
    n_cards: int
    n_suspects: int


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _records(run: RunData):
    """Target records by base_idx (no image is opened), or None with the reason."""
    from hsm.data.records import RecordError, read_jsonl

    coord_format = (run.config.get("model") or {}).get("coord_format", "rel1000")
    target = ((run.config.get("custom") or {}).get("fusion_config") or {}).get("target") or {}
    path = target.get("train_jsonl")
    # a TRL or ms-swift run names no train_jsonl: its samples table is then the only record of the images
    by_base_idx = read_sample_records(RunPaths.of(run.run_dir).root, coord_format, required=not path)
    if by_base_idx is not None:
        return by_base_idx, None
    if not path:
        return None, "the run's config names no target train_jsonl"
    try:
        return read_jsonl(path, check_images=False), None
    except RecordError as e:
        return None, str(e)


def _cards(run: RunData, records, order: np.ndarray, k: int) -> list[Card]:
    plan = run.plans[run.epoch]
    columns = plan.select(["sample_id", "dataset", "base_idx", "score"]).to_pydict()
    cards = []
    for row in order[:k]:
        idx = int(columns["base_idx"][row])
        sample_id = columns["sample_id"][row]
        record = records[idx] if records is not None and idx < len(records) else None
        prediction = run.predictions.get(sample_id)
        image = predicted = counts = None
        note = ""
        if record is None:
            note = "no record for this sample"
        elif not record.image.is_file():
            note = f"image not found: {record.image}"
        else:
            coord_format = (run.config.get("model") or {}).get("coord_format", "rel1000")
            try:
                image, predicted = record_thumbnails(record, prediction, coord_format)
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, not an image, a bomb
                note = f"image cannot be decoded: {record.image} ({type(e).__name__}: {e})"
        if prediction is not None:
            counts = {k: int(prediction[k]) for k in ("tp", "fp", "fn")}
        cards.append(Card(
            sample_id=sample_id, dataset=columns["dataset"][row], base_idx=idx, score=float(columns["score"][row]),
            loss_by_epoch=run.stats.loss_by_epoch.get(idx, {}), token_acc=run.stats.token_acc.get(idx),
            times_drawn=run.stats.times_drawn.get(idx, 0), image=image, predicted=predicted, counts=counts,
            note=note, labels=[o.label for o in record.objects] if record is not None else [],
            predicted_labels=predicted_labels(prediction),
            n_objects=len(record.objects) if record is not None else None,
        ))
    return cards


def _suspect_rows(run: RunData) -> list[dict[str, Any]]:
    dm = run.data_map
    rows = []
    for k in np.flatnonzero(dm.is_suspect):
        idx = int(dm.base_idx[k])
        rows.append({"dataset": run.target, "base_idx": idx, "sample_id": dm.sample_id[k],
                     "n_epochs": int(dm.n_epochs[k]), "mean": float(dm.mean[k]),
                     "variability": float(dm.variability[k]), "metric": run.metric})
    rows.sort(key=lambda r: (-r["mean"], r["sample_id"]))
    return rows


def write_suspects_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The suspects as CSV with ``\\n`` line endings (the columns of ``hsm sql suspects``)."""
    columns = ["dataset", "base_idx", "sample_id", "n_epochs", "mean", "variability", "metric"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    from hsm.io import write_bytes_atomic

    write_bytes_atomic(buffer.getvalue().encode("utf-8"), path)


def _facts(run: RunData) -> dict[str, Any]:
    latest = run.manifests[max(run.manifests)]
    plans = []
    for e in sorted(run.manifests):
        m = run.manifests[e]
        plans.append({
            "epoch": e, "triggered": m.get("triggered"), "reason": m.get("trigger_reason"),
            "no_signal": bool(m.get("no_signal")),
            "eligible": m["counts"]["eligible"], "hard": m["counts"]["hard"],
            "regular_drawn": m["counts"].get("regular_drawn"),
            "weight_min": m["weights"]["min"], "weight_max": m["weights"]["max"],
            "suspects": (m.get("suspects") or {}).get("count"), "checksum": m.get("checksum", ""),
            "engine": m.get("engine"), "rows": m.get("rows"),
        })
    return {"mode": latest["mode"], "metric": latest.get("metric"), "aggregate": latest.get("aggregate"),
            "selector": describe_selector(latest.get("selector")), "target": latest.get("target"), "plans": plans,
            "dataset_info": run.dataset_info}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def render_html(context: dict[str, Any]) -> str:
    """The page from ``templates/report.html.j2`` (jinja2, autoescaped)."""
    import jinja2

    text = resources.files("hsm.report").joinpath("templates/report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env.from_string(text).render(**context)


def build_report(run_dir: str | Path, out: str | Path | None = None, *, epoch: int | None = None,
                 top_k: int = 12, skip_corrupt: bool = False) -> ReportResult:
    """Write ``out`` (default ``RUN_DIR/report.html``) and ``suspects.csv`` beside it.

    Args:
        run_dir: a run's output directory (holds ``hsm/``).
        out: the HTML file to write.
        epoch: the plan epoch the galleries and weight histogram show (default: the latest).
        top_k: cards in each gallery (hardest and easiest).
        skip_corrupt: leave damaged event parts out (warned) instead of refusing the run.
    """
    from hsm.io import write_bytes_atomic

    run = load_run(run_dir, epoch=epoch, skip_corrupt=skip_corrupt)
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    records, records_problem = _records(run)
    plan = run.plans[run.epoch]
    hardest = _cards(run, records, order_by_score(plan, hardest=True), top_k)
    easiest = _cards(run, records, order_by_score(plan, hardest=False), top_k)
    suspects = _suspect_rows(run)
    suspect_cards = []
    if suspects:
        position = {int(i): k for k, i in enumerate(plan.column("base_idx").to_numpy())}
        rows = np.array([position[r["base_idx"]] for r in suspects[:MAX_SUSPECT_THUMBS] if r["base_idx"] in position],
                        dtype=np.int64)
        suspect_cards = _cards(run, records, rows, MAX_SUSPECT_THUMBS)
    dm = run.data_map
    regions = {name: sum(1 for r in dm.region if r == name) for name in REGION_COLORS}
    context = {
        "run_dir": str(Path(run_dir).resolve()),
        "epoch": run.epoch,
        "target": run.target,
        "metric": run.metric,
        "metric_label": metric_label(run.metric),
        "top_k": top_k,
        "facts": _facts(run),
        "config_text": run.config_text,
        "difficulty_png": _png_uri(difficulty_figure(run)),
        "weights_png": _png_uri(weights_figure(run)),
        "data_map_png": _png_uri(data_map_figure(run)),
        "hardest": hardest,
        "easiest": easiest,
        "suspects": suspects,
        "suspect_cards": suspect_cards,
        "max_suspect_thumbs": MAX_SUSPECT_THUMBS,
        "regions": regions,
        "region_colors": REGION_COLORS,
        "thresholds": dm.thresholds,
        "n_mapped": int(sum(1 for r in dm.region if r is not None)),
        "n_samples": len(dm.base_idx),
        # Said only when a card shown holds a predicted thumbnail (eval output may cover none of them).
        "has_predictions": any(c.predicted for c in hardest),
        "records_problem": records_problem,
    }
    html = render_html(context)
    write_bytes_atomic(html.encode("utf-8"), out)
    csv_path = out.with_name("suspects.csv")
    write_suspects_csv(suspects, csv_path)
    return ReportResult(html=out.resolve(), suspects_csv=csv_path.resolve(), n_cards=len(hardest),
                        n_suspects=len(suspects))
