"""Reading one epoch of the event log: every part verified, de-duplicated, the latest attempt kept.

Resume rule: when a run resumes from a checkpoint, the new ``attempt`` re-logs
the steps after the checkpoint; for every ``(epoch, global_step, rank)`` only
the events of the highest attempt count (:func:`supersede_attempts`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hsm.io import open_parquet
from hsm.mining.events import CorruptEventFile, list_event_files
from hsm.mining.ledger import verified_checksums
from hsm.schemas import EVENT_SCHEMA, SchemaError, check_schema, conform

__all__ = ["EventRead", "read_epoch_events", "drop_duplicate_events", "supersede_attempts"]


@dataclass
class EventRead:
    """The events of one epoch and what reading them found."""

    table: pa.Table
    files: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    superseded_rows: int = 0


def _read_part(path: Path, epoch: int, columns: Sequence[str] | None, dictionaries: bool = False) -> pa.Table:
    try:
        part = open_parquet(path, read_dictionary=["run_id", "dataset"] if dictionaries else None)
        check_schema(part.schema_arrow, EVENT_SCHEMA, str(path))  # the whole contract, from the footer
        # Columns added to the contract later (nullable) may be absent from older parts; conform fills them.
        present = None if columns is None else [c for c in columns if c in part.schema_arrow.names]
        table = part.read(columns=present, use_threads=False)
    except SchemaError as e:
        raise CorruptEventFile(str(e)) from e
    except (pa.ArrowException, OSError) as e:
        raise CorruptEventFile(f"{path}: not a readable Parquet file ({e})") from e
    except KeyError as e:  # read_dictionary names a column the file lacks: a foreign Parquet file
        name = e.args[0].decode() if isinstance(e.args[0], bytes) else e.args[0]
        raise CorruptEventFile(f"{path}: has no column '{name}': not an hsm event part") from e
    schema = EVENT_SCHEMA if columns is None else pa.schema([EVENT_SCHEMA.field(c) for c in columns])
    try:
        table = conform(table, schema, str(path), keep_dictionary=True)
    except SchemaError as e:
        raise CorruptEventFile(str(e)) from e
    epochs = table.column("epoch")
    if table.num_rows and (pc.min(epochs).as_py() != epoch or pc.max(epochs).as_py() != epoch):
        raise CorruptEventFile(f"{path}: holds events of another epoch than its partition epoch={epoch}")
    return table


def read_epoch_events(
    hsm_dir: str | Path, epoch: int, *, skip_corrupt: bool = False, columns: Sequence[str] | None = None,
    dictionaries: bool = False,
) -> EventRead:
    """Read, validate and de-duplicate (by attempt) all events of one epoch.

    A corrupt or truncated part, or one whose bytes differ from its ledger entry (or that
    the ledger records but is gone), raises :class:`CorruptEventFile` naming it; with
    ``skip_corrupt`` it is skipped with a warning and reported in ``skipped``.
    ``columns`` loads a subset (it must include attempt, epoch, global_step and
    rank); every part's schema is still checked against the whole contract.
    ``dictionaries`` keeps ``dataset`` and ``run_id`` dictionary-encoded as they are
    stored (the planner maps them to codes; decoding 10M names costs more than the rest).

    Args:
        hsm_dir: the run's ``hsm`` directory.
        epoch: the epoch to read.
        skip_corrupt: skip damaged parts with a warning instead of raising.
        columns: the columns to load (default all).
        dictionaries: keep ``dataset`` and ``run_id`` dictionary-encoded.
    """
    files = list_event_files(hsm_dir, epoch)
    verified, skipped = verified_checksums(hsm_dir, epoch, skip_corrupt=skip_corrupt)
    tables, paths = [], []
    for path in files:
        if path not in verified:
            continue
        try:
            tables.append(_read_part(path, epoch, columns, dictionaries))
            paths.append(path)
        except CorruptEventFile as e:
            if not skip_corrupt:
                raise CorruptEventFile(f"{e}; re-run with --skip-corrupt to skip it") from e
            warnings.warn(f"hsm: skipping corrupt event file {e}", stacklevel=2)
            skipped.append((path, str(e)))
    tables = drop_duplicate_events(tables, paths, skip=skip_corrupt)
    empty = EVENT_SCHEMA if columns is None else pa.schema([EVENT_SCHEMA.field(c) for c in columns])
    table = pa.concat_tables(tables, promote_options="permissive") if tables else empty.empty_table()
    kept = supersede_attempts(table)
    return EventRead(table=kept, files=files, skipped=skipped, superseded_rows=table.num_rows - kept.num_rows)


_IDENTITY = ("attempt", "global_step", "rank", "position")


def _span(table: pa.Table, name: str) -> tuple[int, int]:
    bounds = pc.min_max(table.column(name))
    return bounds["min"].as_py(), bounds["max"].as_py()


def _identity_keys(table: pa.Table, mask: np.ndarray | None = None) -> np.ndarray:
    """One row per event: ``(attempt, global_step, rank, position)`` as an ``(n, 4)`` int64 array."""
    columns = [table.column(name).to_numpy().astype(np.int64) for name in _IDENTITY]
    keys = np.stack(columns, axis=1) if columns[0].size else np.zeros((0, 4), dtype=np.int64)
    return keys if mask is None else keys[mask]


def drop_duplicate_events(tables: list[pa.Table], paths: list[Path], *, skip: bool) -> list[pa.Table]:
    """Refuse (or, with ``skip``, drop with a warning) events logged twice in different parts.

    An event is identified by ``(attempt, epoch, global_step, rank, position)``; a part
    copied under another name repeats all of them. Parts are compared only where their
    ``(attempt, rank)`` agree and their ``global_step`` ranges overlap (normally only at a
    flush boundary), so the check costs a few min/max passes. Naive equivalent: every
    identity occurs once over all parts, else the later part (in path order) loses its
    repeated rows.

    Raises:
        CorruptEventFile: naming both files, when ``skip`` is False.
    """
    if len(tables) < 2 or any(t.num_rows and any(n not in t.column_names for n in _IDENTITY) for t in tables):
        return tables
    spans = []
    for i, table in enumerate(tables):
        if table.num_rows == 0:
            continue
        attempt, rank, step = _span(table, "attempt"), _span(table, "rank"), _span(table, "global_step")
        group = (attempt[0], rank[0]) if attempt[0] == attempt[1] and rank[0] == rank[1] else None
        spans.append((step[0], step[1], i, group))
    spans.sort()
    out = list(tables)
    for j, (low, high, b, group) in enumerate(spans):
        for low_a, high_a, a, group_a in spans[:j]:
            if high_a < low or (group is not None and group_a is not None and group != group_a):
                continue
            lo, hi = max(low, low_a), min(high, high_a)
            steps_b = out[b].column("global_step").to_numpy()
            steps_a = out[a].column("global_step").to_numpy()
            keys_b = _identity_keys(out[b], (steps_b >= lo) & (steps_b <= hi))
            keys_a = _identity_keys(out[a], (steps_a >= lo) & (steps_a <= hi))
            if not len(keys_a) or not len(keys_b):
                continue
            both = np.concatenate([keys_a, keys_b])
            _, first, counts = np.unique(both, axis=0, return_index=True, return_counts=True)
            repeated = both[first[(counts > 1)]]
            if not len(repeated):
                continue
            first_a, first_b = sorted([paths[a], paths[b]])
            example = dict(zip(_IDENTITY, repeated[0].tolist()))
            message = (f"{first_b} repeats {len(repeated)} event(s) of {first_a} (same attempt, epoch, global_step, "
                       f"rank, position; e.g. {example}): a copied part?")
            if not skip:
                raise CorruptEventFile(f"{message} Delete one of the two files, or re-run with --skip-corrupt to "
                                       f"drop the repeated events")
            warnings.warn(f"hsm: {message} Dropping the repeated events of {first_b}", stacklevel=3)
            loser = b if paths[b] == first_b else a
            steps = out[loser].column("global_step").to_numpy()
            all_keys = _identity_keys(out[loser])
            inside = (steps >= lo) & (steps <= hi)
            drop = np.zeros(len(all_keys), dtype=bool)
            candidates = all_keys[inside]
            _, ids = np.unique(np.concatenate([candidates, repeated]), axis=0, return_inverse=True)
            ids = ids.reshape(-1)
            drop[inside] = np.isin(ids[: len(candidates)], ids[len(candidates):])
            out[loser] = out[loser].filter(pa.array(~drop))
    return out


def supersede_attempts(events: pa.Table) -> pa.Table:
    """Keep, for every ``(epoch, global_step, rank)``, only the rows of its highest ``attempt``.

    Naive equivalent: ``[r for r in rows if r.attempt == max(a.attempt for a in rows
    if (a.epoch, a.global_step, a.rank) == (r.epoch, r.global_step, r.rank))]``.
    """
    if events.num_rows == 0:
        return events
    span = pc.min_max(events.column("attempt")).as_py()
    if span["min"] == span["max"]:
        return events
    attempt = events.column("attempt").to_numpy()
    keys = np.stack(
        [
            events.column("epoch").to_numpy().astype(np.int64),
            events.column("global_step").to_numpy(),
            events.column("rank").to_numpy().astype(np.int64),
        ],
        axis=1,
    )
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    best = np.full(inverse.max() + 1, np.iinfo(np.int64).min)
    np.maximum.at(best, inverse, attempt.astype(np.int64))
    return events.filter(pa.array(attempt == best[inverse]))
