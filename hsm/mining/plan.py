"""Plan files: ``plans/epoch=E/plan.parquet`` plus ``manifest.json``, written and verified.

The manifest is the commit point: it is written after the plan and holds the
plan's sha256. :func:`load_plan` refuses a plan whose checksum, target dataset,
size, fingerprint or indices do not match, with a message that says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hsm.io import (
    file_sha256,
    is_temp_name,
    open_parquet,
    publish_dir,
    restore_dirs,
    strict_json,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from hsm.mining.events import keyed_write_options
from hsm.schemas import PLAN_SCHEMA, SchemaError, check_schema, conform
from hsm.layout import RunPaths

__all__ = [
    "check_unlocked",
    "PLAN_VERSION",
    "PlanError",
    "DatasetInfo",
    "Plan",
    "plan_dir",
    "write_plan",
    "stage_plan",
    "stage_plan_bytes",
    "publish_plan",
    "run_lock",
    "RunLocked",
    "remove_stale_temps",
    "plan_epochs",
    "read_plan_table",
    "verify_plan",
    "manifest_digest",
    "read_manifest",
    "load_plan",
]

PLAN_VERSION = 1
# What the schedule needs; score and n_obs are for people and SQL.
_LOADED = ("dataset", "base_idx", "is_hard", "weight")


class PlanError(ValueError):
    """A plan that cannot be used: missing, corrupt, or not for this dataset."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a plan is checked against: the target dataset's name, size and fingerprint."""

    name: str
    size: int
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "fingerprint": self.fingerprint}


def plan_dir(hsm_dir: str | Path, epoch: int) -> Path:
    """``<hsm_dir>/plans/epoch=E``."""
    return RunPaths.at(hsm_dir).plan_dir(epoch)


class RunLocked(RuntimeError):
    """Another process is writing this run (``hsm plan`` or a training's planning)."""


def _locked(hsm_dir: Path) -> RunLocked:
    return RunLocked(f"{hsm_dir}: another hsm plan or training is writing this run (lock {RunPaths.at(hsm_dir).lock} is "
                     "held); wait for it to finish, then run the command again")


def check_unlocked(hsm_dir: str | Path) -> None:
    """Raise :class:`RunLocked` when another process holds the run's lock; creates nothing and keeps nothing (a
    probe before a start that takes the lock with :func:`run_lock` later).

    Raises:
        RunLocked: another process holds the lock.
    """
    from filelock import FileLock, Timeout

    path = RunPaths.at(hsm_dir).lock
    if not path.is_file():
        return
    lock = FileLock(path, is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _locked(Path(hsm_dir)) from None
    lock.release()


@contextlib.contextmanager
def run_lock(hsm_dir: str | Path, timeout: float = 0.0):
    """Hold the run's writer lock (``<hsm_dir>/.lock``) for the ``with`` block.

    Every writer of state, id tables and plans takes it, so two planners never
    interleave their files; ``hsm train`` holds it from start-up to the end of training
    (re-entrant within one process). On entry, the hidden temporary files and staging
    directories a killed writer left behind are removed (an interrupted
    :func:`hsm.io.publish_dir` is rolled back first).

    Args:
        hsm_dir: the run's ``hsm`` directory.
        timeout: seconds to wait for another writer; 0 fails at once.

    Raises:
        RunLocked: another process holds the lock after ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    hsm_dir = Path(hsm_dir)
    hsm_dir.mkdir(parents=True, exist_ok=True)
    # One lock object per path in this process: a training that holds the lock for the whole run
    # re-enters it when it plans at an epoch end (a second flock on the file would wait for itself).
    lock = FileLock(RunPaths.at(hsm_dir).lock, is_singleton=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout as e:
        raise _locked(hsm_dir) from e
    try:
        remove_stale_temps(hsm_dir)
        yield
    finally:
        lock.release()


def remove_stale_temps(hsm_dir: str | Path) -> list[Path]:
    """Remove what killed writers left under ``plans/``, ``state/`` and ``sample_ids/`` (hold the lock)."""
    removed = []
    for top in ("plans", "state", "sample_ids"):
        root = Path(hsm_dir) / top
        if not root.is_dir():
            continue
        removed += restore_dirs(root)
        for child in root.iterdir():
            if child.is_dir() and not is_temp_name(child.name):
                removed += restore_dirs(child)
    return removed


def _new_staging(final: Path) -> Path:
    """An empty hidden staging directory beside ``final`` (this process's own; a leftover is replaced)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def stage_plan(hsm_dir: str | Path, epoch: int, table: pa.Table, manifest: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Write plan and manifest into a hidden staging directory beside ``plans/epoch=E``.

    Returns ``(staging directory, manifest with checksum)``; :func:`publish_plan`
    makes it the plan. Nothing a reader looks at changes until then.
    """
    final = plan_dir(hsm_dir, epoch)
    staging = _new_staging(final)
    try:
        path = staging / "plan.parquet"
        table = conform(table, PLAN_SCHEMA, str(final / "plan.parquet"), keep_dictionary=True)
        write_parquet_atomic(table, path, **keyed_write_options(table.schema, sorted_column="base_idx",
                                                                 dictionary=("dataset", "weight"), small_ints=("n_obs",),
                                                                 statistics=("base_idx",)))
        # Strict JSON before the digest, so the digest covers what the file holds.
        manifest = strict_json(dict(manifest, plan_version=PLAN_VERSION, epoch=epoch, checksum=file_sha256(path),
                                    rows=table.num_rows))
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json_atomic(manifest, staging / "manifest.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` (a changed count is caught too)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def stage_plan_bytes(hsm_dir: str | Path, epoch: int, plan_bytes: bytes, manifest_bytes: bytes) -> Path:
    """A plan received as bytes (broadcast from rank 0) staged for :func:`publish_plan`."""
    staging = _new_staging(plan_dir(hsm_dir, epoch))
    try:
        write_bytes_atomic(plan_bytes, staging / "plan.parquet")
        write_bytes_atomic(manifest_bytes, staging / "manifest.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def publish_plan(staging: Path, hsm_dir: str | Path, epoch: int) -> None:
    """Make a staged plan and its manifest ``plans/epoch=E`` together, in one step."""
    publish_dir(staging, plan_dir(hsm_dir, epoch))


def write_plan(hsm_dir: str | Path, epoch: int, table: pa.Table, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write plan and manifest, published together; returns the manifest with ``checksum`` filled in."""
    staging, manifest = stage_plan(hsm_dir, epoch, table, manifest)
    publish_plan(staging, hsm_dir, epoch)
    return manifest


def read_manifest(hsm_dir: str | Path, epoch: int) -> dict[str, Any] | None:
    """The manifest of the plan for ``epoch``, or None if there is no plan.

    A plan file without its manifest is a :class:`PlanError` (plan and manifest are
    published together, so one alone means a file was removed), never "no plan".
    """
    path = RunPaths.at(hsm_dir).manifest(epoch)
    if not path.is_file():
        plan_file = path.with_name("plan.parquet")
        if plan_file.exists():
            raise PlanError(f"{plan_file}: plan without its manifest.json (removed?); re-run hsm plan --epoch {epoch} "
                            f"--force to rebuild both")
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: not valid JSON ({e}); re-run hsm plan --epoch {epoch}") from e
    for key in ("plan_version", "epoch", "checksum", "target", "mode", "triggered", "default_weight", "manifest_sha256"):
        if key not in manifest:
            raise PlanError(f"{path}: manifest has no '{key}'; re-run hsm plan --epoch {epoch}")
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise PlanError(f"{path}: content differs from its manifest_sha256 (the file changed on disk); "
                        f"re-run hsm plan --epoch {epoch} --force")
    if manifest["plan_version"] != PLAN_VERSION:
        raise PlanError(f"{path}: plan_version {manifest['plan_version']} is not {PLAN_VERSION}")
    return manifest


@dataclass(frozen=True)
class Plan:
    """A verified plan, as the schedule consumes it: dense over the target's indices.

    ``weight[i]`` is sample ``i``'s weight (the manifest's ``default_weight`` where the
    plan has no row) and ``is_hard[i]`` whether it is hard: 9 bytes per target sample,
    and no sparse copy of the plan's rows once it is loaded. A dynamic plan has no
    ``weight`` (None): its schedule mixes pools per batch and never reads weights.
    """

    manifest: dict[str, Any]
    weight: np.ndarray | None
    is_hard: np.ndarray

    @property
    def n_target(self) -> int:
        return len(self.is_hard)

    @property
    def hard_idx(self) -> np.ndarray:
        """Indices of the hard samples, ascending."""
        return np.flatnonzero(self.is_hard)

    @property
    def checksum(self) -> str:
        return self.manifest["checksum"]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def triggered(self) -> bool:
        """Whether the schedule follows this plan: its trigger fired and its metric carried a signal
        (a ``no_signal`` plan marks nothing hard, so the epoch is drawn as without a plan)."""
        return bool(self.manifest["triggered"]) and not self.manifest.get("no_signal", False)


# Rows per record batch read: the rows live one small batch at a time (a reader thread per column
# would keep its own arena for little gain on a read this size).
_BATCH_ROWS = 1 << 17


def load_plan(
    hsm_dir: str | Path,
    epoch: int,
    *,
    dataset: DatasetInfo | None = None,
    expected_checksum: str | None = None,
    batch_rows: int = _BATCH_ROWS,
) -> Plan | None:
    """Load and verify the plan for ``epoch``; None when there is none.

    Raises :class:`PlanError` when the file's sha256 differs from the manifest
    (or from ``expected_checksum``, the one rank 0 broadcast), or when the plan
    does not fit ``dataset``. The rows are read one record batch at a time and
    scattered into the dense :class:`Plan` (over ``dataset.size`` samples; without
    a dataset, the manifest's target size or the largest index + 1), ``batch_rows``
    rows at a time.
    """
    manifest = read_manifest(hsm_dir, epoch)
    if manifest is None:
        if expected_checksum is not None:
            raise PlanError(f"{plan_dir(hsm_dir, epoch)}: no plan, but rank 0 announced {expected_checksum[:12]}")
        return None
    path = RunPaths.at(hsm_dir).plan(epoch)
    fix = f"re-run hsm plan --epoch {epoch}"
    actual = _verified_checksum(path, manifest, fix)
    if expected_checksum is not None and actual != expected_checksum:
        raise PlanError(f"{path}: sha256 {actual[:12]} differs from rank 0's {expected_checksum[:12]}")
    if dataset is not None:
        _check_fits(path, manifest, dataset, fix)
    try:
        part = open_parquet(path, read_dictionary=["dataset"])
        check_schema(part.schema_arrow, PLAN_SCHEMA, str(path))  # the whole contract, from the footer
        n_target = dataset.size if dataset is not None else manifest["target"].get("size")
        if n_target is None:  # offline, size unknown: the rows say how far the target goes
            high = -1
            for batch in part.iter_batches(batch_size=batch_rows, columns=["base_idx"]):
                high = max(high, pc.max(batch.column(0)).as_py() if batch.num_rows else -1)
            n_target = high + 1
        names: dict[str, None] = {}
        columns = [c for c in _LOADED if c != "weight" or manifest["mode"] != "dynamic"]
        weight = None if manifest["mode"] == "dynamic" else np.full(n_target, float(manifest["default_weight"]))
        is_hard = np.zeros(n_target, dtype=bool)
        low = high = None
        n_rows = 0
        for batch in part.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            n_rows += batch.num_rows
            rows = conform(pa.Table.from_batches([batch]), pa.schema([PLAN_SCHEMA.field(c) for c in columns]), str(path),
                           keep_dictionary=True)
            names.update(dict.fromkeys(_dataset_names(rows.column("dataset"))))
            if not rows.num_rows:
                continue
            base_idx = _column_values(rows, "base_idx")
            batch_low, batch_high = int(base_idx.min()), int(base_idx.max())
            low = batch_low if low is None else min(low, batch_low)
            high = batch_high if high is None else max(high, batch_high)
            if low >= 0 and high < n_target:  # else keep reading for the message, scatter no more
                # A run of consecutive indices (a plan of every sample, sorted) is a slice, not a scatter.
                if batch_high - batch_low == len(base_idx) - 1 and bool((base_idx[1:] > base_idx[:-1]).all()):
                    base_idx = slice(batch_low, batch_high + 1)
                if weight is not None:
                    weight[base_idx] = _column_values(rows, "weight")
                is_hard[base_idx] = _column_values(rows, "is_hard")
    except (pa.ArrowException, OSError, SchemaError) as e:
        raise PlanError(f"{path}: unreadable plan ({e}); {fix}") from e
    name = dataset.name if dataset is not None else manifest["target"].get("name")
    if low is not None and low >= 0 and high < n_target:
        _check_counts(path, manifest, n_rows, int(is_hard.sum()), fix)
    if dataset is not None and any(n != dataset.name for n in names):
        raise PlanError(f"{path}: rows for datasets {list(names)}, only '{dataset.name}' may be planned")
    if low is not None and (low < 0 or high >= n_target):
        bad = high if high >= n_target else low
        raise PlanError(f"{path}: base_idx {bad} out of range for dataset '{name}' (n={n_target}); {fix}")
    return Plan(manifest=manifest, weight=weight, is_hard=is_hard)


def _verified_checksum(path: Path, manifest: dict[str, Any], fix: str) -> str:
    """The plan file's sha256, checked against its manifest's."""
    if not path.is_file():
        raise PlanError(f"{path}: missing although its manifest exists; {fix}")
    actual = file_sha256(path)
    if actual != manifest["checksum"]:
        raise PlanError(f"{path}: sha256 {actual[:12]} does not match the manifest's {manifest['checksum'][:12]}; {fix}")
    return actual


def plan_epochs(hsm_dir: str | Path) -> list[int]:
    """Epochs with a published plan directory ``plans/epoch=E``, ascending (staging directories are hidden)."""
    return sorted(RunPaths.at(hsm_dir).epochs("plans"))


def verify_plan(hsm_dir: str | Path, epoch: int) -> dict[str, Any] | None:
    """The manifest of ``epoch``'s plan after checking the plan file's sha256 against it and its
    row and hard counts against the plan's rows; None if no plan.

    Raises:
        PlanError: a plan or manifest alone, a checksum or count mismatch, an unreadable plan.
    """
    if read_manifest(hsm_dir, epoch) is None:
        return None
    return read_plan_table(hsm_dir, epoch, columns=["is_hard"])[0]


def read_plan_table(hsm_dir: str | Path, epoch: int, columns: list[str] | None = None) -> tuple[dict[str, Any], pa.Table]:
    """``(manifest, rows)`` of the plan for ``epoch``, verified: manifest present, sha256 equal, page checksums.

    For readers that want the rows themselves (the report, churn); training uses :func:`load_plan`.

    Raises:
        PlanError: no plan, a plan or manifest alone, a checksum mismatch, an unreadable file.
    """
    fix = f"re-run hsm plan --epoch {epoch}"
    manifest = read_manifest(hsm_dir, epoch)
    path = RunPaths.at(hsm_dir).plan(epoch)
    if manifest is None:
        raise PlanError(f"{path.parent}: no plan for epoch {epoch}")
    _verified_checksum(path, manifest, fix)
    try:
        file = open_parquet(path)
        table = file.read(columns=columns)
        hard = table.column("is_hard") if "is_hard" in table.column_names else file.read(columns=["is_hard"]).column(0)
    except (pa.ArrowException, OSError, KeyError) as e:
        raise PlanError(f"{path}: unreadable plan ({e}); {fix}") from e
    _check_counts(path, manifest, table.num_rows, int(pc.sum(hard).as_py() or 0), fix)
    return manifest, table


def _check_counts(path: Path, manifest: dict[str, Any], n_rows: int, n_hard: int, fix: str) -> None:
    """The manifest's row and hard counts against the plan's rows (the manifest is what summaries show)."""
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    stated = {"rows": manifest.get("rows"), "counts.eligible": counts.get("eligible"), "counts.hard": counts.get("hard")}
    actual = {"rows": n_rows, "counts.eligible": n_rows, "counts.hard": n_hard}
    wrong = [f"{key} {stated[key]} but the plan has {actual[key]}" for key in stated
             if stated[key] is not None and stated[key] != actual[key]]
    if wrong:
        raise PlanError(f"{path.with_name('manifest.json')}: {'; '.join(wrong)} (one of the two changed on disk); {fix}")


def _dataset_names(column: pa.ChunkedArray) -> list[str]:
    """The distinct names in ``column``: a one-word dictionary says it without a pass over the rows."""
    if pa.types.is_dictionary(column.type) and all(len(chunk.dictionary) == 1 for chunk in column.chunks):
        return list(dict.fromkeys(chunk.dictionary[0].as_py() for chunk in column.chunks if len(chunk)))
    return pc.unique(column).to_pylist()


def _column_values(table: pa.Table, name: str) -> np.ndarray:
    """A null-free int64, float64 or bool column as numpy, read from its buffers.

    ``to_numpy`` would do, but it imports pandas (about 45 MB and 0.3 s); the plan's
    columns are checked free of nulls by :func:`conform`, so the values are the buffer.
    """
    column = table.column(name)
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    values = array.buffers()[1]
    if pa.types.is_boolean(array.type):
        bits = np.frombuffer(values, dtype=np.uint8)
        return np.unpackbits(bits, count=array.offset + len(array), bitorder="little")[array.offset:].view(bool)
    dtype = np.dtype(np.float64 if pa.types.is_float64(array.type) else np.int64)
    return np.frombuffer(values, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _check_fits(path: Path, manifest: dict[str, Any], dataset: DatasetInfo, fix: str) -> None:
    """The manifest's target against ``dataset`` (the rows are checked as they are read)."""
    target = manifest["target"]
    if target.get("name") != dataset.name:
        raise PlanError(f"{path}: plan is for dataset '{target.get('name')}', the target is '{dataset.name}'")
    if target.get("size") is not None and target["size"] != dataset.size:
        raise PlanError(
            f"{path}: plan was built for '{dataset.name}' with n={target['size']}, the dataset has n={dataset.size}; {fix}"
        )
    if target.get("fingerprint") and dataset.fingerprint and target["fingerprint"] != dataset.fingerprint:
        raise PlanError(
            f"{path}: dataset fingerprint {target['fingerprint'][:12]} differs from '{dataset.name}' "
            f"{dataset.fingerprint[:12]} (the data changed); {fix}"
        )
