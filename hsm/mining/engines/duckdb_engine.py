"""DuckDB implementation of the epoch fold; the SQL lives in ``sql/planner/fold_epoch.sql``."""

from __future__ import annotations

from importlib import resources

import duckdb
import numpy as np
import pyarrow as pa

from hsm.mining.engines.kernels import output_columns
from hsm.mining.state import EPOCH_COLUMNS, FOLD_COLUMNS

__all__ = ["fold_epoch", "planner_sql"]

_EMPTY_STATE = pa.schema([("key", pa.int64()), ("n_obs", pa.int64()), ("mean", pa.float64()), ("ema", pa.float64()),
                          ("last", pa.float64()), ("last_epoch", pa.int32())])
_EMPTY_EPOCHS = pa.schema([("key", pa.int64()), ("n_epochs", pa.int32()), ("epoch_mean", pa.float64()),
                           ("epoch_ema", pa.float64())])


def planner_sql(name: str) -> str:
    """Text of ``sql/planner/<name>.sql`` from the installed package."""
    return resources.files("hsm.sql").joinpath("planner", f"{name}.sql").read_text(encoding="utf-8")


def fold_epoch(
    state: pa.Table | None,
    events: pa.Table,
    *,
    epoch: int,
    ema_decay: float,
    per_epoch: bool = False,
    memory_limit: str | None = None,
    temp_directory: str | None = None,
) -> pa.Table:
    """Same contract as :func:`hsm.mining.engines.polars_engine.fold_epoch`.

    ``memory_limit`` (e.g. ``"2GB"``) and ``temp_directory`` let DuckDB spill to disk.
    """
    con = duckdb.connect()
    try:
        con.execute("SET threads TO 2")
        con.execute("SET preserve_insertion_order = false")
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        if temp_directory:
            con.execute(f"SET temp_directory = '{temp_directory}'")
        con.register("events", events.append_column("row", pa.array(np.arange(events.num_rows, dtype=np.int64))))
        con.register("state", state.select(list(FOLD_COLUMNS)) if state is not None else _EMPTY_STATE.empty_table())
        epochs = state is not None and per_epoch
        con.register("state_epochs", state.select(["key", *EPOCH_COLUMNS]) if epochs else _EMPTY_EPOCHS.empty_table())
        result = con.sql(planner_sql("fold_epoch"), params={"decay": float(ema_decay), "epoch": int(epoch)}).to_arrow_table()
    finally:
        con.close()
    return result.select(list(output_columns(per_epoch))).combine_chunks()
