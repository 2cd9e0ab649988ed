"""The ``hsm`` command line: one file per command under ``cli/``."""

from __future__ import annotations

import typer

from hsm.cli.plan import plan
from hsm.cli.sql import sql

__all__ = ["app", "main"]

app = typer.Typer(
    name="hsm",
    help="Hard-sample mining for fine-tuning vision-language detection models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("plan")(plan)
app.command("sql")(sql)


def main() -> None:
    app()
