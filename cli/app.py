"""The ``hsm`` command line: one file per command under ``cli/``."""

from __future__ import annotations

import typer

from hsm.cli.data import data_app
from hsm.cli.demo import demo
from hsm.cli.eval import eval_app
from hsm.cli.plan import plan
from hsm.cli.report import report
from hsm.cli.sql import sql
from hsm.cli.train import train

__all__ = ["app", "main"]

app = typer.Typer(
    name="hsm",
    help="Hard-sample mining for fine-tuning vision-language detection models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels label every flag <bool> as if it took a value.
    rich_markup_mode=None,
)
app.command("train")(train)
app.command("plan")(plan)
app.command("sql")(sql)
app.command("demo")(demo)
app.command("report")(report)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
