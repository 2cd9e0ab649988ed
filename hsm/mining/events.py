"""The per-sample event log: Hive-partitioned Parquet written by every rank.

Layout: ``<hsm_dir>/events/epoch=E/rank=R/part-NNNNN.parquet``. Each part is
written to a hidden temporary name and renamed, so a reader never sees half a
file; readers ignore anything not named ``part-NNNNN.parquet``.

Integrity: after each part the writer records the part's sha256 in its folder's
ledger ``_sha256.json`` (``{part name: sha256}``, replaced atomically). Page
checksums cover data pages, not the footer; the ledger covers every byte, and it
names deleted parts. Readers compare each part against it (:func:`verified_checksums`);
a part the ledger does not know (a writer killed between the part and its entry,
or a run older than the ledger) is read with page checksums only, and the rank's
next writer records it.

Resume rule: when a run resumes from a checkpoint, the new ``attempt`` re-logs
the steps after the checkpoint; for every ``(epoch, global_step, rank)`` only
the events of the highest attempt count (:func:`supersede_attempts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hsm.io import file_sha256, open_parquet, temp_writer_pid, write_json_atomic, write_parquet_atomic
from hsm.metrics import NULLABLE_EVENT_COLUMNS
from hsm.schemas import EVENT_SCHEMA, SchemaError, check_schema, conform

__all__ = [
    "keyed_write_options",
    "EventWriter",
    "remove_stale_event_temps",
    "CorruptEventFile",
    "EventRead",
    "event_dir",
    "list_event_files",
    "LEDGER",
    "recorded_digests",
    "record_digests",
    "verified_checksums",
    "events_digest",
    "part_checksums",
    "read_epoch_events",
    "supersede_attempts",
    "PART_WRITE_OPTIONS",
    "drop_duplicate_events",
]

_NULLABLE_STATS = NULLABLE_EVENT_COLUMNS  # hsm.metrics: coord_loss, label_loss, loss_sum, det_f1
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
LEDGER = "_sha256.json"
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
    path = Path(hsm_dir) / "events" / f"epoch={epoch}"
    return path if rank is None else path / f"rank={rank}"


def keyed_write_options(schema: pa.Schema, *, sorted_column: str, dictionary: tuple[str, ...],
                        statistics: tuple[str, ...]) -> dict[str, Any]:
    """Parquet options for a large table of per-sample numbers (the state, a plan).

    Floats (scores, means) are left uncompressed: they do not compress, and compressing
    them was half of a 10M-row state's write time. ``sorted_column`` is delta-encoded
    (ascending indices take a few bits each); the ``dictionary`` columns (few distinct
    values: dataset, counts, epochs, weights) are dictionary-encoded and lz4-compressed.
    """
    names = set(schema.names)
    return {
        "compression": {f.name: "none" if pa.types.is_floating(f.type) and f.name not in dictionary else "lz4"
                        for f in schema},
        "use_dictionary": [c for c in dictionary if c in names],
        "column_encoding": {sorted_column: "DELTA_BINARY_PACKED"} if sorted_column in names else None,
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


def recorded_digests(rank_dir: Path) -> dict[str, str]:
    """The ledger of one ``rank=R`` folder: ``{part name: sha256}`` (empty when it has none).

    Raises:
        CorruptEventFile: the ledger is not a JSON object of names to hex digests.
    """
    path = Path(rank_dir) / LEDGER
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CorruptEventFile(f"{path}: unreadable part ledger ({e}); restore it, or delete it to trust the parts "
                               "as they are (page checksums only)") from e
    if not isinstance(data, dict) or not all(isinstance(v, str) and len(v) == 64 for v in data.values()):
        raise CorruptEventFile(f"{path}: not a part ledger ({{part name: sha256}}); restore it, or delete it to trust "
                               "the parts as they are (page checksums only)")
    return data


def record_digests(rank_dir: Path, digests: dict[str, str]) -> None:
    """Add ``{part name: sha256}`` to the folder's ledger (rewritten atomically; one writer per folder)."""
    write_json_atomic({**recorded_digests(rank_dir), **digests}, Path(rank_dir) / LEDGER)


def record_unrecorded_parts(hsm_dir: str | Path, rank: int) -> dict[str, str]:
    """Record the parts of ``rank``'s folders that its ledgers lack (a writer killed between the
    part and its entry, or a run from before the ledger); returns them as ``{path: sha256}``."""
    added = {}
    for rank_dir in sorted(Path(hsm_dir).glob(f"events/epoch=*/rank={rank}")):
        known = recorded_digests(rank_dir)
        new = {p.name: file_sha256(p) for p in sorted(rank_dir.iterdir()) if PART_RE.match(p.name) and p.name not in known}
        if new:
            record_digests(rank_dir, new)
            added.update({str(rank_dir / name): digest for name, digest in new.items()})
    return added


class EventWriter:
    """Per-rank, background-flushed writer of the event log.

    ``append`` runs on the training thread and only keeps references to the
    step's columns; every ``flush_rows`` rows the buffer is handed to one
    background thread that builds the Arrow table and writes a part. Errors of
    the background thread are raised by the next ``append``, ``flush`` or
    ``close``.
    """

    def __init__(
        self,
        hsm_dir: str | Path,
        *,
        run_id: str,
        rank: int,
        attempt: int = 0,
        flush_rows: int = 65536,
        compression_level: int = 3,
    ):
        self.hsm_dir = Path(hsm_dir)
        self.run_id = run_id
        self.rank = rank
        self.attempt = attempt
        self.flush_rows = flush_rows
        self.compression_level = compression_level
        self._buffers: dict[int, list[dict[str, Any]]] = {}
        self._buffered_rows: dict[int, int] = {}
        self._next_part: dict[int, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hsm-events-r{rank}")
        self._pending: list[Future] = []
        self.rows_written = 0
        self.parts_written = 0
        remove_stale_event_temps(self.hsm_dir, rank)
        record_unrecorded_parts(self.hsm_dir, rank)

    def append(
        self,
        *,
        epoch: int,
        global_step: int,
        dataset: Sequence[str],
        base_idx: Any,
        sample_id: Sequence[str],
        loss: Any,
        token_acc: Any,
        n_tokens: Any,
        aug_seed: Any,
        drawn_as_hard: Any,
        position_offset: int = 0,
        coord_loss: Any = None,
        label_loss: Any = None,
        loss_sum: Any = None,
        det_f1: Any = None,
    ) -> None:
        """Buffer one micro-batch; ``position`` is ``position_offset`` + the index in the batch.

        Array arguments may be numpy arrays or lists; strings stay as given
        until the background thread encodes them. The nullable statistics
        (``coord_loss``, ``label_loss``, ``loss_sum``) are written as null where
        they are None or NaN.
        """
        self._raise_background_error()
        n = len(sample_id)
        if n == 0:
            return
        self._buffers.setdefault(epoch, []).append(
            {
                "global_step": global_step,
                "dataset": dataset,
                "base_idx": base_idx,
                "sample_id": sample_id,
                "loss": loss,
                "token_acc": token_acc,
                "n_tokens": n_tokens,
                "aug_seed": aug_seed,
                "drawn_as_hard": drawn_as_hard,
                "coord_loss": coord_loss,
                "label_loss": label_loss,
                "loss_sum": loss_sum,
                "det_f1": det_f1,
                "position_offset": position_offset,
                "n": n,
            }
        )
        rows = self._buffered_rows.get(epoch, 0) + n
        self._buffered_rows[epoch] = rows
        if rows >= self.flush_rows:
            self._submit(epoch)

    def _submit(self, epoch: int) -> None:
        batches = self._buffers.pop(epoch, [])
        self._buffered_rows.pop(epoch, None)
        if not batches:
            return
        part = self._claim_part(epoch)
        self._pending.append(self._pool.submit(self._write_part, epoch, part, batches))

    def _claim_part(self, epoch: int) -> int:
        if epoch not in self._next_part:
            existing = list_event_files(self.hsm_dir, epoch, rank=self.rank)
            numbers = [int(PART_RE.match(p.name).group(1)) for p in existing]
            self._next_part[epoch] = max(numbers, default=-1) + 1
        part = self._next_part[epoch]
        self._next_part[epoch] = part + 1
        return part

    def _write_part(self, epoch: int, part: int, batches: list[dict[str, Any]]) -> None:
        table = self._to_table(epoch, batches)
        path = event_dir(self.hsm_dir, epoch, self.rank) / f"part-{part:05d}.parquet"
        write_parquet_atomic(table, path, compression_level=self.compression_level, **PART_WRITE_OPTIONS)
        record_digests(path.parent, {path.name: file_sha256(path)})  # the part is committed first: see LEDGER
        self.rows_written += table.num_rows
        self.parts_written += 1

    def _to_table(self, epoch: int, batches: list[dict[str, Any]]) -> pa.Table:
        n_total = sum(b["n"] for b in batches)
        steps = np.concatenate([np.full(b["n"], b["global_step"], dtype=np.int64) for b in batches])
        positions = np.concatenate([np.arange(b["n"], dtype=np.int32) + b["position_offset"] for b in batches])

        def column(name: str, dtype: Any) -> np.ndarray:
            return np.concatenate([np.asarray(b[name], dtype=dtype).reshape(-1) for b in batches])

        def strings(name: str) -> pa.Array:
            values: list[str] = []
            for b in batches:
                values.extend(b[name])
            return pa.array(values, type=pa.string())

        arrays = {
            "run_id": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n_total, dtype=np.int32)), pa.array([self.run_id])
            ).cast(pa.string()),
            "attempt": pa.array(np.full(n_total, self.attempt, dtype=np.int32)),
            "epoch": pa.array(np.full(n_total, epoch, dtype=np.int32)),
            "global_step": pa.array(steps),
            "rank": pa.array(np.full(n_total, self.rank, dtype=np.int32)),
            "position": pa.array(positions),
            "dataset": strings("dataset"),
            "base_idx": pa.array(column("base_idx", np.int64)),
            "sample_id": strings("sample_id"),
            "loss": pa.array(column("loss", np.float32)),
            "token_acc": pa.array(column("token_acc", np.float32)),
            "n_tokens": pa.array(column("n_tokens", np.int32)),
            "aug_seed": pa.array(column("aug_seed", np.int64)),
            "drawn_as_hard": pa.array(column("drawn_as_hard", np.bool_)),
        }
        for name in _NULLABLE_STATS:
            values = np.concatenate([np.full(b["n"], np.nan, np.float32) if b.get(name) is None
                                     else np.asarray(b[name], dtype=np.float32).reshape(-1) for b in batches])
            arrays[name] = pa.array(values, type=pa.float32(), from_pandas=True)  # NaN -> null
        return pa.Table.from_arrays([arrays[f.name] for f in EVENT_SCHEMA], schema=EVENT_SCHEMA)

    def flush(self) -> None:
        """Write every buffered row and wait for all parts; raises a background error."""
        for epoch in list(self._buffers):
            self._submit(epoch)
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Flush and stop the background thread."""
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def _raise_background_error(self) -> None:
        if not any(f.done() for f in self._pending):
            return
        still = []
        for future in self._pending:
            if future.done():
                future.result()
            else:
                still.append(future)
        self._pending = still

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


def part_checksums(files: Sequence[Path], root: Path) -> dict[str, str]:
    """``{path relative to root: sha256}`` of each part, for the state's provenance (what was folded)."""
    return {str(path.relative_to(root)): _sha256(path) for path in sorted(files)}


# sha256 of parts this process read, by (path, inode, size, mtime): a part is hashed once per
# fold (verified before reading, then the state's provenance), not twice.
_HASHED: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        if len(_HASHED) > 100_000:
            _HASHED.clear()
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def verified_checksums(hsm_dir: str | Path, epoch: int, *, skip_corrupt: bool = False) -> tuple[dict[Path, str], list[tuple[Path, str]]]:
    """Every part of ``epoch`` checked against its folder's ledger.

    Returns ``({part: sha256}, skipped)``: the parts whose bytes match their recorded
    sha256 or that the ledger does not know (read later with page checksums), and, with
    ``skip_corrupt``, ``(part, why)`` of each part that differs or is recorded but gone.

    Raises:
        CorruptEventFile: without ``skip_corrupt``, the first such part, named, with the fix.
    """
    root = event_dir(hsm_dir, epoch)
    good: dict[Path, str] = {}
    skipped: list[tuple[Path, str]] = []
    files = list_event_files(hsm_dir, epoch)
    by_dir: dict[Path, list[Path]] = {}
    for path in files:
        by_dir.setdefault(path.parent, []).append(path)
    rank_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("rank=")) if root.is_dir() else []
    for rank_dir in rank_dirs:
        recorded = recorded_digests(rank_dir)
        problems = []
        for path in by_dir.get(rank_dir, []):
            digest = _sha256(path)
            expected = recorded.get(path.name)
            if expected is not None and digest != expected:
                problems.append((path, f"{path}: sha256 differs from the one recorded when it was written "
                                       f"({rank_dir / LEDGER}): the file changed on disk"))
            else:
                good[path] = digest
        present = {p.name for p in by_dir.get(rank_dir, [])}
        for name in sorted(set(recorded) - present):
            problems.append((rank_dir / name, f"{rank_dir / name}: recorded in {rank_dir / LEDGER} but missing "
                                              "(deleted or moved)"))
        for path, why in problems:
            if not skip_corrupt:
                raise CorruptEventFile(f"{why}; restore it, or re-run with --skip-corrupt to leave it out")
            warnings.warn(f"hsm: skipping event file {why}", stacklevel=2)
            skipped.append((path, why))
    return good, skipped


def events_digest(files: Sequence[Path], root: Path, checksums: dict[str, str] | None = None) -> str:
    """Digest of which parts exist, their sizes and their content (sha256 of each).

    A changed digest means the epoch must be refolded: a part rewritten with other
    bytes of the same size changes it too, and the refold then reads the part with
    page checksums verified (a damaged page is an error naming the part).
    ``checksums`` are :func:`part_checksums` of ``files`` when already computed.
    """
    checksums = checksums if checksums is not None else part_checksums(files, root)
    h = hashlib.sha256()
    for path in sorted(files):
        name = str(path.relative_to(root))
        h.update(f"{name}\0{path.stat().st_size}\0{checksums[name]}\n".encode())
    return h.hexdigest()


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
        table = part.read(columns=present, use_threads=True)
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
