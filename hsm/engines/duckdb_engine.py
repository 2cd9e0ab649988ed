"""DuckDB implementation of the epoch fold; the SQL lives in ``sql/planner/fold_epoch.sql``."""

from __future__ import annotations

from importlib import resources

import duckdb
import pyarrow as pa

from hsm.schemas import STATE_SCHEMA, decode_dictionaries

__all__ = ["fold_epoch", "planner_sql"]


def planner_sql(name: str) -> str:
    """Text of ``sql/planner/<name>.sql`` from the installed package."""
    return resources.files("hsm.sql").joinpath("planner", f"{name}.sql").read_text(encoding="utf-8")


def fold_epoch(
    state: pa.Table | None,
    events: pa.Table,
    *,
    epoch: int,
    metric: str,
    ema_decay: float,
    aggregate: str,
) -> pa.Table:
    """Same contract as :func:`hsm.engines.polars_engine.fold_epoch`."""
    if metric not in ("loss", "token_acc"):
        raise ValueError(f"metric must be 'loss' or 'token_acc', got {metric!r}")
    con = duckdb.connect()
    try:
        con.execute("SET threads TO 2")
        con.register("events", decode_dictionaries(events))
        con.register("state", decode_dictionaries(state) if state is not None else STATE_SCHEMA.empty_table())
        params = {"decay": float(ema_decay), "epoch": int(epoch), "metric": metric, "use_ema": aggregate == "ema"}
        result = con.sql(planner_sql("fold_epoch"), params=params).to_arrow_table()
    finally:
        con.close()
    return result.cast(STATE_SCHEMA)
