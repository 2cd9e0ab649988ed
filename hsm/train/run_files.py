"""The files a training leaves beside its events: ``dataset.json``, ``run.json``, and the attempt it is.

Each is written whole with its sha256 record (:func:`hsm.io.write_recorded`), on rank 0, once the run
is claimed (:mod:`hsm.train.startup`).
"""

from __future__ import annotations

import json
from pathlib import Path

from hsm.io import write_recorded
from hsm.layout import RunPaths
from hsm.train import distributed

__all__ = ["resume_attempt", "write_dataset_info", "write_run_info"]


def resume_attempt(hsm_dir: Path) -> int:
    """One more than the highest attempt in the event log (0 for a fresh run), agreed over ranks.

    Collective: without a shared file system each rank sees only its own parts.

    Args:
        hsm_dir: the run's hsm directory (its ``events/`` are read).
    """
    import pyarrow.parquet as pq

    best = -1
    for part in RunPaths.at(hsm_dir).event_parts():
        try:
            column = pq.read_table(part, columns=["attempt"]).column("attempt")
            best = max(best, max(column.to_pylist(), default=-1))
        except Exception:  # a corrupt part must not stop a resume; the planner reports it
            continue
    return distributed.all_reduce_max(best) + 1


def write_dataset_info(hsm_dir: Path, dataset) -> None:
    """Write ``<hsm_dir>/dataset.json``: the target's identity (name, size, fingerprint) and every dataset's size.

    Args:
        hsm_dir: the run's hsm directory.
        dataset: anything with ``names`` and ``sizes`` (target first, in fusion order) and ``target_info``
            (a :class:`hsm.mining.plan.DatasetInfo`): a :class:`hsm.data.fusion.FusionDataset`, or an
            integration's :class:`hsm.integrations.slots.SlotDataset`.
    """
    datasets = [{"name": n, "size": s} for n, s in zip(dataset.names, dataset.sizes)]  # target first, fusion order
    write_recorded(_json_bytes({"target": dataset.target_info.to_dict(), "datasets": datasets}),
                   RunPaths.at(hsm_dir).dataset_info)


def write_run_info(hsm_dir: Path, num_train_epochs: float, max_steps: int) -> None:
    """Write ``<hsm_dir>/run.json``: the epochs the Trainer runs (what ``activate_after_pct`` counts), so that
    ``hsm plan`` offline triggers as training did."""
    write_recorded(_json_bytes({"num_train_epochs": float(num_train_epochs), "max_steps": int(max_steps)}),
                   RunPaths.at(hsm_dir).run_info)


def _json_bytes(payload: dict) -> bytes:
    """Indented, key-sorted JSON, as :func:`hsm.io.write_json_atomic` writes it."""
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")
