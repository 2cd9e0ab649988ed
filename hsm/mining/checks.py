"""Start-up checks of a run's files: what training would otherwise fail on an epoch later.

``hsm train`` calls :func:`check_run_files` before step 0. It reads footers and
checksums only (no event rows): every event part has the event schema, every state
file matches its checksum record and carries its provenance, every plan matches its
manifest. A truncated part, an empty state file, a foreign Parquet file in the
events folder or a plan without its manifest is an error naming the file now, not
after a whole epoch of training.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from hsm.io import ChecksumMismatch, open_parquet
from hsm.mining.events import CorruptEventFile, event_dir
from hsm.mining.plan import PlanError, plan_epochs, verify_plan
from hsm.mining.state import find_states, is_committed, read_state_info, verify_state
from hsm.schemas import EVENT_SCHEMA, SchemaError, check_schema

__all__ = ["RunFileError", "check_run_files"]


class RunFileError(ValueError):
    """A file of the run that training would fail on later (unreadable, off-schema, checksum mismatch)."""


def _event_parts(hsm_dir: Path) -> list[Path]:
    """Every ``*.parquet`` under ``events/epoch=*/rank=*`` (a foreign name too: the reader ignores it, say so)."""
    return sorted(p for p in (hsm_dir / "events").glob("epoch=*/rank=*/*.parquet") if not p.name.startswith("."))


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
        for epoch in find_states(hsm_dir):
            read_state_info(hsm_dir, epoch)  # footer and provenance
            if is_committed(hsm_dir, epoch):
                verify_state(hsm_dir, epoch)
            checked += 1
        for epoch in plan_epochs(hsm_dir):
            checked += verify_plan(hsm_dir, epoch) is not None
    except (CorruptEventFile, SchemaError, ChecksumMismatch, PlanError) as e:
        raise RunFileError(str(e)) from e
    return checked
