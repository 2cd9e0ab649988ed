"""Reading text files hsm is given (JSONL, COCO JSON, YAML, answers) as UTF-8, with a clear error.

A file in another encoding raises :class:`NotUtf8Error` naming the file, the line and
column of the first byte that is not UTF-8, and the fix, instead of a bare
``UnicodeDecodeError`` that names neither.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["NotUtf8Error", "read_utf8", "decode_utf8_line", "utf8_problem"]


class NotUtf8Error(ValueError):
    """A text file that is not UTF-8; the message starts with ``file:line:column``."""


def utf8_problem(path: str, data: bytes, error: UnicodeDecodeError, first_line: int = 1) -> str:
    """``path:line:column: not UTF-8 (...); save the file as UTF-8`` for ``error`` raised decoding ``data``.

    Args:
        path: the file.
        data: the bytes that failed to decode: the whole file, or a part of it.
        error: the decode error.
        first_line: the line number of ``data``'s first line in the file.
    """
    bad = data[error.start:error.end].hex(" ")
    line = first_line + data.count(b"\n", 0, error.start)
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return f"{path}:{line}:{column}: not UTF-8 (byte {bad} at line {line}, column {column}); save the file as UTF-8"


def read_utf8(path: str | Path) -> str:
    """The text of ``path`` decoded as UTF-8 (a BOM is kept, as ``read_text`` keeps it).

    Args:
        path: the file.

    Raises:
        NotUtf8Error: the file holds bytes that are not UTF-8 (message: file, line, column, fix).
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8Error(utf8_problem(str(path), data, e)) from None


def decode_utf8_line(raw: bytes, path: str | Path, number: int) -> str:
    """One line of a text file as UTF-8.

    Args:
        raw: the line's bytes.
        path: the file, for the error.
        number: the line's number (1-based), for the error.

    Raises:
        NotUtf8Error: the line holds bytes that are not UTF-8.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8Error(utf8_problem(str(path), raw, e, number)) from None
