"""Plan files: ``plans/epoch=E/plan.parquet`` plus ``manifest.json``, written and verified.

The manifest is the commit point: it is written after the plan and holds the
plan's sha256. :func:`load_plan` refuses a plan whose checksum, target dataset,
size, fingerprint or indices do not match, with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hsm.events import keyed_write_options, write_parquet_atomic
from hsm.schemas import PLAN_SCHEMA, SchemaError, check_schema, conform

__all__ = [
    "PLAN_VERSION",
    "PlanError",
    "DatasetInfo",
    "Plan",
    "plan_dir",
    "write_plan",
    "read_manifest",
    "load_plan",
    "file_sha256",
    "write_json_atomic",
    "write_bytes_atomic",
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
    return Path(hsm_dir) / "plans" / f"epoch={epoch}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to a hidden temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(payload: Any, path: str | Path) -> None:
    """Write JSON atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic((json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"), path)


def write_plan(hsm_dir: str | Path, epoch: int, table: pa.Table, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write plan and manifest atomically; returns the manifest with ``checksum`` filled in."""
    directory = plan_dir(hsm_dir, epoch)
    path = directory / "plan.parquet"
    table = conform(table, PLAN_SCHEMA, str(path), keep_dictionary=True)
    write_parquet_atomic(table, path, **keyed_write_options(table.schema, sorted_column="base_idx",
                                                             dictionary=("dataset", "n_obs", "weight"), statistics=("base_idx",)))
    manifest = dict(manifest, plan_version=PLAN_VERSION, epoch=epoch, checksum=file_sha256(path), rows=table.num_rows)
    write_json_atomic(manifest, directory / "manifest.json")
    return manifest


def read_manifest(hsm_dir: str | Path, epoch: int) -> dict[str, Any] | None:
    """The manifest of the plan for ``epoch``, or None if there is no plan."""
    path = plan_dir(hsm_dir, epoch) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: not valid JSON ({e}); re-run hsm plan --epoch {epoch}") from e
    for key in ("plan_version", "epoch", "checksum", "target", "mode", "triggered", "default_weight"):
        if key not in manifest:
            raise PlanError(f"{path}: manifest has no '{key}'; re-run hsm plan --epoch {epoch}")
    if manifest["plan_version"] != PLAN_VERSION:
        raise PlanError(f"{path}: plan_version {manifest['plan_version']} is not {PLAN_VERSION}")
    return manifest


@dataclass(frozen=True)
class Plan:
    """A verified plan, as the schedule consumes it."""

    manifest: dict[str, Any]
    base_idx: np.ndarray
    is_hard: np.ndarray
    weight: np.ndarray

    @property
    def checksum(self) -> str:
        return self.manifest["checksum"]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def triggered(self) -> bool:
        return bool(self.manifest["triggered"])

    def target_weights(self, n_target: int) -> np.ndarray:
        """Weights over every target index; samples not in the plan get ``default_weight``."""
        weights = np.full(n_target, float(self.manifest["default_weight"]))
        weights[self.base_idx] = self.weight
        return weights

    def hard_mask(self, n_target: int) -> np.ndarray:
        """``is_hard`` over every target index."""
        mask = np.zeros(n_target, dtype=bool)
        mask[self.base_idx] = self.is_hard
        return mask


def load_plan(
    hsm_dir: str | Path,
    epoch: int,
    *,
    dataset: DatasetInfo | None = None,
    expected_checksum: str | None = None,
) -> Plan | None:
    """Load and verify the plan for ``epoch``; None when there is none.

    Raises :class:`PlanError` when the file's sha256 differs from the manifest
    (or from ``expected_checksum``, the one rank 0 broadcast), or when the plan
    does not fit ``dataset``.
    """
    manifest = read_manifest(hsm_dir, epoch)
    if manifest is None:
        if expected_checksum is not None:
            raise PlanError(f"{plan_dir(hsm_dir, epoch)}: no plan, but rank 0 announced {expected_checksum[:12]}")
        return None
    path = plan_dir(hsm_dir, epoch) / "plan.parquet"
    fix = f"re-run hsm plan --epoch {epoch}"
    if not path.is_file():
        raise PlanError(f"{path}: missing although its manifest exists; {fix}")
    actual = file_sha256(path)
    if actual != manifest["checksum"]:
        raise PlanError(f"{path}: sha256 {actual[:12]} does not match the manifest's {manifest['checksum'][:12]}; {fix}")
    if expected_checksum is not None and actual != expected_checksum:
        raise PlanError(f"{path}: sha256 {actual[:12]} differs from rank 0's {expected_checksum[:12]}")
    try:
        part = pq.ParquetFile(path, read_dictionary=["dataset"])
        check_schema(part.schema_arrow, PLAN_SCHEMA, str(path))  # the whole contract, from the footer
        table = part.read(columns=list(_LOADED), use_threads=True)
        table = conform(table, pa.schema([PLAN_SCHEMA.field(c) for c in _LOADED]), str(path), keep_dictionary=True)
    except (pa.ArrowException, OSError, SchemaError) as e:
        raise PlanError(f"{path}: unreadable plan ({e}); {fix}") from e
    if dataset is not None:
        _check_fits(path, manifest, table, dataset, fix)
    return Plan(
        manifest=manifest,
        base_idx=table.column("base_idx").to_numpy(),
        is_hard=table.column("is_hard").to_numpy(zero_copy_only=False),
        weight=table.column("weight").to_numpy(),
    )


def _check_fits(path: Path, manifest: dict[str, Any], table: pa.Table, dataset: DatasetInfo, fix: str) -> None:
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
    names = pc.unique(table.column("dataset")).to_pylist()
    if any(name != dataset.name for name in names):
        raise PlanError(f"{path}: rows for datasets {names}, only '{dataset.name}' may be planned")
    if table.num_rows:
        low, high = pc.min(table.column("base_idx")).as_py(), pc.max(table.column("base_idx")).as_py()
        if low < 0 or high >= dataset.size:
            bad = high if high >= dataset.size else low
            raise PlanError(f"{path}: base_idx {bad} out of range for dataset '{dataset.name}' (n={dataset.size}); {fix}")
