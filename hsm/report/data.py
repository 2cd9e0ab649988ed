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

from hsm.suspects import DataMap, data_map, read_epoch_metrics

__all__ = ["ReportError", "SampleStats", "RunData", "load_run", "read_predictions", "order_by_score"]


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

    path = hsm_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(f"{path}: not found; is {hsm_dir.parent} the output_dir of an hsm train run?")
    text = path.read_text(encoding="utf-8")
    try:
        return text, yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML ({e})") from e


def _manifests(hsm_dir: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for path in sorted((hsm_dir / "plans").glob("epoch=*/manifest.json")):
        epoch = path.parent.name.partition("=")[2]
        if not epoch.isdigit():
            continue
        try:
            out[int(epoch)] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not valid JSON ({e}); re-run hsm plan --epoch {epoch}") from e
    return out


def load_run(run_dir: str | Path, *, epoch: int | None = None) -> RunData:
    """Read a run for the report; ``epoch`` picks the plan shown (default: the latest)."""
    import duckdb

    from hsm.queries import connect

    run_dir = Path(run_dir)
    hsm_dir = run_dir / "hsm"
    if not hsm_dir.is_dir():
        raise ReportError(f"{run_dir}: no hsm/ directory; is this a run's output_dir?")
    config_text, config = _config(hsm_dir)
    manifests = _manifests(hsm_dir)
    if not manifests:
        raise ReportError(f"{hsm_dir / 'plans'}: no plans yet; train for 2+ epochs or run hsm plan --epoch 1")
    if epoch is None:
        epoch = max(manifests)
    elif epoch not in manifests:
        raise ReportError(f"--epoch {epoch}: no plan for it; plans exist for epochs {sorted(manifests)}")
    plans = {e: pq.read_table(hsm_dir / "plans" / f"epoch={e}" / "plan.parquet") for e in manifests}
    latest = manifests[max(manifests)]
    target = latest["target"]["name"]
    metric = latest.get("metric") or "loss"
    con = connect(run_dir)
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
    info_path = hsm_dir / "dataset.json"
    dataset_info = json.loads(info_path.read_text()) if info_path.is_file() else None
    return RunData(run_dir=run_dir, config_text=config_text, config=config, target=target, metric=metric,
                   manifests=manifests, plans=plans, epoch=epoch, dataset_loss=dataset_loss, draws=draws,
                   stats=stats, data_map=dm, dataset_info=dataset_info, predictions=read_predictions(run_dir))


def read_predictions(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Predicted boxes per ``sample_id`` from ``RUN_DIR/eval/**/predictions.jsonl``, if ``hsm eval`` wrote any.

    Each line: ``{"sample_id": str, "objects": [{"label": str, "bbox": [x1, y1, x2, y2]}, ...]}``
    (the hsm record format), optionally with ``tp``, ``fp``, ``fn``. The newest file wins.
    """
    files = sorted(Path(run_dir).glob("eval/**/predictions.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    out = {}
    with files[-1].open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["sample_id"])] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ReportError(f"{files[-1]}:{number}: not a prediction line ({e})") from e
    return out


def order_by_score(plan: pa.Table, *, hardest: bool) -> np.ndarray:
    """Row indices in rank order: score desc (or asc for the easiest), then sample_id asc."""
    import pyarrow.compute as pc

    direction = "descending" if hardest else "ascending"
    return pc.sort_indices(plan, sort_keys=[("score", direction), ("sample_id", "ascending")]).to_numpy()
