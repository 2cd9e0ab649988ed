"""Between epochs: fold new events into the state, select the hard set, write the plan.

This is the one function both ``hsm plan`` and the training callback call:
:func:`plan_epoch`. The state update is incremental (:mod:`hsm.mining.update`): an
epoch is folded only if its state file is missing or its event files changed since
(their digest), and a fold reads just that epoch's events plus the previous state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hsm.config import MiningConfig, describe_selector, mining_config_hash
from hsm.io import write_json_atomic
from hsm.mining.events import list_event_files
from hsm.mining.plan import DatasetInfo, PlanError, plan_dir, publish_plan, read_manifest, read_plan_table, run_lock, stage_plan
from hsm.mining.plan_table import build_plan_table, hard_set
from hsm.mining.select import rank_order
from hsm.mining.suspects import data_map, read_epoch_metrics
from hsm.mining.trigger import should_apply
from hsm.mining.update import Folded, check_folded_history, fold_pending, id_lookup, writing
from hsm.layout import RunPaths

__all__ = ["PlanRequest", "PlanResult", "PlanConflict", "EmptyEpochs", "plan_epoch", "plan_differences", "empty_epochs", "epoch_ranges",
           "unobserved_target_note"]


def epoch_ranges(epochs) -> str:
    """Epoch numbers as ranges, for messages: ``[1, 2, 3, 5, 7, 8]`` -> ``"1-3, 5, 7-8"``.

    Naive equivalent: ``", ".join(map(str, sorted(epochs)))``, with every run of consecutive
    numbers written ``first-last`` (so a message about epochs 5..98 is one range, not 94 numbers).
    """
    numbers = sorted(set(int(e) for e in epochs))
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class PlanConflict(ValueError):
    """The plan asked for differs from the run's dataset or from the plan it would overwrite."""


class EmptyEpochs(ValueError):
    """Epochs to fold that have no events although earlier epochs do (a plan asked for too far ahead)."""


@contextlib.contextmanager
def _plain_pages():
    """Allocate without numpy's transparent-huge-page advice while planning.

    numpy advises the kernel to back every large array with huge pages; where the kernel
    compacts memory to find them on the fault (THP ``defrag`` set to ``madvise``, the
    default of many distributions and VMs) a fresh 80 MB array then costs ~170 ms
    instead of ~35 ms on the development VM. The planner allocates a few GB of
    short-lived arrays per 10M-event epoch and reads each a few times, so it gains
    nothing from huge pages. An explicit ``NUMPY_MADVISE_HUGEPAGE`` is left alone.
    """
    from numpy._core import multiarray

    advise = getattr(multiarray, "_set_madvise_hugepage", None)  # numpy's own switch (private, numpy >= 1.20)
    if advise is None or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        yield
        return
    previous = advise(False)
    try:
        yield
    finally:
        advise(previous)


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


def plan_differences(manifest: dict[str, Any], mining: MiningConfig, target: str) -> list[str]:
    """What differs between an existing plan's manifest and a plan for ``(mining, target)``.

    One line per differing setting (target, mode, metric, aggregate, selector), then,
    if those agree but the config hash does not, one line saying other mining settings
    differ. An empty list means the new plan is built the same way.
    """
    asked = {
        "target": target,
        "mode": mining.mode,
        "metric": mining.metric,
        "aggregate": mining.aggregate,
        "selector": mining.selector.model_dump(mode="json") if mining.mode == "reweight" else None,
    }
    stored = dict(manifest, target=(manifest.get("target") or {}).get("name"))
    # A selector compares and prints as its mode and the one setting that mode reads.
    asked["selector"] = describe_selector(asked["selector"])
    if "selector" in stored:
        stored["selector"] = describe_selector(stored["selector"])
    lines = [f"{key}: existing plan {stored.get(key)!r}, asked {value!r}" for key, value in asked.items()
             if key in stored and stored.get(key) != value]
    config_hash = mining_config_hash(mining, target)
    if not lines and manifest.get("config_hash") not in (None, config_hash):
        lines.append(f"other mining settings (config_hash {manifest['config_hash'][:12]} vs {config_hash[:12]})")
    return lines


def empty_epochs(hsm_dir: str | Path, up_to_epoch: int) -> list[int]:
    """Epochs ``<= up_to_epoch`` without any event part, after the first epoch that has one.

    Leading epochs without events are normal (mining switched on later) and not listed.
    """
    logged = [e for e in range(up_to_epoch + 1) if list_event_files(hsm_dir, e)]
    if not logged:
        return []
    return [e for e in range(logged[0], up_to_epoch + 1) if e not in logged]


def _stats(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None}
    mean = float(np.mean(values))  # before the partition below reorders values
    p50, p90 = np.quantile(values, [0.5, 0.9], overwrite_input=True)  # one partition for both, in place
    return {"mean": mean, "p50": float(p50), "p90": float(p90)}


@dataclass(frozen=True)
class PlanRequest:
    """What :func:`plan_epoch` plans, and how.

    Attributes:
        hsm_dir: the run's ``hsm`` directory.
        epoch: the epoch the plan is for (built from epochs ``0..epoch-1``).
        mining: the mining config.
        target: the fusion target's dataset name; only its samples are eligible.
        engine: ``polars``, ``numpy`` or ``duckdb`` (default: ``mining.engine``).
        num_train_epochs: planned epochs, for ``activate_after_pct``.
        dataset: the target's size and fingerprint, recorded in the manifest.
        skip_corrupt: skip unreadable event parts with a warning instead of failing.
        write: False computes and returns the plan without writing anything.
        dump_dir: where ``hard_samples_epoch_{n}.json`` goes when ``mining.dump``.
        force: False refuses (:class:`PlanConflict`) a target other than ``dataset``'s, and
            overwriting an existing plan for ``epoch`` built with other settings.
        allow_empty: True folds epochs without events with a warning naming them; False
            refuses them (:class:`EmptyEpochs`).
        memory_limit: fold budget in bytes (default :data:`DEFAULT_MEMORY_LIMIT`); a larger
            epoch is folded out of core, spilling to ``temp_directory`` (default: the system's).
        temp_directory: where an out-of-core fold spills.
        refold: ignore the stored states and fold every epoch from the event log.
        lock_timeout: seconds to wait for another writer of the run (``write`` only).
    """

    hsm_dir: Path
    epoch: int
    mining: MiningConfig
    target: str
    engine: str | None = None
    num_train_epochs: float | None = None
    dataset: DatasetInfo | None = None
    skip_corrupt: bool = False
    write: bool = True
    dump_dir: Path | None = None
    force: bool = True
    allow_empty: bool = True
    memory_limit: int | None = None
    temp_directory: Path | None = None
    refold: bool = False
    lock_timeout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "hsm_dir", Path(self.hsm_dir))
        for name in ("dump_dir", "temp_directory"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


def plan_epoch(request: PlanRequest) -> PlanResult:
    """Fold the events of epochs ``< request.epoch`` not yet folded and write the plan for that epoch.

    Writing holds the run's lock (:func:`hsm.mining.plan.run_lock`) throughout; the plan
    and its manifest are published together, last, after the state and dump were written.

    Raises:
        PlanConflict, EmptyEpochs, OutputError, RunLocked, ChecksumMismatch: see ``force``,
            ``allow_empty``; a file that cannot be written; another writer; a stored state
            whose bytes changed.
    """
    if request.epoch < 1:
        raise ValueError(f"a plan for epoch {request.epoch} needs events of earlier epochs; plan epoch 1 or later")
    lock = run_lock(request.hsm_dir, timeout=request.lock_timeout) if request.write else contextlib.nullcontext()
    with lock:
        return _plan_epoch(request)


def _plan_epoch(r: PlanRequest) -> PlanResult:
    hsm_dir, epoch, mining, target = r.hsm_dir, r.epoch, r.mining, r.target
    if not r.force:
        problems = []
        if r.dataset is not None and r.dataset.name != target:
            problems.append(f"target: the run's hsm/dataset.json names '{r.dataset.name}', the config names '{target}'")
        try:
            existing = read_manifest(hsm_dir, epoch)
        except PlanError:
            existing = None  # a plan without its manifest: nothing to compare, it is replaced whole
        if existing is not None and r.write:
            problems += plan_differences(existing, mining, target)
        if problems:
            where = plan_dir(hsm_dir, epoch) if existing is not None else RunPaths.at(hsm_dir).dataset_info
            raise PlanConflict(
                f"{where}: refusing to plan epoch {epoch} with a different config:\n  - " + "\n  - ".join(problems)
                + "\nuse the run's own config, or pass --force to overwrite"
            )
    if not r.refold:
        check_folded_history(hsm_dir, epoch - 1)  # before the advice below: --allow-empty cannot replace history
    missing = empty_epochs(hsm_dir, epoch - 1)
    if missing:
        message = (f"{RunPaths.at(hsm_dir).events_root}: no events in epochs {epoch_ranges(missing)} "
                   f"(planning epoch {epoch} folds epochs 0..{epoch - 1})")
        if not r.allow_empty:
            raise EmptyEpochs(f"{message}; plan an epoch right after the last logged one, or pass --allow-empty")
        warnings.warn(f"hsm: {message}; folding them as empty", stacklevel=2)
    engine = r.engine or mining.engine
    with _plain_pages():
        folded = fold_pending(hsm_dir, epoch - 1, mining, engine=engine, skip_corrupt=r.skip_corrupt, write=r.write,
                              memory_limit=r.memory_limit, temp_directory=r.temp_directory, refold=r.refold)
        try:
            return _plan_from(r, folded, engine)
        finally:
            folded.wait()


def unobserved_target_note(epoch: int, manifest: dict[str, Any]) -> str | None:
    """What the ``fixed_set`` plan for ``epoch`` (its ``manifest``) does to the target samples no epoch before it
    drew, or None when it leaves none out (another mode, not applied, no signal, or every sample observed).

    Only observed samples are eligible (SPEC section 8), and a fixed_set plan gives every sample it does not
    choose weight 0: so a sample never drawn before the plan is never drawn while fixed_set plans apply. With
    ``target_epoch_size`` T below the target's N, the epochs before the first plan draw T samples each, cycling
    through the target, so they cover it only from ``ceil(N / T)`` epochs on.
    """
    n_unobserved = manifest["counts"].get("unobserved")
    if manifest["mode"] != "fixed_set" or not manifest["triggered"] or not n_unobserved or manifest.get("no_signal"):
        return None
    n_target, target_epoch_size = manifest["target"]["size"], manifest["target_epoch_size"]
    fix = ""
    if target_epoch_size is not None and 0 < target_epoch_size < n_target:
        fix = (f"; with target_epoch_size={target_epoch_size} the epochs before the first plan cover the target only "
               f"from start_epoch >= {-(-n_target // target_epoch_size)} on")
    return (f"fixed_set plan for epoch {epoch}: {n_unobserved} of the {n_target} target samples were never drawn "
            f"before it, so they can be neither hard nor regular and get weight 0: they are not trained on while "
            f"fixed_set plans apply{fix}")


def _plan_from(r: PlanRequest, folded: Folded, engine: str) -> PlanResult:
    hsm_dir, epoch, mining, target = r.hsm_dir, r.epoch, r.mining, r.target
    num_train_epochs, dataset, write, dump_dir = r.num_train_epochs, r.dataset, r.write, r.dump_dir
    state, info = folded.state, folded.info
    if state is None:
        raise ValueError(f"{hsm_dir / 'events'}: no events for epochs < {epoch}; nothing to plan from")
    sample_ids = id_lookup(hsm_dir, folded, target)
    suspects = dm = None
    if mining.exclude_suspects:
        dm = data_map(read_epoch_metrics(hsm_dir, range(epoch), target, mining.metric))
        suspects = dm.base_idx[dm.is_suspect]
    table, selection = build_plan_table(state, info.datasets, target, mining, epoch, sample_ids, suspects)
    epoch_losses = {e: s["mean_loss"] for e, s in info.epoch_stats.items()}
    triggered, reason = should_apply(epoch, mining, epoch_losses, num_train_epochs)
    scores = table.column("score").to_numpy()
    hard_scores = scores[selection.is_hard]
    regular_scores = scores[~selection.is_hard]
    weights = selection.weight
    target_info = (dataset.to_dict() if dataset is not None and dataset.name == target
                   else {"name": target, "size": None, "fingerprint": None})
    # Target samples no event has drawn yet: in no plan row, so at the default weight (0 under fixed_set).
    unobserved = None if target_info["size"] is None else target_info["size"] - table.num_rows
    manifest = {
        "mode": mining.mode,
        "metric": mining.metric,
        "aggregate": mining.aggregate,
        "selector": mining.selector.model_dump(mode="json") if mining.mode == "reweight" else None,
        "config_hash": mining_config_hash(mining, target),
        "target": target_info,
        "triggered": triggered,
        "trigger_reason": reason,
        "no_signal": selection.no_signal,
        "default_weight": selection.default_weight,
        "target_epoch_size": selection.target_epoch_size,
        "hard_weight": mining.hard_weight if mining.mode == "reweight" else None,
        "hard_pool_frac": mining.hard_pool_frac if mining.mode == "dynamic" else None,
        "seed": mining.seed,
        "counts": {
            "eligible": table.num_rows,
            "hard": int(selection.is_hard.sum()),
            "regular_drawn": selection.n_regular,
            "unobserved": unobserved,
            "weight_sum": float(weights.sum()),
            # Events of epoch N-1 whose metric value was NaN or infinite: not observations.
            "nonfinite": int(info.epoch_stats.get(epoch - 1, {}).get("n_nonfinite", 0)),
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
    note = unobserved_target_note(epoch, manifest)
    if note:
        warnings.warn(f"hsm: {note}", stacklevel=2)
    churn = None
    if read_manifest(hsm_dir, epoch - 1) is not None:
        previous_plan = read_plan_table(hsm_dir, epoch - 1, columns=["base_idx", "is_hard"])[1]
        before, after = hard_set(previous_plan), hard_set(table)
        union = before | after
        churn = {
            "previous_hard": len(before), "kept": len(before & after), "added": len(after - before),
            "removed": len(before - after), "jaccard": (len(before & after) / len(union)) if union else 1.0,
        }
    if write:
        dump = None
        if mining.dump and dump_dir is not None:
            dump = functools.partial(_dump_hard, Path(dump_dir), epoch, table, selection.is_hard, mining, sample_ids)
        manifest = _publish(hsm_dir, epoch, table, manifest, folded, dump, Path(dump_dir or ".") / f"hard_samples_epoch_{epoch}.json")
    return PlanResult(epoch=epoch, manifest=manifest, plan=table, folded_epochs=folded.folded_epochs,
                      skipped_files=folded.skipped_files, churn=churn, written=write, last_events=folded.last_events)


def _publish(hsm_dir: Path, epoch: int, table: pa.Table, manifest: dict[str, Any], folded: Folded, dump,
             dump_path: Path) -> dict[str, Any]:
    """Stage the plan, write the dump, wait for the state, then publish the plan: the last step.

    Any failure before the publish (disk full in the dump or the state) leaves the
    previous plan in place and the staged one removed.
    """
    where = RunPaths.at(hsm_dir).plan(epoch)
    staging, manifest = writing(where, stage_plan, hsm_dir, epoch, table, manifest)
    try:
        if dump is not None:
            writing(dump_path, dump)
        folded.wait()  # the state's background write; its OutputError stops the publish
        writing(where, publish_plan, staging, hsm_dir, epoch)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _dump_hard(output_dir: Path, epoch: int, table: pa.Table, is_hard: np.ndarray, mining: MiningConfig,
               sample_ids) -> None:
    scores = table.column("score").to_numpy()
    hard = np.flatnonzero(is_hard)
    base_idx = table.column("base_idx").to_numpy()
    order = rank_order(scores, lambda subset: sample_ids(base_idx[subset]), hard, seed=mining.seed)
    rows = table.take(pa.array(order)).select(["dataset", "base_idx", "score"])
    rows = rows.append_column("sample_id", sample_ids(base_idx[order])).select(["sample_id", "dataset", "base_idx", "score"])
    write_json_atomic({"epoch": epoch, "metric": mining.metric, "samples": rows.to_pylist()}, output_dir / f"hard_samples_epoch_{epoch}.json")
