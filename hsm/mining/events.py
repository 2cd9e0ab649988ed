"""The per-sample event log: Hive-partitioned Parquet written by every rank.

Layout: ``<hsm_dir>/events/epoch=E/rank=R/part-NNNNN.parquet``. Each part is
written to a hidden temporary name and renamed, so a reader never sees half a
file; readers ignore anything not named ``part-NNNNN.parquet``. Each ``rank=R``
folder also holds its parts' ledger (:mod:`hsm.mining.ledger`).

The writer is :class:`hsm.mining.event_writer.EventWriter`; the reader
:func:`hsm.mining.event_reader.read_epoch_events`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from hsm.io import temp_writer_pid
from hsm.layout import RunPaths

__all__ = [
    "PART_RE",
    "PART_WRITE_OPTIONS",
    "CorruptEventFile",
    "event_dir",
    "keyed_write_options",
    "list_event_files",
    "remove_stale_event_temps",
]

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
# run_id and dataset repeat on every row; sample_id is unique per part, where a
# dictionary would only add a page. Statistics only where readers prune on them.
PART_WRITE_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": ["run_id", "dataset"],
    "write_statistics": ["epoch", "global_step", "rank", "attempt"],
    "write_page_checksum": True,
}


class CorruptEventFile(RuntimeError):
    """An event part that cannot be read as data (truncated, corrupt or off-schema)."""


def event_dir(hsm_dir: str | Path, epoch: int, rank: int | None = None) -> Path:
    """``<hsm_dir>/events/epoch=E[/rank=R]``."""
    return RunPaths.at(hsm_dir).events(epoch, rank)


def keyed_write_options(schema: pa.Schema, *, sorted_column: str, dictionary: tuple[str, ...],
                        statistics: tuple[str, ...], small_ints: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parquet options for a large table of per-sample numbers (the state, a plan).

    Floats (scores, means) are left uncompressed: they do not compress, and compressing
    them was half of a 10M-row state's write time. ``sorted_column`` is delta-encoded
    (ascending indices take a few bits each), and so are ``small_ints`` (counts, epochs: a
    few bits each, as small as a dictionary, without a hash lookup per value); the
    ``dictionary`` columns (few distinct values: dataset, weights) are dictionary-encoded.
    Everything but the floats is lz4-compressed. Footer statistics only for ``statistics``:
    those of a dictionary-encoded string column cost more than writing the column.
    """
    names = set(schema.names)
    delta = [c for c in (sorted_column, *small_ints) if c in names and c not in dictionary]
    return {
        "compression": {f.name: "none" if pa.types.is_floating(f.type) and f.name not in dictionary else "lz4"
                        for f in schema},
        "use_dictionary": [c for c in dictionary if c in names],
        "column_encoding": {c: "DELTA_BINARY_PACKED" for c in delta} or None,
        "write_statistics": [c for c in statistics if c in names],
    }


def remove_stale_event_temps(hsm_dir: str | Path, rank: int) -> list[Path]:
    """Remove the temp files killed writers of ``rank`` left in its own event folders.

    Each rank is the only writer of ``events/epoch=*/rank=R``, so its temp files of
    another process are a dead writer's; this process's own (in flight) are kept.
    """
    removed = []
    for path in Path(hsm_dir).glob(f"events/epoch=*/rank={rank}/.*"):
        pid = temp_writer_pid(path.name)
        if pid is not None and pid != os.getpid():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def list_event_files(hsm_dir: str | Path, epoch: int, rank: int | None = None) -> list[Path]:
    """Committed part files of one epoch (all ranks unless ``rank``), sorted by rank then part."""
    root = event_dir(hsm_dir, epoch)
    if not root.is_dir():
        return []
    rank_dirs = [root / f"rank={rank}"] if rank is not None else sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("rank=")),
        key=lambda p: int(p.name.split("=", 1)[1]) if p.name.split("=", 1)[1].isdigit() else -1,
    )
    files = []
    for rank_dir in rank_dirs:
        if rank_dir.is_dir():
            files.extend(sorted(p for p in rank_dir.iterdir() if PART_RE.match(p.name)))
    return files
