"""Helpers shared by the commands: error exits and the run directory layout."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from hsm.layout import RunPaths
from rich.console import Console

__all__ = ["console", "fail", "hsm_dir_of", "print_table", "print_warning", "printed_warnings"]

console = Console(highlight=False)
_stderr = Console(stderr=True, highlight=False)


def fail(command: str, message: str, code: int = 2) -> "typer.Exit":
    """Print ``hsm COMMAND: error: MESSAGE`` to stderr and return the exit to raise."""
    _stderr.print(f"[bold red]hsm {command}: error:[/] {message}", markup=True, soft_wrap=True)
    sys.stderr.flush()
    return typer.Exit(code)


def print_warning(message: str, *, stderr: bool = False) -> None:
    """``warning: MESSAGE``, on stdout or (where stdout carries a table, CSV or JSON) on stderr."""
    if stderr:
        typer.echo(f"warning: {message}", err=True)
    else:
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


@contextmanager
def printed_warnings(*, stderr: bool = False) -> Iterator[None]:
    """Collect the ``UserWarning``s raised in the block; when it succeeds, print each distinct message once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print_warning(message, stderr=stderr)


def hsm_dir_of(run_dir: Path) -> Path:
    """``<run_dir>/hsm``: where events, state and plans live."""
    return RunPaths.of(run_dir).root


def print_table(columns: list[str], rows: list[list[str]], right: set[str] = frozenset()) -> None:
    """A table of already formatted cells, never truncated.

    On a terminal: a rich table whose cells fold instead of ending in an ellipsis.
    Piped or redirected: plain text, columns padded to their widest cell (no 80-column cut).
    """
    if console.is_terminal:
        from rich.table import Table

        table = Table(show_edge=False)
        for column in columns:
            table.add_column(column, justify="right" if column in right else "left", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [max([len(c)] + [len(r[k]) for r in rows]) for k, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            (cell.rjust(w) if columns[k] in right else cell.ljust(w)) for k, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    sys.stdout.write("\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]) + "\n")
    sys.stdout.flush()
