"""The one way hsm writes and checks a file: atomic, durable, checksummed.

Every file hsm owns is written to a hidden temporary name in its own directory,
flushed to disk (``fsync``), renamed over the final name and the directory
flushed too: a reader sees the old file or the new one, never half of one, also
after a power cut. Parquet files carry page checksums (CRC32 of every page) and
are read with verification, so a flipped byte is an error naming the file, not a
different number. A directory (a plan with its manifest) is published the same
way, as a whole (:func:`publish_dir`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ChecksumMismatch",
    "file_sha256",
    "fsync_dir",
    "temp_name",
    "write_bytes_atomic",
    "write_json_atomic",
    "strict_json",
    "write_parquet_atomic",
    "open_parquet",
    "publish_dir",
    "restore_dirs",
    "is_temp_name",
    "temp_writer_pid",
    "epoch_partitions",
    "checksum_record_path",
    "write_recorded",
    "read_recorded",
    "parquet_bytes",
    "read_recorded_parquet",
]


class ChecksumMismatch(ValueError):
    """A file whose content differs from the sha256 recorded when it was written."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes (read 1 MiB at a time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMP_SUFFIX = ".tmp"


def temp_name(path: str | Path) -> Path:
    """A hidden name beside ``path``, unique to this process and thread: ``.NAME.PID.TID.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{_TEMP_SUFFIX}")


def epoch_partitions(root: str | Path) -> dict[int, Path]:
    """Hive partitions ``root/epoch=E`` (folders only; hidden staging names never match), by epoch."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found = {}
    for child in root.iterdir():
        name, _, value = child.name.partition("=")
        if name == "epoch" and value.isdigit() and child.is_dir():
            found[int(value)] = child
    return found


def temp_writer_pid(name: str) -> int | None:
    """The process id in a :func:`temp_name` (``.NAME.PID.TID.tmp``), None for any other name."""
    parts = name.split(".")
    if not name.startswith(".") or not name.endswith(_TEMP_SUFFIX) or len(parts) < 5 or not parts[-3].isdigit():
        return None
    return int(parts[-3])


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`temp_name`'s (or a staging directory of :func:`publish_dir`)."""
    return name.startswith(".") and (name.endswith(_TEMP_SUFFIX) or ".staging-" in name or ".old-" in name)


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def strict_json(payload: Any) -> Any:
    """``payload`` with every non-finite float (NaN, +-inf) replaced by None, so it is strict JSON.

    ``json.dumps`` writes NaN and Infinity by default, which JSON does not allow (other
    readers, DuckDB's ``read_json`` among them, refuse them); a missing number is null.
    """
    if isinstance(payload, float):
        return payload if payload == payload and payload not in (float("inf"), float("-inf")) else None
    if isinstance(payload, dict):
        return {key: strict_json(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [strict_json(value) for value in payload]
    return payload


def write_json_atomic(payload: Any, path: str | Path) -> None:
    """Write ``payload`` as indented, key-sorted, strict JSON (:func:`strict_json`) atomically
    (:func:`write_bytes_atomic`)."""
    text = json.dumps(strict_json(payload), indent=2, sort_keys=True, allow_nan=False)
    write_bytes_atomic((text + "\n").encode("utf-8"), path)


def checksum_record_path(path: str | Path) -> Path:
    """Where ``path``'s sha256 record lives: ``config.yaml`` -> ``config.sha256.json`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.sha256.json")


def write_recorded(data: bytes, path: str | Path) -> None:
    """Write ``data`` atomically, then its sha256 record (:func:`checksum_record_path`).

    The old record is removed first, so a writer killed in between leaves a file without a
    record (read as unverified) rather than a record that no longer fits.
    """
    path = Path(path)
    record = checksum_record_path(path)
    record.unlink(missing_ok=True)
    write_bytes_atomic(data, path)
    write_json_atomic({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, record)


def read_recorded(path: str | Path) -> bytes:
    """The bytes of ``path``, checked against the sha256 record :func:`write_recorded` left beside it.

    A file without a record is returned as is only when no file beside it has one (written by
    hand, or by an hsm that wrote no records). In a folder where hsm recorded other files, a
    missing record means it was deleted (or its writer was killed in the instant between the
    file and its record): that is an error, not a silent downgrade to unverified.

    Raises:
        ChecksumMismatch: the bytes differ from the record, the record is unreadable, or it is
            missing beside recorded files; names the files.
        OSError: ``path`` cannot be read (``FileNotFoundError`` when it is missing).
    """
    path = Path(path)
    data = path.read_bytes()
    record = checksum_record_path(path)
    try:
        expected = json.loads(record.read_bytes())["sha256"]
    except FileNotFoundError:
        others = sorted(p.name for p in path.parent.glob("*.sha256.json"))
        if others:
            raise ChecksumMismatch(
                f"{path}: its checksum record {record.name} is missing while {', '.join(others)} beside it exist "
                f"(hsm writes every run file with one; it was deleted, or its writer was killed); restore it, or "
                f"delete every *.sha256.json in {path.parent} to read the run's files unverified") from None
        return data
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ChecksumMismatch(f"{record}: unreadable checksum record of {path.name} ({e}); restore it, or delete "
                               f"it to accept {path} as it is") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumMismatch(f"{path}: sha256 {actual[:12]} differs from {str(expected)[:12]} recorded in "
                               f"{record.name} when hsm wrote it (the file changed on disk); restore it, or delete "
                               f"{record.name} to accept the file as it is")
    return data


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet bytes with page checksums (a small file written whole by :func:`write_recorded`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def read_recorded_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file :func:`write_recorded` wrote, checked against its sha256 record, then its pages.

    Raises:
        ChecksumMismatch: as :func:`read_recorded`.
        OSError, pyarrow.ArrowException: the file is missing or not Parquet.
    """
    data = read_recorded(path)
    return pq.read_table(pa.BufferReader(data), columns=columns, page_checksum_verification=True)


def write_parquet_atomic(table: pa.Table | Iterable[pa.Table], path: str | Path, **options: Any) -> None:
    """Write ``table`` to ``path`` atomically and durably, with page checksums.

    Args:
        table: one table, or consecutive tables of one schema (a row group or more each,
            so a large file is never assembled in memory).
        path: the final name.
        **options: ``pyarrow.parquet.ParquetWriter`` options; ``write_page_checksum``
            defaults to True.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options.setdefault("write_page_checksum", True)
    tmp = temp_name(path)
    try:
        if isinstance(table, pa.Table):
            pq.write_table(table, tmp, **options)
        else:
            writer = None
            try:
                for chunk in table:
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, chunk.schema, **options)
                    writer.write_table(chunk)
            finally:
                if writer is not None:
                    writer.close()
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_parquet(path: str | Path, **options: Any) -> pq.ParquetFile:
    """``pq.ParquetFile`` that verifies every page's checksum as it reads (a bad page raises ``OSError``)."""
    return pq.ParquetFile(path, page_checksum_verification=True, **options)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def publish_dir(staging: Path, final: Path) -> None:
    """Make the fully written directory ``staging`` appear as ``final`` in one step.

    A new ``final`` is a rename. An existing one is swapped with ``staging`` atomically
    (``renameat2(RENAME_EXCHANGE)``) and the old content removed; where the file system
    cannot swap, the old directory is renamed aside to a hidden ``.NAME.old-PID`` first,
    which :func:`restore_dirs` puts back if the process dies before the second rename.

    Args:
        staging: a complete directory beside ``final`` (same file system).
        final: the published name.
    """
    parent = final.parent
    fsync_dir(staging)
    if not final.exists():
        os.rename(staging, final)
    elif _exchange(staging, final):
        shutil.rmtree(staging)
    else:
        aside = parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, aside)
        os.rename(staging, final)
        shutil.rmtree(aside)
    fsync_dir(parent)


def restore_dirs(parent: Path) -> list[Path]:
    """After a killed :func:`publish_dir`: put back an old directory whose replacement never arrived,
    and remove every other hidden temporary entry under ``parent``. Returns what was removed.

    Call it only while holding the lock of whoever writes under ``parent``.
    """
    removed = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        if not is_temp_name(entry.name):
            continue
        if ".old-" in entry.name:
            final = parent / entry.name[1:].rsplit(".old-", 1)[0]
            if not final.exists():
                os.rename(entry, final)
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed

