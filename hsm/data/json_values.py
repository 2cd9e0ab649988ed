"""JSON values read iteratively, never raising: the decoder under the answer parser.

:func:`decode_value` returns what ``json.JSONDecoder().raw_decode(text, pos)`` returns, or
None where that raises, with an explicit stack (containers at most :data:`MAX_DEPTH` deep)
and without exceptions: a ``JSONDecodeError`` counts the lines of the whole text, which
made trying every bracket of a long text quadratic.
"""

from __future__ import annotations

import math
import re
from json.decoder import scanstring

__all__ = ["MAX_DEPTH", "decode_value", "skip_ws"]

# Containers nested deeper than this do not decode (an answer needs 3 levels); the parser
# is iterative anyway, so the bound keeps memory small, not the stack.
MAX_DEPTH = 64
_WS = re.compile(r"[ \t\n\r]*")
_STRING_CHUNK = re.compile(r'[^"\\\x00-\x1f]*')  # what a JSON string holds between escapes
_STRING_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")  # json.scanner.NUMBER_RE
# The constants json.loads accepts, -Infinity before any number.
_CONSTANTS = (("null", None), ("true", True), ("false", False), ("NaN", math.nan), ("Infinity", math.inf),
              ("-Infinity", -math.inf))


def skip_ws(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not JSON whitespace."""
    return _WS.match(text, pos).end()


def _string_end(text: str, pos: int) -> int | None:
    """End of the JSON string whose text starts at ``pos`` (after its quote), or None."""
    while True:
        pos = _STRING_CHUNK.match(text, pos).end()
        if text.startswith('"', pos):
            return pos + 1
        escape = _STRING_ESCAPE.match(text, pos)
        if escape is None:
            return None
        pos = escape.end()


def _decode_scalar(text: str, pos: int, memo: dict):
    """``(value, end)`` of the string, number or constant at ``pos``, or None. Never raises:
    a JSONDecodeError would cost a line count over the whole text (quadratic over many starts)."""
    if text.startswith('"', pos):
        if pos not in memo:
            # Checked first, so json's own scanstring decodes it without raising.
            memo[pos] = None if _string_end(text, pos + 1) is None else scanstring(text, pos + 1)
        return memo[pos]
    for name, value in _CONSTANTS:
        if text.startswith(name, pos):
            return value, pos + len(name)
    match = _NUMBER.match(text, pos)
    if match is None:
        return None
    integer, frac, exp = match.groups()
    try:
        value = float(integer + (frac or "") + (exp or "")) if frac or exp else int(integer)
    except ValueError:  # more digits than int() converts
        return None
    return value, match.end()


def decode_value(text: str, pos: int, memo: dict):
    """``(value, end)`` of the JSON value at ``pos`` (what ``json.JSONDecoder().raw_decode``
    returns, containers nested at most :data:`MAX_DEPTH` deep), or None when there is none.

    Iterative, with an explicit stack. ``memo`` maps the start of every string and container
    decoded so far to its result, so each is decoded once however many starts reach it.

    Args:
        text: the whole text.
        pos: where the value starts (no whitespace skipped).
        memo: shared by every call on the same ``text``; start empty.
    """
    stack: list[tuple[int, list | dict]] = []
    keys: list[str | None] = []
    while True:
        # A value is expected at pos.
        opener = text[pos:pos + 1]
        if opener in ("[", "{") and pos not in memo:
            if len(stack) >= MAX_DEPTH:
                return _fail(stack, memo)
            stack.append((pos, [] if opener == "[" else {}))
            keys.append(None)
            pos = skip_ws(text, pos + 1)
            closer = "]" if opener == "[" else "}"
            if text.startswith(closer, pos):
                found = _close(stack, keys, memo, pos + 1)
            elif opener == "{":
                pos = _read_key(text, pos, keys, memo)
                if pos is None:
                    return _fail(stack, memo)
                continue
            else:
                continue
        else:
            found = memo.get(pos) if opener in ("[", "{") else _decode_scalar(text, pos, memo)
        # A value was found: add it to the open containers, closing every one that ends here.
        while True:
            if found is None:
                return _fail(stack, memo)
            if not stack:
                return found
            value, pos = found
            container = stack[-1][1]
            if isinstance(container, list):
                container.append(value)
            else:
                container[keys[-1]] = value
            pos = skip_ws(text, pos)
            nxt = text[pos:pos + 1]
            if nxt == ",":
                pos = skip_ws(text, pos + 1)
                if isinstance(container, dict):
                    pos = _read_key(text, pos, keys, memo)
                    if pos is None:
                        return _fail(stack, memo)
                break
            if nxt != ("]" if isinstance(container, list) else "}"):
                return _fail(stack, memo)
            found = _close(stack, keys, memo, pos + 1)


def _read_key(text: str, pos: int, keys: list, memo: dict) -> int | None:
    """Reads ``"key" :`` at ``pos`` into ``keys[-1]``; the position of the value, or None."""
    found = _decode_scalar(text, pos, memo) if text.startswith('"', pos) else None
    if found is None:
        return None
    keys[-1], pos = found
    pos = skip_ws(text, pos)
    if not text.startswith(":", pos):
        return None
    return skip_ws(text, pos + 1)


def _close(stack: list, keys: list, memo: dict, end: int):
    start, container = stack.pop()
    keys.pop()
    memo[start] = (container, end)
    return container, end


def _fail(stack: list, memo: dict) -> None:
    # Every container still open fails with the innermost: none of them can close.
    for start, _ in stack:
        memo[start] = None
    return None
