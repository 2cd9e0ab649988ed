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

from hsm.schemas import EVENT_SCHEMA, PLAN_SCHEMA, SAMPLE_ID_SCHEMA, STATE_SCHEMA

__all__ = ["shipped_queries", "query_text", "connect"]


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


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _has(pattern_root: Path, pattern: str) -> bool:
    return any(pattern_root.glob(pattern))


def connect(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with hsm's views over ``<run_dir>/hsm``.

    - ``events_raw``: every logged event, all attempts.
    - ``events``: the events that count: per ``(epoch, global_step, rank)`` the highest attempt.
    - ``sample_ids``: the id table, ``(dataset, base_idx, sample_id, first_epoch)``.
    - ``state``: every state snapshot, with ``epoch`` = the epoch it was folded after,
      and ``sample_id`` joined from ``sample_ids`` (the files hold only the keys).
    - ``plans``: every plan, with ``epoch`` = the epoch it is for, and ``sample_id`` joined.
    - ``manifests``: the plan manifests.
    Views over missing files are empty, with the right columns.
    """
    root = Path(run_dir) / "hsm"
    con = duckdb.connect()
    part_glob = "events/epoch=*/rank=*/part-*.parquet"
    if _has(root, part_glob):
        con.execute(f"CREATE VIEW events_raw AS SELECT * FROM read_parquet({_quote(root / part_glob)}, hive_partitioning = false)")
    else:
        con.register("events_raw", EVENT_SCHEMA.empty_table())
    con.execute(
        "CREATE VIEW events AS SELECT * FROM events_raw "
        "QUALIFY attempt = max(attempt) OVER (PARTITION BY epoch, global_step, rank)"
    )
    ids_pattern = "sample_ids/epoch=*/sample_ids.parquet"
    if _has(root, ids_pattern):
        # A refold may list a sample again in a later epoch's part until that epoch is refolded: first one wins.
        con.execute(
            f"CREATE VIEW sample_ids AS SELECT dataset, base_idx, sample_id, CAST(epoch AS INTEGER) AS first_epoch "
            f"FROM read_parquet({_quote(root / ids_pattern)}, hive_partitioning = true) "
            f"QUALIFY row_number() OVER (PARTITION BY dataset, base_idx ORDER BY epoch) = 1"
        )
    else:
        con.register("sample_ids", SAMPLE_ID_SCHEMA.append(pa.field("first_epoch", pa.int32())).empty_table())
    for view, pattern, schema in (
        ("state", "state/epoch=*/state.parquet", STATE_SCHEMA),
        ("plans", "plans/epoch=*/plan.parquet", PLAN_SCHEMA),
    ):
        if _has(root, pattern):
            # The files are keyed by (dataset, base_idx); users see sample_id first, as before.
            con.execute(
                f"CREATE VIEW {view} AS SELECT i.sample_id, f.* REPLACE (CAST(f.epoch AS INTEGER) AS epoch) "
                f"FROM read_parquet({_quote(root / pattern)}, hive_partitioning = true) AS f "
                f"LEFT JOIN sample_ids AS i ON i.dataset = f.dataset AND i.base_idx = f.base_idx"
            )
        else:
            fields = [pa.field("sample_id", pa.string()), *schema, pa.field("epoch", pa.int32())]
            con.register(view, pa.schema(fields).empty_table())
    if _has(root, "plans/epoch=*/manifest.json"):
        con.execute(
            f"CREATE VIEW manifests AS SELECT * FROM read_json_auto({_quote(root / 'plans/epoch=*/manifest.json')})"
        )
    else:
        con.execute(
            "CREATE VIEW manifests AS SELECT * FROM (SELECT NULL::INTEGER AS epoch, NULL::VARCHAR AS mode, "
            "NULL::VARCHAR AS metric, NULL::BOOLEAN AS triggered, NULL::VARCHAR AS trigger_reason, "
            "{'eligible': 0, 'hard': 0, 'regular_drawn': 0} AS counts, {'min': 0.0, 'max': 0.0} AS weights, "
            "NULL::VARCHAR AS checksum, NULL::VARCHAR AS engine) WHERE false"
        )
    return con
