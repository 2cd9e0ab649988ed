"""Per-sample running state, the rules that fold one epoch of events into it, and its files.

For one sample with prior state ``(n, mean, ema)`` and this epoch's metric
values ``x_1..x_k`` in observation order ``(epoch, global_step, rank, position)``:

    ema  = x_1 if n == 0 else decay * ema + (1 - decay) * x_1
    ema  = decay * ema + (1 - decay) * x_j          for j = 2..k
    s    = ((x_1 + x_2) + ...) + x_k               (summed in observation order)
    mean = (mean * n + s) / (n + k);  n = n + k;  last = x_k
    score = ema if aggregate == "ema" and n >= 3 else mean

Per-epoch aggregates (``aggregate: epoch_ema | last``), from the same ``s`` and ``k``:

    epoch_mean = s / k;  n_epochs = n_epochs + 1
    epoch_ema  = decay * epoch_ema + (1 - decay) * epoch_mean     (starts at 0)
    score = epoch_ema / (1 - decay ** n_epochs)    for epoch_ema (bias-corrected)
    score = epoch_mean                              for last (the latest epoch's mean)

with ``x = loss``, ``1 - token_acc``, or a box-aware column (``coord_loss``,
``label_loss``, ``loss_sum``; events where it is null, NaN or infinite are skipped). The engines in
:mod:`hsm.mining.engines` implement exactly these operations in this order, so they agree bit for bit;
``tests/oracle.py`` holds them to a naive full recomputation. The score is
derived from the state by :func:`score_of`, shared by every engine.

Samples are keyed by one int64, ``code << 40 | base_idx``, where ``code`` indexes
the run's append-only list of dataset names (:attr:`StateInfo.datasets`). Files:

- ``<hsm_dir>/state/epoch=E/state.parquet``: the state after epoch E (no strings
  but the dictionary-encoded dataset name), sorted by key, with its provenance
  in the Parquet key-value metadata.
- ``<hsm_dir>/state/epoch=E/state.sha256.json``: the state file's sha256, written
  after it (the commit record): a state without it is not reused, one whose bytes
  differ from it is an error (:func:`verify_state`).
- ``<hsm_dir>/sample_ids/epoch=E/sample_ids.parquet``: the append-only id table,
  ``(dataset, base_idx, sample_id)`` of the samples first observed in epoch E.
  The ``hsm sql`` views join it back onto state and plans. Its sha256 is recorded in
  the committed state of epoch E (:attr:`StateInfo.sample_ids_sha256`) and every reader
  compares it (:func:`verify_sample_ids_file`): a relabelled sample is an error, not a
  different name in a report.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hsm.io import (
    ChecksumMismatch,
    file_sha256,
    open_parquet,
    strict_json,
    write_json_atomic,
    write_parquet_atomic,
)
from hsm.mining.events import keyed_write_options
from hsm.schemas import SAMPLE_ID_SCHEMA, STATE_SCHEMA, SchemaError, conform
from hsm.layout import RunPaths

__all__ = [
    "IDX_BITS",
    "STATE_VERSION",
    "FOLD_COLUMNS",
    "EPOCH_COLUMNS",
    "PER_EPOCH_AGGREGATES",
    "fold_columns",
    "StateInfo",
    "StateMismatch",
    "state_path",
    "sample_ids_path",
    "find_states",
    "read_state",
    "read_state_info",
    "state_checksum_path",
    "is_committed",
    "verify_state",
    "write_state",
    "write_sample_ids",
    "read_sample_ids",
    "verify_sample_ids_file",
    "dataset_codes",
    "encode_keys",
    "score_of",
    "fold_table",
    "disk_table",
]

_META_KEY = b"hsm.mining.state"
IDX_BITS = 40
IDX_MASK = (1 << IDX_BITS) - 1
# The running state an engine folds; ``key`` sorted ascending and unique.
FOLD_COLUMNS = ("key", "n_obs", "mean", "ema", "last", "last_epoch")
EPOCH_COLUMNS = ("n_epochs", "epoch_mean", "epoch_ema")  # folded only for the per-epoch aggregates
PER_EPOCH_AGGREGATES = ("epoch_ema", "last")
STATE_VERSION = 2


class StateMismatch(ValueError):
    """A stored state was built with other folding parameters than those asked for."""


@dataclass
class StateInfo:
    """Provenance of a state file: what it folded and how."""

    epoch: int
    metric: str
    ema_decay: float
    aggregate: str
    events_digest: str
    # epoch -> {"mean_loss": float, "n_events": int}; feeds plateau detection.
    epoch_stats: dict[int, dict[str, float]] = field(default_factory=dict)
    # Dataset names by key code; append-only over the run.
    datasets: list[str] = field(default_factory=list)
    # 1: sample_id in every state file (before the id table); such states are refolded.
    version: int = 1
    # sha256 of each event part of this epoch, relative to events/ (hsm sql checks the parts against it).
    event_sha256: dict[str, str] = field(default_factory=dict)
    # sha256 of this epoch's id table (sample_ids/epoch=E/sample_ids.parquet); "" when not recorded.
    sample_ids_sha256: str = ""

    def to_json(self) -> str:
        payload = self.__dict__ | {"epoch_stats": {str(k): v for k, v in self.epoch_stats.items()}}
        return json.dumps(strict_json(payload), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "StateInfo":
        payload = json.loads(text)
        payload["epoch_stats"] = {int(k): v for k, v in payload.get("epoch_stats", {}).items()}
        return cls(**{k: v for k, v in payload.items() if k in cls.__dataclass_fields__})

    def check_params(self, metric: str, ema_decay: float, aggregate: str, where: str) -> None:
        asked = (metric, float(ema_decay), aggregate)
        stored = (self.metric, float(self.ema_decay), self.aggregate)
        if asked != stored:
            raise StateMismatch(
                f"{where}: state was folded with (metric, ema_decay, aggregate)={stored}, "
                f"the config asks for {asked}; delete the run's hsm/state directory to refold "
                f"from the event log"
            )


def state_path(hsm_dir: str | Path, epoch: int) -> Path:
    """``<hsm_dir>/state/epoch=E/state.parquet``."""
    return RunPaths.at(hsm_dir).state(epoch)


def state_checksum_path(hsm_dir: str | Path, epoch: int) -> Path:
    """``<hsm_dir>/state/epoch=E/state.sha256.json``: the state file's sha256, its commit record."""
    return state_path(hsm_dir, epoch).with_name("state.sha256.json")


def is_committed(hsm_dir: str | Path, epoch: int) -> bool:
    """Whether the state after ``epoch`` has its checksum record (a writer killed before it left none)."""
    return state_checksum_path(hsm_dir, epoch).is_file()


def verify_state(hsm_dir: str | Path, epoch: int) -> None:
    """Check the state file's bytes against the sha256 recorded when it was written.

    Raises:
        ChecksumMismatch: the file changed on disk since (same size or not), naming it and the fix.
    """
    path = state_path(hsm_dir, epoch)
    record = state_checksum_path(hsm_dir, epoch)
    fix = "rebuild the state from the event log with hsm plan --refold (or delete the run's hsm/state directory)"
    try:
        expected = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ChecksumMismatch(f"{record}: unreadable checksum record ({e}); {fix}") from e
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatch(
            f"{path}: sha256 {actual[:12]} differs from {expected[:12]} recorded when it was written "
            f"(the file changed on disk); {fix}"
        )


def sample_ids_path(hsm_dir: str | Path, epoch: int) -> Path:
    """``<hsm_dir>/sample_ids/epoch=E/sample_ids.parquet``: samples first observed in epoch E."""
    return RunPaths.at(hsm_dir).sample_ids(epoch)


def find_states(hsm_dir: str | Path) -> list[int]:
    """Epochs that have a committed state file, ascending."""
    return sorted(e for e, folder in RunPaths.at(hsm_dir).epochs("state").items()
                  if (folder / "state.parquet").is_file())


def _info_from(meta: dict | None, path: Path) -> StateInfo:
    if not meta or _META_KEY not in meta:
        raise SchemaError(f"{path}: no hsm.mining.state metadata; not written by hsm")
    try:
        return StateInfo.from_json(meta[_META_KEY].decode())
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{path}: unreadable hsm.mining.state metadata ({e}); delete the state directory to refold") from e


def read_state_info(hsm_dir: str | Path, epoch: int) -> StateInfo:
    """The provenance of the state after ``epoch``, from the file footer only."""
    path = state_path(hsm_dir, epoch)
    try:
        return _info_from(pq.read_schema(path).metadata, path)
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{path}: not a readable state file ({e}); delete it to refold") from e


def read_state(hsm_dir: str | Path, epoch: int, columns: tuple[str, ...] | None = None) -> tuple[pa.Table, StateInfo]:
    """Read and check the state after ``epoch`` (``STATE_SCHEMA``, ``dataset`` dictionary-encoded).

    ``columns`` reads only those (the fold skips ``score``, which it recomputes).
    """
    path = state_path(hsm_dir, epoch)
    try:
        # ParquetFile, not read_table: read_table builds a dataset (importing pyarrow.dataset and pandas).
        table = open_parquet(path, read_dictionary=["dataset"], memory_map=True).read(
            columns=list(columns) if columns else None, use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{path}: not a readable state file ({e}); delete it to refold") from e
    info = _info_from(table.schema.metadata, path)
    if info.epoch != epoch:
        raise SchemaError(f"{path}: holds the state after epoch {info.epoch}; delete it to refold")
    schema = STATE_SCHEMA if not columns else pa.schema([STATE_SCHEMA.field(c) for c in columns])
    return conform(table, schema, str(path), keep_dictionary=True), info


def write_state(hsm_dir: str | Path, state: pa.Table | Iterable[pa.Table], info: StateInfo) -> Path:
    """Atomically write the state after ``info.epoch`` with its provenance.

    ``state`` is the table, or consecutive slices of it (written as they come, so the
    file's columns are never all converted at once).
    """
    path = state_path(hsm_dir, info.epoch)
    chunks = [state] if isinstance(state, pa.Table) else state

    def conformed():
        for chunk in chunks:
            # The per-epoch columns are written only when folded (readers fill absent ones with nulls).
            schema = pa.schema([f for f in STATE_SCHEMA if not f.nullable or f.name in chunk.column_names])
            table = conform(chunk, schema, str(path), keep_dictionary=True)
            yield table.replace_schema_metadata({_META_KEY: info.to_json().encode()})

    tables = conformed()
    first = next(tables)
    options = keyed_write_options(first.schema, sorted_column="base_idx", dictionary=("dataset",),
                                  small_ints=("n_obs", "last_epoch", "n_epochs"), statistics=("base_idx",))
    # An older record goes first, so a writer killed below leaves an uncommitted state (refolded), not a mismatch.
    state_checksum_path(hsm_dir, info.epoch).unlink(missing_ok=True)
    write_parquet_atomic(itertools.chain([first], tables), path, **options)
    # The commit record, written last: a state without it (a killed writer) is refolded, not trusted.
    write_json_atomic({"sha256": file_sha256(path), "size": path.stat().st_size}, state_checksum_path(hsm_dir, info.epoch))
    return path


def write_sample_ids(hsm_dir: str | Path, epoch: int, table: pa.Table) -> Path:
    """Atomically write the id rows of the samples first observed in ``epoch``."""
    path = sample_ids_path(hsm_dir, epoch)
    table = conform(table, SAMPLE_ID_SCHEMA, str(path), keep_dictionary=True)
    # Small row groups with base_idx statistics: a lookup of a few ids reads a few row groups.
    write_parquet_atomic(table, path, compression="zstd", compression_level=1, use_dictionary=["dataset"],
                         row_group_size=1 << 16, write_statistics=["dataset", "base_idx"])
    return path


def read_sample_ids(
    hsm_dir: str | Path, up_to_epoch: int, dataset: str | None = None, base_idx: np.ndarray | None = None
) -> pa.Table:
    """The id table of every sample first observed in epochs ``<= up_to_epoch``.

    ``dataset`` and ``base_idx`` restrict it to those samples (row groups are pruned
    by their statistics, so a handful of ids costs a handful of row groups).
    """
    wanted = None if base_idx is None else np.unique(np.asarray(base_idx, dtype=np.int64))
    parts = []
    for epoch in range(up_to_epoch + 1):
        path = sample_ids_path(hsm_dir, epoch)
        if not path.is_file():
            if state_path(hsm_dir, epoch).is_file():  # every fold writes its epoch's id table (empty or not)
                raise SchemaError(f"{path}: missing, though the state of epoch {epoch} was folded with it; "
                                  "restore it, or rebuild both with hsm plan --refold")
            continue
        verify_sample_ids_file(hsm_dir, epoch)
        try:
            part = _read_ids(path, dataset, wanted)
        except (pa.ArrowException, OSError) as e:
            raise SchemaError(f"{path}: not a readable id table ({e}); delete the state directory to refold") from e
        parts.append(conform(part, SAMPLE_ID_SCHEMA, str(path)))
    return pa.concat_tables(parts) if parts else SAMPLE_ID_SCHEMA.empty_table()


# (path, inode, size, mtime, expected sha256) of id tables this process verified: one hash per file and change.
_VERIFIED_IDS: set[tuple] = set()


def verify_sample_ids_file(hsm_dir: str | Path, epoch: int) -> None:
    """Compare the id table of ``epoch`` with the sha256 its committed state recorded.

    Nothing to compare when the state is not committed (being rewritten, or killed before
    its record) or was written without the field.

    Raises:
        SchemaError: the id table differs from the record, or is missing though recorded; names both.
    """
    if not is_committed(hsm_dir, epoch):
        return
    expected = read_state_info(hsm_dir, epoch).sample_ids_sha256
    if not expected:
        return
    path = sample_ids_path(hsm_dir, epoch)
    try:
        st = path.stat()
    except FileNotFoundError as e:
        raise SchemaError(f"{path}: missing, though the state of epoch {epoch} recorded it; restore it, or rebuild "
                          "both with hsm plan --refold") from e
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, expected)
    if key in _VERIFIED_IDS:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise SchemaError(f"{path}: sha256 {actual[:12]} differs from {expected[:12]} recorded in "
                          f"{state_path(hsm_dir, epoch)} when epoch {epoch} was folded (the id table changed on disk); "
                          "restore it, or rebuild both with hsm plan --refold")
    if len(_VERIFIED_IDS) > 10_000:
        _VERIFIED_IDS.clear()
    _VERIFIED_IDS.add(key)


def _read_ids(path: Path, dataset: str | None, wanted: np.ndarray | None) -> pa.Table:
    """One id file, restricted to ``dataset`` and the ``wanted`` indices, reading only the row
    groups whose ``base_idx`` statistics can hold one of them."""
    file = open_parquet(path)
    groups = list(range(file.num_row_groups))
    if wanted is not None:
        column = file.schema_arrow.get_field_index("base_idx")
        kept = []
        for g in groups:
            stats = file.metadata.row_group(g).column(column).statistics
            if stats is None or not stats.has_min_max:
                kept.append(g)
                continue
            lo, hi = np.searchsorted(wanted, [stats.min, stats.max + 1])
            if hi > lo:
                kept.append(g)
        groups = kept
    table = file.read_row_groups(groups) if groups else file.schema_arrow.empty_table()
    mask = None
    if dataset is not None:
        mask = pc.equal(table.column("dataset").cast(pa.string()), dataset)
    if wanted is not None:
        inside = pc.is_in(table.column("base_idx"), value_set=pa.array(wanted))
        mask = inside if mask is None else pc.and_(mask, inside)
    return table if mask is None else table.filter(mask)


def dataset_codes(column: pa.ChunkedArray | pa.Array, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Code of every row's dataset in ``names``; unseen names are appended (sorted) to a copy.

    Returns ``(codes int64, names)``. Only the dictionary (or the distinct values) is
    looked at in Python; rows are mapped with one vectorised gather per chunk.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    chunks = [c if pa.types.is_dictionary(c.type) else pc.dictionary_encode(c) for c in chunks if len(c)]
    seen = sorted({v for c in chunks for v in c.dictionary.to_pylist()} - set(names))
    names = list(names) + seen
    index = {name: code for code, name in enumerate(names)}
    codes = []
    for chunk in chunks:
        lookup = np.array([index[v] for v in chunk.dictionary.to_pylist()] or [0], dtype=np.int64)
        codes.append(lookup[chunk.indices.to_numpy(zero_copy_only=False)])
    return (np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)), names


def encode_keys(codes: np.ndarray, base_idx: np.ndarray) -> np.ndarray:
    """``code << 40 | base_idx``; refuses indices outside ``[0, 2^40)``."""
    if len(base_idx) and (base_idx.min() < 0 or base_idx.max() > IDX_MASK):
        raise ValueError(f"base_idx must be in [0, 2^{IDX_BITS}); got {base_idx.min()}..{base_idx.max()}")
    keys = np.left_shift(codes, IDX_BITS, dtype=np.int64)  # one new array, then in place
    keys |= base_idx
    return keys


def fold_columns(aggregate: str) -> tuple[str, ...]:
    """The state columns a fold carries for ``aggregate``."""
    return FOLD_COLUMNS + (EPOCH_COLUMNS if aggregate in PER_EPOCH_AGGREGATES else ())


def score_of(state: pa.Table, aggregate: str, decay: float = 0.9) -> np.ndarray:
    """The score of every state row (docs/design.md §4; the per-epoch rules above).

    ``ema``: ``ema`` where ``n_obs >= 3``, else ``mean``; ``mean``: ``mean``;
    ``epoch_ema``: ``epoch_ema / (1 - decay ** n_epochs)``; ``last``: ``epoch_mean``.
    """
    if aggregate == "last":
        return state.column("epoch_mean").to_numpy()
    if aggregate == "epoch_ema":
        n_epochs = state.column("n_epochs").to_numpy().astype(np.float64)
        return state.column("epoch_ema").to_numpy() / (1.0 - np.power(float(decay), n_epochs))
    mean = state.column("mean").to_numpy()
    if aggregate != "ema":
        return mean
    return np.where(state.column("n_obs").to_numpy() >= 3, state.column("ema").to_numpy(), mean)


def fold_table(state: pa.Table, names: list[str], aggregate: str = "ema") -> pa.Table:
    """A state file's table as the engines' keyed fold table (:func:`fold_columns`), sorted by key."""
    codes, known = dataset_codes(state.column("dataset"), names)
    if known != names:
        raise SchemaError(f"state rows name datasets {known[len(names):]} missing from its metadata")
    keys = encode_keys(codes, state.column("base_idx").to_numpy())
    columns = fold_columns(aggregate)[1:]
    for name in columns:
        if state.column(name).null_count:
            raise SchemaError(f"state column '{name}' has nulls; it was folded for another aggregate")
    table = pa.table({"key": keys, **{c: state.column(c) for c in columns}})
    if len(keys) > 1 and not (np.diff(keys) > 0).all():
        order = np.argsort(keys, kind="stable")  # not written by hsm: sort once
        table = table.take(pa.array(order))
        if not (np.diff(keys[order]) > 0).all():
            raise SchemaError("state has duplicate (dataset, base_idx) rows")
    return table


def disk_table(fold: pa.Table, names: list[str], aggregate: str, decay: float = 0.9) -> pa.Table:
    """The engines' fold table as a state file's table (``STATE_SCHEMA``, less the per-epoch
    columns it did not fold), with its score."""
    keys = fold.column("key").to_numpy()
    dataset = pa.DictionaryArray.from_arrays(pa.array((keys >> IDX_BITS).astype(np.int32)), pa.array(names, pa.string()))
    columns = {"dataset": dataset, "base_idx": pa.array(keys & IDX_MASK),
               "score": pa.array(score_of(fold, aggregate, decay))}

    fields = [f for f in STATE_SCHEMA if f.name in columns or f.name in fold.column_names]
    return pa.Table.from_arrays([columns[f.name] if f.name in columns else fold.column(f.name).cast(f.type) for f in fields],
                                names=[f.name for f in fields])
