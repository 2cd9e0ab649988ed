"""Bring the stored state up to date with the event log (:func:`fold_pending`).

Reuses the longest prefix of stored states whose event parts are unchanged, then folds
each later epoch (:mod:`hsm.mining.fold`) and writes its state and id table.
"""

from __future__ import annotations

import functools
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hsm.config import MiningConfig
from hsm.io import ChecksumMismatch, file_sha256
from hsm.mining.engines import ENGINES
from hsm.mining.event_reader import read_epoch_events
from hsm.mining.events import list_event_files
from hsm.mining.ledger import events_digest, folded_part_changes, part_checksums, verified_checksums
from hsm.mining.fold import (
    DEFAULT_MEMORY_LIMIT,
    EpochFold,
    buckets_for,
    event_columns,
    fold_in_memory,
    fold_out_of_core,
)
from hsm.mining.state import (
    PER_EPOCH_AGGREGATES,
    STATE_VERSION,
    StateInfo,
    disk_table,
    find_states,
    fold_columns,
    fold_table,
    is_committed,
    read_sample_ids,
    read_state,
    read_state_info,
    sample_ids_path,
    state_checksum_path,
    state_path,
    verify_state,
    write_sample_ids,
    write_state,
)
from hsm.schemas import SAMPLE_ID_SCHEMA, SchemaError
from hsm.layout import RunPaths

__all__ = ["OutputError", "HistoryChanged", "Folded", "fold_pending", "check_folded_history", "reusable_prefix", "id_lookup", "writing"]


class OutputError(RuntimeError):
    """A state, plan or dump file could not be written (read-only directory, a file in the way, disk full)."""


class HistoryChanged(ChecksumMismatch):
    """Event parts that a committed state folded were rewritten or removed since."""


_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hsm-state-writer")


def writing(path: Path, write, *args, **kwargs):
    """Run ``write(*args, **kwargs)``; an ``OSError`` becomes :class:`OutputError` naming ``path``."""
    try:
        return write(*args, **kwargs)
    except OSError as e:
        raise OutputError(
            f"{path}: cannot write ({e.strerror or e}); make {path.parent} writable or choose another run directory"
        ) from e


@dataclass
class Folded:
    """The state after :func:`fold_pending`: the keyed fold table and what produced it."""

    state: pa.Table | None  # FOLD_COLUMNS, sorted by key; None when nothing was logged yet
    info: StateInfo | None
    folded_epochs: list[int] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    last_events: pa.Table | None = None
    reused_epoch: int = -1  # the last epoch whose stored state (and id table) was reused
    new_ids: list[pa.Table] = field(default_factory=list)  # ids of folded epochs, when not written
    pending: Future | None = None  # the last state's write, still running; call wait()

    def wait(self) -> None:
        """Wait for the background write of the last state; raises its error."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


def _events_root(hsm_dir: Path) -> Path:
    return RunPaths.at(hsm_dir).events_root


def fold_pending(
    hsm_dir: str | Path,
    up_to_epoch: int,
    mining: MiningConfig,
    *,
    engine: str | None = None,
    skip_corrupt: bool = False,
    write: bool = True,
    memory_limit: int | None = None,
    temp_directory: str | Path | None = None,
    refold: bool = False,
) -> Folded:
    """Bring the state up to date with every epoch ``<= up_to_epoch``.

    Reuses the longest prefix of stored states whose events are unchanged, then folds
    each later epoch from its own events only; each fold also appends the epoch's newly
    seen samples to the id table. ``last_events`` are the events of ``up_to_epoch`` when
    this call folded it in memory (the columns planning reads).

    An epoch whose fold would need more than ``memory_limit`` bytes (default
    :data:`DEFAULT_MEMORY_LIMIT`) is folded out of core (:func:`fold_out_of_core`),
    spilling to ``temp_directory``; the result is the same, byte for byte.

    A stored state is reused only with its commit record (``state.sha256.json``) and
    the same event parts (names, sizes, sha256); the reused file's bytes must match
    its record (:func:`verify_state` raises ``ChecksumMismatch`` otherwise). ``refold``
    ignores every stored state and folds from the event log.

    Raises:
        HistoryChanged: without ``refold``, a committed state whose folded parts were
            rewritten or removed since (:func:`check_folded_history`).
    """
    hsm_dir = Path(hsm_dir)
    engine = engine or mining.engine
    fold = ENGINES[engine]
    per_epoch = mining.aggregate in PER_EPOCH_AGGREGATES
    if not refold:
        check_folded_history(hsm_dir, up_to_epoch)
    valid = -1 if refold else reusable_prefix(hsm_dir, up_to_epoch, mining)
    state, info, names = _carried_state(hsm_dir, valid, mining) if valid >= 0 else (None, None, [])
    result = Folded(state=None, info=None)
    budget = memory_limit if memory_limit is not None else DEFAULT_MEMORY_LIMIT
    for epoch in range(valid + 1, up_to_epoch + 1):
        files = list_event_files(hsm_dir, epoch)
        n_buckets = buckets_for(files, state, budget)
        if n_buckets > 1:
            if state is None and not files:
                continue
            epoch_fold = _fold_spilled(hsm_dir, epoch, files, state, names, mining, engine, budget, n_buckets,
                                       temp_directory=temp_directory, skip_corrupt=skip_corrupt, per_epoch=per_epoch)
            result.last_events = None
        else:
            read = read_epoch_events(hsm_dir, epoch, skip_corrupt=skip_corrupt, columns=event_columns(mining.metric),
                                     dictionaries=True)
            # Kept for the epoch telemetry only when it has the columns it needs (else freed now).
            telemetry = epoch == up_to_epoch and {"token_acc", "drawn_as_hard"} <= set(read.table.column_names)
            result.last_events = read.table if telemetry else None
            if state is None and read.table.num_rows == 0:
                continue  # nothing logged yet (mining switched on later): no state to carry
            epoch_fold = fold_in_memory(read, epoch, state, names, mining, fold, per_epoch=per_epoch)
            del read
        state, ids, names = epoch_fold.state, epoch_fold.ids, epoch_fold.names
        result.skipped_files += epoch_fold.skipped
        stats = dict(info.epoch_stats) if info is not None else {}
        if epoch_fold.n_events:
            stats[epoch] = {"mean_loss": epoch_fold.mean_loss, "n_events": epoch_fold.n_events,
                            "n_nonfinite": epoch_fold.n_nonfinite}
        checksums = part_checksums(files, _events_root(hsm_dir))
        ids_sha256 = ""
        del epoch_fold
        if not write:
            result.new_ids.append(ids)
        else:
            # The old state of this epoch no longer describes the id table written next: uncommit it first.
            state_checksum_path(hsm_dir, epoch).unlink(missing_ok=True)
            ids_file = writing(sample_ids_path(hsm_dir, epoch), write_sample_ids, hsm_dir, epoch, ids)
            ids_sha256 = file_sha256(ids_file)
        info = StateInfo(
            epoch=epoch, metric=mining.metric, ema_decay=mining.ema_decay, aggregate=mining.aggregate,
            events_digest=events_digest(files, _events_root(hsm_dir), checksums), epoch_stats=stats, datasets=names,
            version=STATE_VERSION, event_sha256=checksums, sample_ids_sha256=ids_sha256,
        )
        if write:
            if epoch == up_to_epoch:
                # The last state is written while the caller selects and writes the plan (2 cores).
                result.pending = _BACKGROUND.submit(_write_state, hsm_dir, state, names, mining, info)
            else:
                _write_state(hsm_dir, state, names, mining, info)
        result.folded_epochs.append(epoch)
    result.state, result.info, result.reused_epoch = state, info, valid
    return result


def _carried_state(hsm_dir: Path, epoch: int, mining: MiningConfig):
    """The stored state of ``epoch`` as the fold carries it, its info and dataset names; its bytes verified first."""
    verify_state(hsm_dir, epoch)  # a float rewritten in place keeps the size: the bytes decide
    disk, info = read_state(hsm_dir, epoch, columns=("dataset", "base_idx", *fold_columns(mining.aggregate)[1:]))
    names = list(info.datasets)
    state = fold_table(disk, names, mining.aggregate)
    del disk  # base_idx, dataset and score are not carried: free them before folding
    return state, info, names


def check_folded_history(hsm_dir: str | Path, up_to_epoch: int | None = None) -> None:
    """Every committed state (of epochs ``<= up_to_epoch``) against the event parts it folded.

    A part rewritten or removed after its epoch was folded is not a reason to refold
    quietly: the state is the record of what was trained on, so replacing it takes an
    explicit ``hsm plan --refold``.

    Raises:
        HistoryChanged: naming each changed part and the fix.
    """
    hsm_dir = Path(hsm_dir)
    lines = []
    for epoch in find_states(hsm_dir):
        if (up_to_epoch is not None and epoch > up_to_epoch) or not is_committed(hsm_dir, epoch):
            continue
        lines += folded_part_changes(hsm_dir, epoch, read_state_info(hsm_dir, epoch).event_sha256)
    if lines:
        raise HistoryChanged(
            f"{hsm_dir / 'state'}: event parts already folded changed on disk:\n  - " + "\n  - ".join(lines)
            + "\nrestore them; or, to replace the recorded history with what the event log holds now, "
              "run hsm plan --refold")


def reusable_prefix(hsm_dir: Path, up_to_epoch: int, mining: MiningConfig) -> int:
    """The last epoch of the longest prefix whose state is stored, committed, of this version and
    these parameters, and folded from the event parts that are there now (names, sizes, sha256); -1 if none."""
    params = (mining.metric, mining.ema_decay, mining.aggregate)
    valid = -1
    stored = set(find_states(hsm_dir))
    for epoch in range(0, up_to_epoch + 1):
        if epoch not in stored or not is_committed(hsm_dir, epoch):
            break
        info = read_state_info(hsm_dir, epoch)
        if info.version != STATE_VERSION:
            break  # written before the id table: refold from the event log
        info.check_params(*params, where=str(state_path(hsm_dir, epoch)))
        digest = events_digest(list_event_files(hsm_dir, epoch), _events_root(hsm_dir))
        if info.events_digest != digest:
            break
        valid = epoch
    return valid


def _fold_spilled(hsm_dir: Path, epoch: int, files: list[Path], state, names: list[str], mining: MiningConfig,
                  engine: str, budget: int, n_buckets: int, *, temp_directory, skip_corrupt: bool,
                  per_epoch: bool) -> EpochFold:
    """One epoch folded out of core, its parts verified against their ledgers first."""
    fold = ENGINES[engine]
    with tempfile.TemporaryDirectory(prefix=f"hsm-fold-e{epoch}-", dir=temp_directory) as spill:
        if engine == "duckdb":  # DuckDB may spill inside a range too
            fold = functools.partial(fold, memory_limit=f"{max(budget >> 21, 64)}MB", temp_directory=spill)
        verified, unverified = verified_checksums(hsm_dir, epoch, skip_corrupt=skip_corrupt)
        epoch_fold = fold_out_of_core(
            [f for f in files if f in verified], epoch, state, names, mining, fold, n_buckets=n_buckets,
            spill_dir=Path(spill), skip_corrupt=skip_corrupt, per_epoch=per_epoch,
        )
    epoch_fold.skipped += [str(path) for path, _ in unverified]
    return epoch_fold


_STATE_SLICE_ROWS = 1 << 20  # one row group each


def _write_state(hsm_dir: Path, state: pa.Table, names: list[str], mining: MiningConfig, info: StateInfo) -> None:
    """Write the fold table as the state file, converting it slice by slice (``disk_table``)."""
    slices = (disk_table(state.slice(start, _STATE_SLICE_ROWS), names, mining.aggregate, mining.ema_decay)
              for start in range(0, max(state.num_rows, 1), _STATE_SLICE_ROWS))
    writing(state_path(hsm_dir, info.epoch), write_state, hsm_dir, slices, info)


def id_lookup(hsm_dir: Path, folded: Folded, target: str):
    """``base_idx -> sample_id`` for ``target``'s samples, loaded from the id table on first use.

    Reads the stored id table of the reused epochs (or, once written, of all folded
    epochs) plus the ids of epochs folded without writing.
    """
    loaded: dict[str, Any] = {}
    on_disk = folded.reused_epoch if folded.new_ids else folded.info.epoch

    def load(subset: np.ndarray | None) -> tuple[np.ndarray, pa.Array]:
        ids = pa.concat_tables([read_sample_ids(hsm_dir, on_disk, dataset=target, base_idx=subset)]
                               + [t.filter(pc.equal(t.column("dataset"), target)).cast(SAMPLE_ID_SCHEMA)
                                  for t in folded.new_ids])
        index = ids.column("base_idx").to_numpy()
        order = np.argsort(index, kind="stable")
        return index[order], ids.column("sample_id").combine_chunks().take(pa.array(order))

    def sample_ids(base_idx: np.ndarray) -> pa.Array:
        if "table" in loaded:
            index, values = loaded["table"]
        elif len(base_idx) <= 1024 and not folded.new_ids:
            index, values = load(np.unique(base_idx))  # a few ties: read only their row groups
        else:
            index, values = loaded["table"] = load(None)
        at = np.minimum(np.searchsorted(index, base_idx), max(len(index) - 1, 0))
        if len(base_idx) and (len(index) == 0 or not np.array_equal(index[at], base_idx)):
            raise SchemaError(f"{hsm_dir / 'sample_ids'}: no sample_id for some '{target}' samples; "
                              f"delete the state and sample_ids directories to refold")
        return values.take(pa.array(at))

    return sample_ids
