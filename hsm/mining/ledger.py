"""Each event folder's ledger: the sha256 of every part, recorded when it was written.

``events/epoch=E/rank=R/_sha256.json`` is ``{part name: sha256}``, replaced atomically
after each part is committed. Page checksums cover data pages, not the footer; the
ledger covers every byte, and it names deleted parts. Readers compare each part against
it (:func:`verified_checksums`); a part the ledger does not know (a writer killed between
the part and its entry, or a run older than the ledger) is read with page checksums
only, and the rank's next writer records it (:func:`record_unrecorded_parts`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

from hsm.io import file_sha256, write_json_atomic
from hsm.mining.events import PART_RE, CorruptEventFile, event_dir, list_event_files
from hsm.layout import RunPaths

__all__ = [
    "LEDGER",
    "events_digest",
    "folded_part_changes",
    "part_checksums",
    "record_digests",
    "record_unrecorded_parts",
    "recorded_digests",
    "verified_checksums",
]

LEDGER = "_sha256.json"


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


def folded_part_changes(hsm_dir: str | Path, epoch: int, folded: dict[str, str]) -> list[str]:
    """What changed among the parts a committed state folded: one line per part rewritten or gone.

    ``folded`` is the state's ``{path relative to events/: sha256}``. Parts added since (a
    resumed run re-logging the epoch's tail) are not changes: folding them in is the
    normal incremental update. A changed or vanished part is recorded history that a
    refold would silently replace.
    """
    root = RunPaths.at(hsm_dir).events_root
    lines = []
    for name, digest in sorted(folded.items()):
        path = root / name
        if not path.is_file():
            lines.append(f"{path}: folded into the state of epoch {epoch}, now missing")
        elif _sha256(path) != digest:
            lines.append(f"{path}: sha256 differs from the one recorded when epoch {epoch} was folded")
    return lines


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
