"""``hsm sql``: DuckDB over a run's events, state and plans, read-only, confined to the run, time-limited."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from hsm.cli.common import console, fail, print_table, printed_warnings
from hsm.layout import RunPaths

__all__ = ["sql", "DEFAULT_TIMEOUT_S", "DEFAULT_MEMORY_LIMIT"]

DEFAULT_TIMEOUT_S = 300.0
# hsm.mining.queries.DEFAULT_MEMORY_LIMIT (not imported here: the CLI starts without duckdb).
DEFAULT_MEMORY_LIMIT = "50%"


def sql(
    name: Optional[str] = typer.Argument(None, help="A shipped query (see --list)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="The run's output directory (holds hsm/)."),
    execute: Optional[str] = typer.Option(None, "-e", "--execute", help="SQL to run against the views."),
    list_queries: bool = typer.Option(False, "--list", help="List the shipped queries and exit."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
    limit: int = typer.Option(200, "--limit", min=1, help="Rows printed in table format."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt",
                                      help="Leave damaged event parts out of the event views (warned) instead of refusing."),
    timeout_s: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout", min=0.001, metavar="SECONDS",
                                    help="Stop a query that runs longer than this (Ctrl-C stops it at once)."),
    memory_limit: str = typer.Option(DEFAULT_MEMORY_LIMIT, "--memory-limit",
                                     help="DuckDB's memory limit, e.g. 4GB or 50% (of RAM; DuckDB's own default is 80%)."),
) -> None:
    """Run a shipped query or your own SQL over the views events, events_raw, event_values, sample_ids,
    state, plans, manifests. Only queries run (SELECT, WITH, DESCRIBE, SUMMARIZE, SHOW, EXPLAIN of a
    query); DuckDB reads nothing outside the run's checked files and writes nothing."""
    from hsm.io import ChecksumMismatch
    from hsm.mining.events import CorruptEventFile
    from hsm.mining.plan import PlanError
    from hsm.schemas import SchemaError
    from hsm.mining.queries import (QueryInterrupted, QueryRefused, RunConfinementError, connect, query_text,
                                    run_query, shipped_queries)

    if list_queries:
        for query, description in shipped_queries().items():
            console.print(f"[bold]{query:<20}[/] {description}")
        return
    if fmt not in ("table", "csv", "json"):
        raise fail("sql", f"--format must be table, csv or json, got {fmt!r}")
    if (name is None) == (execute is None):
        raise fail("sql", "give exactly one of a query NAME or -e SQL (hsm sql --list shows the names)")
    if run_dir is None:
        raise fail("sql", "--run-dir is required")
    if not RunPaths.of(run_dir).root.is_dir():
        raise fail("sql", f"{run_dir}: no hsm/ directory; is this a run's output_dir?")
    try:
        text = execute if execute is not None else query_text(name)
    except KeyError as e:
        raise fail("sql", e.args[0]) from e
    import duckdb

    try:  # DuckDB parses the limit (4GB, 50%, ...): ask it before reading the run
        duckdb.connect().execute("SET memory_limit = ?", [memory_limit]).close()
    except duckdb.Error as e:
        raise fail("sql", f"--memory-limit {memory_limit!r}: {e}") from e
    try:
        with printed_warnings(stderr=True):  # stdout is the query's table, CSV or JSON
            try:
                con = connect(run_dir, skip_corrupt=skip_corrupt, timeout_s=timeout_s, memory_limit=memory_limit)
            except (PlanError, ChecksumMismatch, CorruptEventFile, SchemaError, RunConfinementError) as e:
                raise fail("sql", str(e)) from e
        try:
            result = run_query(con, text)
        finally:
            con.close()
    except (KeyboardInterrupt, QueryInterrupted) as e:
        raise fail("sql", f"{name or 'query'}: interrupted (Ctrl-C); nothing was written", code=130) from e
    except QueryRefused as e:
        raise fail("sql", f"{name or 'query'}: {e}") from e
    except duckdb.InterruptException as e:
        raise fail("sql", f"{name or 'query'}: stopped after --timeout {timeout_s:g} s ({e}); narrow the query "
                          "or raise --timeout") from e
    except duckdb.OutOfMemoryException as e:
        raise fail("sql", f"{name or 'query'}: {e} (--memory-limit {memory_limit}); narrow the query or raise "
                          "--memory-limit") from e
    except duckdb.PermissionException as e:
        raise fail("sql", f"{name or 'query'}: {e} (hsm sql reads only the run's views)") from e
    except duckdb.Error as e:
        raise fail("sql", f"{name or 'query'}: {e}") from e
    if result is not None:
        _print(result.columns, result.rows, fmt, limit)


def _cell(value, full: bool) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float) and not full:
        return f"{value:.6g}"
    return str(value)


def _print(columns: list[str], rows: list[tuple], fmt: str, limit: int) -> None:
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt == "json":
        sys.stdout.write(json.dumps([dict(zip(columns, row)) for row in rows], default=str, indent=1) + "\n")
    else:
        # On a terminal floats are shown to 6 significant digits; piped, every value is printed in full.
        full = not console.is_terminal
        numeric = {c for k, c in enumerate(columns) if rows and all(isinstance(r[k], (int, float)) for r in rows[:limit])}
        print_table(columns, [[_cell(v, full) for v in row] for row in rows[:limit]], right=numeric)
        if len(rows) > limit:
            console.print(f"({len(rows)} rows, {limit} shown; --limit to see more)")
