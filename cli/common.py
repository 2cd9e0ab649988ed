"""Helpers shared by the commands: error exits and the run directory layout."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

__all__ = ["console", "fail", "hsm_dir_of"]

console = Console(highlight=False)
_stderr = Console(stderr=True, highlight=False)


def fail(command: str, message: str, code: int = 2) -> "typer.Exit":
    """Print ``hsm COMMAND: error: MESSAGE`` to stderr and return the exit to raise."""
    _stderr.print(f"[bold red]hsm {command}: error:[/] {message}", markup=True, soft_wrap=True)
    sys.stderr.flush()
    return typer.Exit(code)


def hsm_dir_of(run_dir: Path) -> Path:
    """``<run_dir>/hsm``: where events, state and plans live."""
    return Path(run_dir) / "hsm"
