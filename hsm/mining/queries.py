"""DuckDB over a run directory: the views ``events``, ``events_raw``, ``event_values``,
``sample_ids``, ``state``, ``plans`` and ``manifests``, and the queries shipped in ``sql/``.

Each shipped query is ``sql/<name>.sql``; its first line, a ``--`` comment, is
the description ``hsm sql --list`` prints.

A user's SQL runs read-only and confined to the run, by two independent barriers:
:func:`run_query` accepts only statements DuckDB's own parser serializes as a SELECT
(``json_serialize_sql``; an EXPLAIN only of such a statement), and the connection
itself has no file access at all: the views read the run's files through Arrow
datasets that hsm opened after checking them, and DuckDB's external access is off
(its only directory is a private temp folder hsm creates and removes), so even a
statement that got past the first barrier could not write or read a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from hsm.metrics import sql_difficulty
from hsm.io import open_parquet
from hsm.mining.checks import verify_event_log, verify_sample_ids
from hsm.mining.ledger import recorded_digests
from hsm.mining.plan import plan_epochs, verify_plan
from hsm.mining.state import find_states, is_committed, read_state_info, state_path, verify_state
from hsm.schemas import EVENT_SCHEMA, PLAN_SCHEMA, SAMPLE_ID_SCHEMA, STATE_SCHEMA, SchemaError, check_schema
from hsm.layout import RunPaths

__all__ = [
    "VIEWS",
    "DEFAULT_MEMORY_LIMIT",
    "shipped_queries",
    "query_text",
    "connect",
    "check_reads",
    "run_query",
    "QueryResult",
    "QueryRefused",
    "QueryInterrupted",
    "RunConfinementError",
    "MEASUREMENT_POSITION",
]

VIEWS = ("events", "events_raw", "measurements", "event_values", "sample_ids", "state", "plans", "manifests")
# DuckDB's own default is 80% of RAM; a query over a run shares the machine with training.
DEFAULT_MEMORY_LIMIT = "50%"
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


class QueryInterrupted(RuntimeError):
    """The query was interrupted (Ctrl-C) before it finished."""


class RunConfinementError(ValueError):
    """A file the views would read is not the run's own: a symlink out of the run, or an
    event folder that neither a ledger nor a state of this run records."""


@dataclass(frozen=True)
class QueryResult:
    """The last statement's column names and rows."""

    columns: list[str]
    rows: list[tuple]


_LEADING = r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
_EXPLAIN = re.compile(_LEADING + r"EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?P<inner>.*)\Z", re.IGNORECASE | re.DOTALL)
_KEYWORD = re.compile(_LEADING + r"(?P<word>[A-Za-z_]+)", re.DOTALL)


def _not_select(con: duckdb.DuckDBPyConnection, text: str) -> str | None:
    """None if DuckDB's parser reads ``text`` as SELECT statements only (what ``json_serialize_sql``
    accepts), else its reason."""
    serialized = json.loads(con.execute("SELECT json_serialize_sql(?::VARCHAR)", [text]).fetchall()[0][0])
    return serialized.get("error_message", "not a SELECT") if serialized["error"] else None


def _keyword(text: str) -> str:
    match = _KEYWORD.match(text)
    return match["word"].upper() if match else "(...)"


def check_reads(con: duckdb.DuckDBPyConnection, text: str) -> list[str]:
    """The statements of ``text``, each checked to be a read by DuckDB's own parse.

    A statement is accepted when ``json_serialize_sql`` (which serializes SELECT
    statements only: SELECT, FROM, WITH, VALUES, DESCRIBE, SUMMARIZE, SHOW) accepts it,
    or when it is ``EXPLAIN [ANALYZE]`` of such a statement (EXPLAIN ANALYZE runs its
    inner statement, so a COPY inside it is refused like a bare one).

    Raises:
        QueryRefused: the first statement that is not a read, named by its keyword.
    """
    statements = duckdb.extract_statements(text)
    if not statements:
        raise QueryRefused("no statement to run; write a SELECT")
    checked = []
    for statement in statements:
        query = statement.query
        explain = _EXPLAIN.match(query) if statement.type == duckdb.StatementType.EXPLAIN else None
        inner = explain["inner"] if explain else query
        reading = statement.type in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
        why = _not_select(con, inner) if reading else "not a query"
        if why is None:
            checked.append(query)
            continue
        kind = f"EXPLAIN {_keyword(inner)}" if explain else _keyword(query)
        detail = f" ({why})" if statement.type == duckdb.StatementType.SELECT else ""
        if statement.type == duckdb.StatementType.MULTI:
            # A PIVOT without an IN list first creates a type from the data: not a plain read.
            detail = " (DuckDB runs it as several statements; a PIVOT needs an explicit IN list, e.g. ON epoch IN (0, 1))"
        raise QueryRefused(f"{kind} statements are refused{detail}: hsm sql is read-only over the run's views "
                           f"({', '.join(VIEWS)}); write a SELECT")
    return checked


def run_query(con: duckdb.DuckDBPyConnection, text: str) -> QueryResult | None:
    """Run the statements of ``text`` on a :func:`connect` connection; the last one's result.

    Every statement is checked (:func:`check_reads`) before any runs. The statements run in a
    worker thread while this one waits, so Ctrl-C (``KeyboardInterrupt`` here) interrupts the
    query at once through ``con.interrupt()`` instead of waiting for it to end; a query past
    the connection's timeout raises ``duckdb.InterruptException``.

    Args:
        con: a connection from :func:`connect`.
        text: one or more SQL statements; each must be a query (SELECT, WITH, FROM, DESCRIBE,
            SUMMARIZE, SHOW, EXPLAIN of a query).

    Raises:
        QueryRefused: a statement that would write, attach, install or change a setting.
        QueryInterrupted: Ctrl-C during the query.
        duckdb.Error: what DuckDB raised (a permission error, a timeout, out of memory, ...).
    """
    statements = check_reads(con, text)
    outcome: dict[str, object] = {}

    def work() -> None:
        relation = None
        try:
            result = None
            for statement in statements:
                relation = con.sql(statement)
                result = None if relation is None else QueryResult(list(relation.columns), relation.fetchall())
            outcome["result"] = result
        except BaseException as e:  # handed to the waiting thread, raised there
            outcome["error"] = e
        finally:
            # A relation kept alive (by the traceback's frame) keeps the connection busy: close() would refuse.
            relation = None
            done.set()

    # Waiting on an Event, not Thread.join: a join that Ctrl-C interrupts can report the thread ended early.
    done = threading.Event()
    threading.Thread(target=work, name="hsm-sql-query", daemon=True).start()
    try:
        while not done.wait(0.05):
            pass
    except KeyboardInterrupt:
        con.interrupt()
        done.wait()
        outcome.clear()
        raise QueryInterrupted("interrupted (Ctrl-C); nothing was written") from None
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _verified_plans(root: Path) -> tuple[list[Path], list[dict]]:
    """Plan files and manifests of every published plan, each plan checked against its manifest's sha256."""
    plans, manifests = [], []
    for epoch in plan_epochs(root):
        manifest = verify_plan(root, epoch)
        if manifest is not None:
            plans.append(RunPaths.at(root).plan(epoch))
            manifests.append(manifest)
    return plans, manifests


def _state_files(root: Path) -> list[Path]:
    """State files, each checked against its checksum record where it has one."""
    for epoch in find_states(root):
        if is_committed(root, epoch):
            verify_state(root, epoch)
    return [state_path(root, epoch) for epoch in find_states(root)]


def _check_links(run_dir: Path) -> None:
    """Every symlink under ``<run_dir>/hsm`` points inside the run directory.

    Raises:
        RunConfinementError: naming the first link that leaves it, and its target.
    """
    run_root = run_dir.resolve()
    hsm_dir = RunPaths.of(run_dir).root
    if hsm_dir.is_symlink() and not hsm_dir.resolve().is_relative_to(run_root):
        raise RunConfinementError(f"{hsm_dir}: a symlink to {hsm_dir.resolve()}, outside the run {run_root}; "
                                  "hsm sql reads only the run's own files: copy them in instead")
    for folder, dirs, files in os.walk(hsm_dir):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(run_root):
                raise RunConfinementError(f"{path}: a symlink to {path.resolve()}, outside the run {run_root}; "
                                          "hsm sql reads only the run's own files: remove the link")


def _check_known_epochs(root: Path, parts: list[Path]) -> None:
    """Each ``events/epoch=E`` folder read is known to the run: a part of it is in its rank's ledger
    or in a committed state's record (a folder copied in from elsewhere without them is not).

    Raises:
        RunConfinementError: naming the folder and the fix.
    """
    events = RunPaths.at(root).events_root
    folded: set[str] = set()
    for epoch in find_states(root):
        if is_committed(root, epoch):
            folded.update(read_state_info(root, epoch).event_sha256)
    by_epoch: dict[Path, list[Path]] = {}
    for path in parts:
        by_epoch.setdefault(path.parent.parent, []).append(path)
    ledgers: dict[Path, dict[str, str]] = {}
    for folder, paths in sorted(by_epoch.items()):
        for path in paths:
            if path.parent not in ledgers:
                ledgers[path.parent] = recorded_digests(path.parent)
        if not any(p.name in ledgers[p.parent] or str(p.relative_to(events)) in folded for p in paths):
            raise RunConfinementError(
                f"{folder}: no part ledger (_sha256.json) and no state of this run records its parts; if it came "
                "from another run, move it out; if this run wrote it (a writer killed before its first ledger "
                "entry), resuming the training records it")


def _check_schemas(files: list[Path], schema: pa.Schema) -> None:
    """Each file's footer schema is ``schema``'s contract (``SchemaError`` naming the file)."""
    for path in files:
        try:
            check_schema(open_parquet(path).schema_arrow, schema, str(path))
        except (pa.ArrowException, OSError) as e:
            raise SchemaError(f"{path}: not a readable Parquet file ({e})") from e


_EPOCH = pa.field("epoch", pa.int32())


# Names repeated on every row: read as Arrow dictionaries, which DuckDB takes in 1.5-2x less time than
# decoded strings (sample_id, nearly unique, is faster decoded).
_DICTIONARY_COLUMNS = ("run_id", "dataset")


def _dataset(files: list[Path], schema: pa.Schema, *, epoch_from: Path | None = None) -> ds.Dataset:
    """An Arrow dataset over ``files`` read as ``schema`` (a missing nullable column reads as nulls);
    with ``epoch_from``, ``epoch`` is taken from the ``epoch=E`` folder under it."""
    names = [c for c in _DICTIONARY_COLUMNS if c in schema.names]
    schema = pa.schema([f.with_type(pa.dictionary(pa.int32(), f.type)) if f.name in names else f for f in schema])
    parquet = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=names))
    if epoch_from is None:
        return ds.dataset([str(p) for p in files], schema=schema, format=parquet)
    partitioning = ds.partitioning(pa.schema([_EPOCH]), flavor="hive")
    return ds.dataset([str(p) for p in files], schema=schema.append(_EPOCH), format=parquet,
                      partitioning=partitioning, partition_base_dir=str(epoch_from))


_EMPTY_MANIFESTS = pa.schema([
    _EPOCH.with_type(pa.int64()), pa.field("mode", pa.string()), pa.field("metric", pa.string()),
    pa.field("triggered", pa.bool_()), pa.field("trigger_reason", pa.string()),
    pa.field("counts", pa.struct([("eligible", pa.int64()), ("hard", pa.int64()), ("regular_drawn", pa.int64())])),
    pa.field("weights", pa.struct([("min", pa.float64()), ("max", pa.float64())])),
    pa.field("checksum", pa.string()), pa.field("engine", pa.string()),
])


def _manifest_table(manifests: list[dict], root: Path) -> pa.Table:
    if not manifests:
        return _EMPTY_MANIFESTS.empty_table()
    try:
        return pa.Table.from_struct_array(pa.array(manifests))
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise SchemaError(f"{root / 'plans'}: the manifests do not share one layout ({e}); re-run hsm plan") from e


def connect(run_dir: str | Path, *, skip_corrupt: bool = False, timeout_s: float | None = None,
            memory_limit: str = DEFAULT_MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with hsm's views over ``<run_dir>/hsm``, unable to touch files.

    - ``events_raw``: every logged event, all attempts (a nullable metric column missing in
      older parts reads as NULL).
    - ``events``: the training draws that count: per ``(epoch, global_step, rank)`` the highest attempt.
    - ``measurements``: the ``det_f1`` measurement rows (positions from :data:`MEASUREMENT_POSITION`, ``loss``
      NaN), deduplicated alike; not draws, so kept out of ``events``.
    - ``sample_ids``: the id table, ``(dataset, base_idx, sample_id, first_epoch)``.
    - ``state``: every state snapshot, with ``epoch`` = the epoch it was folded after,
      and ``sample_id`` joined from ``sample_ids`` (the files hold only the keys).
    - ``plans``: every plan, with ``epoch`` = the epoch it is for, and ``sample_id`` joined.
    - ``manifests``: the plan manifests.
    - ``event_values``: ``events`` plus ``metric`` (the latest plan's, ``loss`` before any plan)
      and ``value``, the row's difficulty in it, over training draws and measurement rows as the planner reads them (``1 - token_acc`` for ``token_acc``; NULL where
      the row did not observe it): :func:`hsm.metrics.sql_difficulty`.

    Views over missing files are empty, with the right columns. First every symlink under
    ``hsm/`` must stay inside the run (``RunConfinementError``), plans are checked against
    their manifests, states against their checksum records, event parts and id tables
    against their recorded sha256 or page checksums, every events folder must be known to
    a ledger or a state, and every file's schema must be its contract (``PlanError``,
    ``ChecksumMismatch``, ``CorruptEventFile``, ``RunConfinementError`` or ``SchemaError``
    naming the file). The views read the checked files through Arrow datasets; DuckDB itself
    gets no file access (``enable_external_access=false``, nothing allowed), installs and
    loads no extension, spills only into a private temp folder removed with the connection,
    and its configuration is locked. Run statements through :func:`run_query`.

    Args:
        run_dir: the run's output directory (holds ``hsm/``).
        skip_corrupt: leave damaged event parts out of the event views (with a warning)
            instead of refusing the run.
        timeout_s: each query's time limit (DuckDB's ``max_execution_time``); None: none.
        memory_limit: DuckDB's ``memory_limit`` (e.g. ``4GB`` or ``50%`` of RAM).
    """
    run_dir = Path(run_dir)
    root = RunPaths.of(run_dir).root
    _check_links(run_dir)
    plan_files, manifests = _verified_plans(root)
    state_files = _state_files(root)
    # DuckDB does not verify Parquet page checksums: check the bytes first
    part_files = sorted(verify_event_log(root, skip_corrupt=skip_corrupt))
    _check_known_epochs(root, part_files)
    verify_sample_ids(root)
    id_files = sorted(root.glob("sample_ids/epoch=*/sample_ids.parquet"))
    for files, schema in ((part_files, EVENT_SCHEMA), (id_files, SAMPLE_ID_SCHEMA),
                          (state_files, STATE_SCHEMA), (plan_files, PLAN_SCHEMA)):
        _check_schemas(files, schema)
    temp_dir = tempfile.mkdtemp(prefix="hsm-sql-")
    try:
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                     "temp_directory": temp_dir})
        weakref.finalize(con, shutil.rmtree, temp_dir, ignore_errors=True)  # with the connection
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    con.register("_event_files", _dataset(part_files, EVENT_SCHEMA))
    con.register("_sample_id_files", _dataset(id_files, SAMPLE_ID_SCHEMA, epoch_from=RunPaths.at(root).sample_ids_root))
    con.register("_state_files", _dataset(state_files, STATE_SCHEMA, epoch_from=RunPaths.at(root).state_root))
    con.register("_plan_files", _dataset(plan_files, PLAN_SCHEMA, epoch_from=RunPaths.at(root).plans_root))
    con.register("_manifests", _manifest_table(manifests, root))
    con.execute("CREATE VIEW events_raw AS SELECT * FROM _event_files")
    # Per (epoch, global_step, rank) the rows of the highest attempt. Written as a semi join (DuckDB's
    # own rewrite of QUALIFY attempt = max(attempt) OVER (...) for files): over an Arrow scan, whose
    # size DuckDB cannot estimate, the window it would keep takes 2-3x longer.
    con.execute(
        "CREATE VIEW _counted AS SELECT * FROM events_raw AS r SEMI JOIN ("
        "SELECT epoch, global_step, rank, max(attempt) AS attempt FROM events_raw GROUP BY ALL) AS m "
        "ON r.epoch = m.epoch AND r.global_step = m.global_step AND r.rank = m.rank AND r.attempt = m.attempt"
    )
    # det_f1 measurement rows are not training draws: kept apart, so draw counts and mean losses hold draws only.
    con.execute(f"CREATE VIEW events AS SELECT * FROM _counted WHERE position < {MEASUREMENT_POSITION}")
    con.execute(f"CREATE VIEW measurements AS SELECT * FROM _counted WHERE position >= {MEASUREMENT_POSITION}")
    # A refold may list a sample again in a later epoch's part until that epoch is refolded: first one wins.
    con.execute(
        "CREATE VIEW sample_ids AS SELECT dataset, base_idx, sample_id, epoch AS first_epoch FROM _sample_id_files "
        "QUALIFY row_number() OVER (PARTITION BY dataset, base_idx ORDER BY epoch) = 1"
    )
    for view in ("state", "plans"):
        # The files are keyed by (dataset, base_idx); users see sample_id first.
        con.execute(
            f"CREATE VIEW {view} AS SELECT i.sample_id, f.* FROM _{view[:-1] if view == 'plans' else view}_files AS f "
            f"LEFT JOIN sample_ids AS i ON i.dataset = f.dataset AND i.base_idx = f.base_idx"
        )
    con.execute("CREATE VIEW manifests AS SELECT * FROM _manifests")
    # The events in the latest plan's metric (loss before any plan), as the planner reads it.
    latest_metric = "(SELECT coalesce((SELECT metric FROM manifests ORDER BY epoch DESC LIMIT 1), 'loss'))"
    con.execute(f"CREATE VIEW event_values AS SELECT *, {latest_metric} AS metric, "
                f"{sql_difficulty(latest_metric)} AS value FROM _counted")
    _confine(con, timeout_s=timeout_s, memory_limit=memory_limit)
    return con


def _confine(con: duckdb.DuckDBPyConnection, *, timeout_s: float | None, memory_limit: str) -> None:
    """No file access from now on (the views read through Arrow), the limits set, and no setting can be changed back."""
    con.execute("SET enable_external_access = false")
    con.execute(f"SET max_execution_time = {0 if timeout_s is None else max(1, round(timeout_s * 1000))}")
    con.execute("SET memory_limit = ?", [memory_limit])
    con.execute("SET lock_configuration = true")
