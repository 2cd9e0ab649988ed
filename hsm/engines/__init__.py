"""Planner engines: interchangeable implementations of :func:`fold_epoch`.

Every engine is a function with the signature of
:func:`hsm.engines.polars_engine.fold_epoch`; they compute the rules documented
in :mod:`hsm.state` with the same operations in the same order, so their states
agree bit for bit. ``ENGINES`` maps the config's ``engine`` value to the function.
"""

from __future__ import annotations

from hsm.engines.duckdb_engine import fold_epoch as fold_epoch_duckdb
from hsm.engines.polars_engine import fold_epoch as fold_epoch_polars

__all__ = ["ENGINES", "fold_epoch_duckdb", "fold_epoch_polars"]

ENGINES = {"polars": fold_epoch_polars, "duckdb": fold_epoch_duckdb}
