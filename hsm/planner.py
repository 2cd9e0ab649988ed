"""Between epochs: fold new events into the state, select the hard set, write the plan.

This is the one function both ``hsm plan`` and the training callback call:
:func:`plan_epoch`. The state update is incremental: an epoch is folded only if
its state file is missing or its event files changed since (their digest), and
a fold reads just that epoch's events plus the previous state.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hsm.config import MiningConfig, mining_config_hash
from hsm.engines import ENGINES
from hsm.events import PLANNER_COLUMNS, events_digest, list_event_files, read_epoch_events
from hsm.plan import DatasetInfo, plan_dir, read_manifest, write_json_atomic, write_plan
from hsm.schemas import PLAN_SCHEMA
from hsm.select import rank_order, select_plan
from hsm.suspects import data_map, exclude_suspects, read_epoch_metrics
from hsm.state import StateInfo, find_states, read_state, read_state_info, state_path, write_state
from hsm.trigger import should_apply

__all__ = ["PlanResult", "plan_epoch", "fold_pending", "build_plan_table", "hard_set"]


@dataclass
class PlanResult:
    """What :func:`plan_epoch` did, for the CLI summary and the training logs."""

    epoch: int
    manifest: dict[str, Any]
    plan: pa.Table
    folded_epochs: list[int] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    churn: dict[str, Any] | None = None
    written: bool = True
    last_events: pa.Table | None = None  # events of the last epoch folded by this call, if any


def _events_root(hsm_dir: Path) -> Path:
    return hsm_dir / "events"


def fold_pending(
    hsm_dir: str | Path,
    up_to_epoch: int,
    mining: MiningConfig,
    *,
    engine: str | None = None,
    skip_corrupt: bool = False,
    write: bool = True,
) -> tuple[pa.Table | None, StateInfo | None, list[int], list[str], pa.Table | None]:
    """Bring the state up to date with every epoch ``<= up_to_epoch``.

    Returns ``(state, info, folded_epochs, skipped_files, last_events)``; ``state``
    is None when there is nothing to fold yet; ``last_events`` are the events of
    ``up_to_epoch`` when this call folded it.
    """
    hsm_dir = Path(hsm_dir)
    fold = ENGINES[engine or mining.engine]
    params = (mining.metric, mining.ema_decay, mining.aggregate)
    # The longest prefix of epochs whose state is stored and whose events are unchanged.
    valid = -1
    stored = set(find_states(hsm_dir))
    for epoch in range(0, up_to_epoch + 1):
        if epoch not in stored:
            break
        info = read_state_info(hsm_dir, epoch)
        info.check_params(*params, where=str(state_path(hsm_dir, epoch)))
        digest = events_digest(list_event_files(hsm_dir, epoch), _events_root(hsm_dir))
        if info.events_digest != digest:
            break
        valid = epoch
    state, info = read_state(hsm_dir, valid) if valid >= 0 else (None, None)
    folded, skipped, last_events = [], [], None
    for epoch in range(valid + 1, up_to_epoch + 1):
        read = read_epoch_events(hsm_dir, epoch, skip_corrupt=skip_corrupt, columns=PLANNER_COLUMNS)
        last_events = read.table if epoch == up_to_epoch else None
        skipped += [str(path) for path, _ in read.skipped]
        if state is None and read.table.num_rows == 0:
            continue  # nothing logged yet (mining switched on later): no state to carry
        state = fold(state, read.table, epoch=epoch, metric=mining.metric, ema_decay=mining.ema_decay,
                     aggregate=mining.aggregate)
        stats = dict(info.epoch_stats) if info is not None else {}
        if read.table.num_rows:
            stats[epoch] = {
                "mean_loss": float(pc.mean(read.table.column("loss").cast(pa.float64())).as_py()),
                "n_events": read.table.num_rows,
            }
        info = StateInfo(
            epoch=epoch, metric=mining.metric, ema_decay=mining.ema_decay, aggregate=mining.aggregate,
            events_digest=events_digest(read.files, _events_root(hsm_dir)), epoch_stats=stats,
        )
        if write:
            write_state(hsm_dir, state, info)
        folded.append(epoch)
    return state, info, folded, skipped, last_events


def build_plan_table(state: pa.Table, target: str, mining: MiningConfig, epoch: int,
                     suspects: np.ndarray | None = None):
    """Plan rows (every observed target sample, by ``base_idx``) and the selection behind them.

    ``suspects``: ``base_idx`` of label-noise suspects kept out of the hard set (weight 1).
    """
    # The state is sorted by (dataset, base_idx): the target is one contiguous, sorted slice.
    where = np.flatnonzero(pc.equal(state.column("dataset"), target).to_numpy(zero_copy_only=False))
    rows = state.slice(int(where[0]), len(where)) if len(where) else state.slice(0, 0)
    if len(where) and (where[-1] - where[0] + 1 != len(where) or np.any(np.diff(rows.column("base_idx").to_numpy()) <= 0)):
        raise ValueError("state is not sorted by (dataset, base_idx); it was not written by hsm")
    scores = rows.column("score").to_numpy()
    is_suspect = np.isin(rows.column("base_idx").to_numpy(), suspects) if suspects is not None else None
    selection = select_plan(scores if is_suspect is None else exclude_suspects(scores, is_suspect),
                            rows.column("sample_id").combine_chunks(), mining=mining, epoch=epoch)
    if is_suspect is not None:
        selection.is_hard[is_suspect] = False
        selection.weight[is_suspect] = 1.0
    table = pa.Table.from_arrays(
        [
            rows.column("sample_id"),
            rows.column("dataset"),
            rows.column("base_idx"),
            rows.column("score"),
            rows.column("n_obs"),
            pa.array(selection.is_hard),
            pa.array(selection.weight),
        ],
        schema=PLAN_SCHEMA,
    )
    return table, selection


def hard_set(plan: pa.Table) -> set[int]:
    """``base_idx`` of the hard rows of a plan table."""
    return set(plan.filter(plan.column("is_hard")).column("base_idx").to_pylist())


def _stats(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None}
    return {"mean": float(np.mean(values)), "p50": float(np.quantile(values, 0.5)), "p90": float(np.quantile(values, 0.9))}


def plan_epoch(
    hsm_dir: str | Path,
    epoch: int,
    mining: MiningConfig,
    target: str,
    *,
    engine: str | None = None,
    num_train_epochs: float | None = None,
    dataset: DatasetInfo | None = None,
    skip_corrupt: bool = False,
    write: bool = True,
    dump_dir: str | Path | None = None,
) -> PlanResult:
    """Fold the events of epochs ``< epoch`` not yet folded and write the plan for ``epoch``.

    Args:
        hsm_dir: the run's ``hsm`` directory.
        epoch: the epoch the plan is for (built from epochs ``0..epoch-1``).
        mining: the mining config.
        target: the fusion target's dataset name; only its samples are eligible.
        engine: ``polars`` or ``duckdb`` (default: ``mining.engine``).
        num_train_epochs: planned epochs, for ``activate_after_pct``.
        dataset: the target's size and fingerprint, recorded in the manifest.
        skip_corrupt: skip unreadable event parts with a warning instead of failing.
        write: False computes and returns the plan without writing anything.
        dump_dir: where ``hard_samples_epoch_{n}.json`` goes when ``mining.dump``.
    """
    if epoch < 1:
        raise ValueError(f"a plan for epoch {epoch} needs events of earlier epochs; plan epoch 1 or later")
    hsm_dir = Path(hsm_dir)
    engine = engine or mining.engine
    state, info, folded, skipped, last_events = fold_pending(
        hsm_dir, epoch - 1, mining, engine=engine, skip_corrupt=skip_corrupt, write=write
    )
    if state is None:
        raise ValueError(f"{hsm_dir / 'events'}: no events for epochs < {epoch}; nothing to plan from")
    suspects = None
    if mining.exclude_suspects:
        dm = data_map(read_epoch_metrics(hsm_dir, range(epoch), target, mining.metric, skip_corrupt=skip_corrupt))
        suspects = dm.base_idx[dm.is_suspect]
    table, selection = build_plan_table(state, target, mining, epoch, suspects)
    epoch_losses = {e: s["mean_loss"] for e, s in info.epoch_stats.items()}
    triggered, reason = should_apply(epoch, mining, epoch_losses, num_train_epochs)
    scores = table.column("score").to_numpy()
    hard_scores = scores[selection.is_hard]
    regular_scores = scores[~selection.is_hard]
    weights = selection.weight
    manifest = {
        "mode": mining.mode,
        "metric": mining.metric,
        "aggregate": mining.aggregate,
        "selector": mining.selector.model_dump(mode="json") if mining.mode == "reweight" else None,
        "config_hash": mining_config_hash(mining, target),
        "target": (dataset.to_dict() if dataset is not None else {"name": target, "size": None, "fingerprint": None}),
        "triggered": triggered,
        "trigger_reason": reason,
        "default_weight": selection.default_weight,
        "target_epoch_size": selection.target_epoch_size,
        "hard_weight": mining.hard_weight if mining.mode == "reweight" else None,
        "hard_pool_frac": mining.hard_pool_frac if mining.mode == "dynamic" else None,
        "seed": mining.seed,
        "counts": {
            "eligible": table.num_rows,
            "hard": int(selection.is_hard.sum()),
            "regular_drawn": selection.n_regular,
            "weight_sum": float(weights.sum()),
        },
        "weights": {"min": float(weights.min()) if len(weights) else None, "max": float(weights.max()) if len(weights) else None},
        "scores": {"hard": _stats(hard_scores), "regular": _stats(regular_scores)},
        "suspects": None if suspects is None else {
            "count": len(suspects), "base_idx": suspects.tolist(),
            "sample_ids": [dm.sample_id[k] for k in np.flatnonzero(dm.is_suspect)],
        },
        "state_epoch": info.epoch,
        "engine": engine,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    previous = read_manifest(hsm_dir, epoch - 1)
    churn = None
    if previous is not None:
        previous_plan = pq.read_table(plan_dir(hsm_dir, epoch - 1) / "plan.parquet", columns=["base_idx", "is_hard"])
        before, after = hard_set(previous_plan), hard_set(table)
        union = before | after
        churn = {
            "previous_hard": len(before), "kept": len(before & after), "added": len(after - before),
            "removed": len(before - after), "jaccard": (len(before & after) / len(union)) if union else 1.0,
        }
    if write:
        manifest = write_plan(hsm_dir, epoch, table, manifest)
        if mining.dump and dump_dir is not None:
            _dump_hard(Path(dump_dir), epoch, table, selection.is_hard, mining.metric)
    return PlanResult(epoch=epoch, manifest=manifest, plan=table, folded_epochs=folded,
                      skipped_files=skipped, churn=churn, written=write, last_events=last_events)


def _dump_hard(output_dir: Path, epoch: int, table: pa.Table, is_hard: np.ndarray, metric: str) -> None:
    scores = table.column("score").to_numpy()
    order = rank_order(scores, table.column("sample_id").combine_chunks(), np.flatnonzero(is_hard))
    rows = table.take(pa.array(order)).select(["sample_id", "dataset", "base_idx", "score"]).to_pylist()
    write_json_atomic({"epoch": epoch, "metric": metric, "samples": rows}, output_dir / f"hard_samples_epoch_{epoch}.json")
