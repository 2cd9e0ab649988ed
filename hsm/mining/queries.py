"""DuckDB over a run directory: the views ``events``, ``events_raw``, ``sample_ids``,
``state``, ``plans`` and ``manifests``, and the queries shipped in ``sql/``.

Each shipped query is ``sql/<name>.sql``; its first line, a ``--`` comment, is
the description ``hsm sql --list`` prints.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa

from hsm.metrics import sql_difficulty
from hsm.mining.checks import verify_event_log, verify_sample_ids
from hsm.mining.plan import plan_dir, plan_epochs, verify_plan
from hsm.mining.state import find_states, is_committed, state_path, verify_state
from hsm.schemas import EVENT_SCHEMA, PLAN_SCHEMA, SAMPLE_ID_SCHEMA, STATE_SCHEMA

__all__ = ["shipped_queries", "query_text", "connect", "run_query", "QueryRefused", "MEASUREMENT_POSITION"]

# hsm.eval.train_quality.POSITION_BASE: where det_f1 measurement rows' positions start (no training batch reaches it).
MEASUREMENT_POSITION = 1 << 24


def shipped_queries() -> dict[str, str]:
    """Name -> description of every query in ``sql/``."""
    queries = {}
    for entry in sorted(resources.files("hsm.sql").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            first = entry.read_text(encoding="utf-8").splitlines()[0]
            queries[entry.name[:-4]] = first.lstrip("-").strip()
    return queries


def query_text(name: str) -> str:
    """SQL text of a shipped query; ``KeyError`` lists the known names."""
    if name not in shipped_queries():
        raise KeyError(f"no shipped query '{name}'; known: {', '.join(shipped_queries())}")
    return resources.files("hsm.sql").joinpath(f"{name}.sql").read_text(encoding="utf-8")


class QueryRefused(ValueError):
    """A statement ``hsm sql`` does not run: anything but a query (COPY, ATTACH, INSTALL, SET, CREATE, ...)."""


# Statements that only read. DuckDB's own settings confine file access to the run's files,
# but a path it may read it may also write (COPY ... TO an event part), so writes are refused here.
_READING = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def run_query(con: duckdb.DuckDBPyConnection, text: str) -> duckdb.DuckDBPyRelation | None:
    """Run the statements of ``text`` on a :func:`connect` connection; the last one's result.

    Args:
        con: a connection from :func:`connect`.
        text: one or more SQL statements; each must be a query (SELECT, WITH, FROM, DESCRIBE,
            SUMMARIZE, SHOW, EXPLAIN).

    Raises:
        QueryRefused: a statement that would write, attach, install or change a setting.
    """
    statements = duckdb.extract_statements(text)
    for statement in statements:
        if statement.type not in _READING:
            kind = statement.type.name
            raise QueryRefused(f"{kind} statements are refused: hsm sql is read-only over the run's views "
                               f"(events, events_raw, sample_ids, state, plans, manifests); write a SELECT")
    result = None
    for statement in statements:
        result = con.sql(statement.query)
    return result


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _files(paths: list[Path]) -> str:
    """A DuckDB list literal of ``paths``."""
    return "[" + ", ".join(_quote(p) for p in paths) + "]"


def _verified_plans(root: Path) -> tuple[list[Path], list[Path]]:
    """Plan and manifest files of every published plan, each plan checked against its manifest's sha256."""
    plans, manifests = [], []
    for epoch in plan_epochs(root):
        if verify_plan(root, epoch) is not None:
            plans.append(plan_dir(root, epoch) / "plan.parquet")
            manifests.append(plan_dir(root, epoch) / "manifest.json")
    return plans, manifests


def _state_files(root: Path) -> list[Path]:
    """State files, each checked against its checksum record where it has one."""
    for epoch in find_states(root):
        if is_committed(root, epoch):
            verify_state(root, epoch)
    return [state_path(root, epoch) for epoch in find_states(root)]


def connect(run_dir: str | Path, *, skip_corrupt: bool = False) -> duckdb.DuckDBPyConnection:
    """A read-only, in-memory DuckDB connection with hsm's views over ``<run_dir>/hsm``.

    - ``events_raw``: every logged event, all attempts.
    - ``events``: the training draws that count: per ``(epoch, global_step, rank)`` the highest attempt.
    - ``measurements``: the ``det_f1`` measurement rows (positions from :data:`MEASUREMENT_POSITION`, ``loss``
      NaN), deduplicated alike; not draws, so kept out of ``events``.
    - ``sample_ids``: the id table, ``(dataset, base_idx, sample_id, first_epoch)``.
    - ``state``: every state snapshot, with ``epoch`` = the epoch it was folded after,
      and ``sample_id`` joined from ``sample_ids`` (the files hold only the keys).
    - ``plans``: every plan, with ``epoch`` = the epoch it is for, and ``sample_id`` joined.
    - ``manifests``: the plan manifests.
    - ``event_values``: ``events`` plus ``metric`` (the latest plan's, ``loss`` before any plan)
      and ``value``, the row's difficulty in it (training draws and measurement rows, as the planner reads them) (``1 - token_acc`` for ``token_acc``; NULL where
      the row did not observe it): :func:`hsm.metrics.sql_difficulty`.
    Views over missing files are empty, with the right columns. Plans are checked against
    their manifests, states against their checksum records, event parts and id tables
    against their recorded sha256 or page checksums first (``PlanError``,
    ``ChecksumMismatch``, ``CorruptEventFile`` or ``SchemaError`` naming the file). Then the connection is confined: it may read
    only those files (``allowed_paths``, ``enable_external_access=false``), installs and
    loads no extension, and its configuration is locked; run statements through
    :func:`run_query`, which refuses anything but queries. ``skip_corrupt`` leaves damaged
    event parts out of the event views (with a warning) instead of refusing the run.
    """
    root = Path(run_dir) / "hsm"
    plan_files, manifest_files = _verified_plans(root)
    state_files = _state_files(root)
    # DuckDB does not verify Parquet page checksums: check the bytes first
    part_files = sorted(verify_event_log(root, skip_corrupt=skip_corrupt))
    verify_sample_ids(root)
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if part_files:
        con.execute(f"CREATE VIEW events_raw AS SELECT * FROM read_parquet({_files(part_files)}, hive_partitioning = false)")
    else:
        con.register("events_raw", EVENT_SCHEMA.empty_table())
    counted = ("(SELECT * FROM events_raw "
               "QUALIFY attempt = max(attempt) OVER (PARTITION BY epoch, global_step, rank))")
    # det_f1 measurement rows are not training draws: kept apart, so draw counts and mean losses hold draws only.
    con.execute(f"CREATE VIEW events AS SELECT * FROM {counted} WHERE position < {MEASUREMENT_POSITION}")
    con.execute(f"CREATE VIEW measurements AS SELECT * FROM {counted} WHERE position >= {MEASUREMENT_POSITION}")
    id_files = sorted(root.glob("sample_ids/epoch=*/sample_ids.parquet"))
    if id_files:
        # A refold may list a sample again in a later epoch's part until that epoch is refolded: first one wins.
        con.execute(
            f"CREATE VIEW sample_ids AS SELECT dataset, base_idx, sample_id, CAST(epoch AS INTEGER) AS first_epoch "
            f"FROM read_parquet({_files(id_files)}, hive_partitioning = true) "
            f"QUALIFY row_number() OVER (PARTITION BY dataset, base_idx ORDER BY epoch) = 1"
        )
    else:
        con.register("sample_ids", SAMPLE_ID_SCHEMA.append(pa.field("first_epoch", pa.int32())).empty_table())
    for view, files, schema in (("state", state_files, STATE_SCHEMA), ("plans", plan_files, PLAN_SCHEMA)):
        if files:
            # The files are keyed by (dataset, base_idx); users see sample_id first, as before.
            con.execute(
                f"CREATE VIEW {view} AS SELECT i.sample_id, f.* REPLACE (CAST(f.epoch AS INTEGER) AS epoch) "
                f"FROM read_parquet({_files(files)}, hive_partitioning = true) AS f "
                f"LEFT JOIN sample_ids AS i ON i.dataset = f.dataset AND i.base_idx = f.base_idx"
            )
        else:
            fields = [pa.field("sample_id", pa.string()), *schema, pa.field("epoch", pa.int32())]
            con.register(view, pa.schema(fields).empty_table())
    if manifest_files:
        con.execute(f"CREATE VIEW manifests AS SELECT * FROM read_json_auto({_files(manifest_files)})")
    else:
        con.execute(
            "CREATE VIEW manifests AS SELECT * FROM (SELECT NULL::INTEGER AS epoch, NULL::VARCHAR AS mode, "
            "NULL::VARCHAR AS metric, NULL::BOOLEAN AS triggered, NULL::VARCHAR AS trigger_reason, "
            "{'eligible': 0, 'hard': 0, 'regular_drawn': 0} AS counts, {'min': 0.0, 'max': 0.0} AS weights, "
            "NULL::VARCHAR AS checksum, NULL::VARCHAR AS engine) WHERE false"
        )
    # The events in the latest plan's metric (loss before any plan), as the planner reads it.
    latest_metric = "(SELECT coalesce((SELECT metric FROM manifests ORDER BY epoch DESC LIMIT 1), 'loss'))"
    con.execute(f"CREATE VIEW event_values AS SELECT *, {latest_metric} AS metric, "
                f"{sql_difficulty(latest_metric)} AS value FROM {counted}")
    _confine(con, [*part_files, *id_files, *state_files, *plan_files, *manifest_files])
    return con


def _confine(con: duckdb.DuckDBPyConnection, files: list[Path]) -> None:
    """Only ``files`` may be read from now on, and no setting can be changed back."""
    con.execute(f"SET allowed_paths = {_files(files)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
