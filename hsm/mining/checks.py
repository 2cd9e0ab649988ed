"""Start-up checks of a run's files: what training would otherwise fail on an epoch later.

``hsm train`` calls :func:`check_run_files` before the model loads. It reads footers,
whole-file sha256s and the plans' ``is_hard`` column (no event rows): every event part has the event schema and the sha256
its folder's ledger recorded (none recorded missing), every part a committed state
folded is still the one it folded, every state file and id table matches its
checksum record and every plan its manifest. A truncated or rewritten part, an
empty state file, a relabelled id table, a foreign Parquet file in the events folder
or a plan without its manifest is an error naming the file now, not after a whole
epoch of training.

:func:`run_contents` says whether an output folder already holds an hsm run (a fresh
training into it is refused; see :mod:`hsm.run`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa

from hsm.io import ChecksumMismatch, open_parquet
from hsm.mining.events import CorruptEventFile, event_dir
from hsm.mining.ledger import recorded_digests, verified_checksums
from hsm.mining.plan import PlanError, plan_epochs, verify_plan
from hsm.mining.state import (
    find_states,
    is_committed,
    read_state_info,
    sample_ids_path,
    verify_sample_ids_file,
    verify_state,
)
from hsm.mining.update import HistoryChanged, check_folded_history
from hsm.schemas import EVENT_SCHEMA, SchemaError, check_schema
from hsm.layout import RunPaths

__all__ = ["RunFileError", "check_run_files", "check_event_part", "verify_event_log", "verify_sample_ids", "run_contents"]


class RunFileError(ValueError):
    """A file of the run that training would fail on later (unreadable, off-schema, checksum mismatch)."""


def _event_parts(hsm_dir: Path) -> list[Path]:
    """Every ``*.parquet`` under ``events/epoch=*/rank=*`` (a foreign name too: the reader ignores it, say so)."""
    return sorted(p for p in RunPaths.at(hsm_dir).events_root.glob("epoch=*/rank=*/*.parquet") if not p.name.startswith("."))


def check_event_part(path: Path) -> None:
    """The part's footer is readable and its schema the event contract.

    Raises:
        CorruptEventFile: naming the part, with the fix.
    """
    try:
        schema = open_parquet(path).schema_arrow
        check_schema(schema, EVENT_SCHEMA, str(path))
    except SchemaError as e:
        raise CorruptEventFile(f"{e}; not an hsm event part: move it out of {path.parent}") from e
    except (pa.ArrowException, OSError) as e:
        raise CorruptEventFile(f"{path}: not a readable Parquet file ({e}); remove it or plan with --skip-corrupt") from e


def check_run_files(hsm_dir: str | Path) -> int:
    """Check every event part, state file and plan of the run; returns how many files were checked.

    Args:
        hsm_dir: the run's ``hsm`` directory (nothing there yet is fine).

    Raises:
        RunFileError: the first bad file, named, with what to do.
    """
    hsm_dir = Path(hsm_dir)
    checked = 0
    try:
        for path in _event_parts(hsm_dir):
            if not path.name.startswith("part-"):
                raise CorruptEventFile(f"{path}: not an hsm event part (named part-NNNNN.parquet); move it out of "
                                       f"{event_dir(hsm_dir, 0).parent}")
            check_event_part(path)
            checked += 1
        for epoch in _partition_epochs(RunPaths.at(hsm_dir).events_root):
            verified_checksums(hsm_dir, epoch)  # every byte against the ledger; a recorded part gone
        for epoch in find_states(hsm_dir):
            read_state_info(hsm_dir, epoch)  # footer and provenance
            if is_committed(hsm_dir, epoch):
                verify_state(hsm_dir, epoch)
            checked += 1
        check_folded_history(hsm_dir)
        verify_sample_ids(hsm_dir)
        for epoch in plan_epochs(hsm_dir):
            checked += verify_plan(hsm_dir, epoch) is not None
    except (CorruptEventFile, SchemaError, ChecksumMismatch, PlanError) as e:
        raise RunFileError(str(e)) from e
    return checked


# What a run leaves in its hsm/ folder; the lock file (and hidden temporaries) are no run.
_RUN_ENTRIES = ("config.yaml", "dataset.json", "run.json", "events", "state", "sample_ids", "plans")


def run_contents(hsm_dir: str | Path) -> list[str]:
    """What of an hsm run ``hsm_dir`` holds (``events/``, ``config.yaml``, ...); empty when none."""
    hsm_dir = Path(hsm_dir)
    return [f"{name}/" if (hsm_dir / name).is_dir() else name for name in _RUN_ENTRIES if (hsm_dir / name).exists()]


def verify_event_log(hsm_dir: str | Path, *, skip_corrupt: bool = False) -> list[Path]:
    """Check every event part's bytes, for readers that do not verify pages themselves (DuckDB).

    A part is compared with the sha256 its folder's ledger recorded when it was written
    (every byte, the footer too), else with the one its state recorded at folding; a part
    neither knows is read once with page checksums verified. Returns the good parts; with
    ``skip_corrupt`` a bad one is left out with a warning.

    Raises:
        CorruptEventFile: without ``skip_corrupt``, naming the part (a changed, missing or
            unreadable one) and the fix.
    """
    hsm_dir = Path(hsm_dir)
    try:
        check_folded_history(hsm_dir)
    except HistoryChanged as e:
        raise CorruptEventFile(str(e)) from e
    recorded: dict[str, str] = {}
    for epoch in find_states(hsm_dir):
        if is_committed(hsm_dir, epoch):
            verify_state(hsm_dir, epoch)
            recorded.update(read_state_info(hsm_dir, epoch).event_sha256)
    root = RunPaths.at(hsm_dir).events_root
    good = []
    for epoch in sorted(_partition_epochs(root)):
        verified, _ = verified_checksums(hsm_dir, epoch, skip_corrupt=skip_corrupt)
        ledgers = {}
        for path, digest in verified.items():
            if path.parent not in ledgers:
                ledgers[path.parent] = recorded_digests(path.parent)
            try:
                _check_unrecorded(path, digest, ledgers[path.parent], recorded.get(str(path.relative_to(root))))
            except CorruptEventFile as e:
                if not skip_corrupt:
                    raise
                warnings.warn(f"hsm: skipping event file {e}", stacklevel=2)
                continue
            good.append(path)
    return good


def _check_unrecorded(path: Path, digest: str, ledger: dict[str, str], folded: str | None) -> None:
    """A part the ledger does not cover: its state's sha256 when folded, else a read with page checksums."""
    if path.name in ledger:
        return  # every byte matched the ledger
    if folded is not None:
        if digest != folded:
            raise CorruptEventFile(f"{path}: sha256 differs from the one recorded when its epoch was folded "
                                   "(the file changed on disk); restore it, or remove it and hsm plan --refold")
        return
    check_event_part(path)
    try:
        open_parquet(path).read()
    except (pa.ArrowException, OSError) as e:
        raise CorruptEventFile(f"{path}: damaged page ({e}); remove it or plan with --skip-corrupt") from e


def verify_sample_ids(hsm_dir: str | Path) -> None:
    """Check every id table against the sha256 its state recorded, then read it with page checksums
    verified (``SchemaError`` naming a damaged one)."""
    hsm_dir = Path(hsm_dir)
    for epoch in sorted(set(_partition_epochs(RunPaths.at(hsm_dir).sample_ids_root)) | set(find_states(hsm_dir))):
        path = sample_ids_path(hsm_dir, epoch)
        verify_sample_ids_file(hsm_dir, epoch)
        if path.is_file():
            try:
                open_parquet(path).read()
            except (pa.ArrowException, OSError) as e:
                raise SchemaError(f"{path}: damaged id table ({e}); rebuild it with hsm plan --refold") from e


def _partition_epochs(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    found = (c.name.partition("=") for c in root.iterdir() if c.is_dir())
    return [int(value) for name, _, value in found if name == "epoch" and value.isdigit()]
