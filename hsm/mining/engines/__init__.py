"""Planner engines: interchangeable implementations of :func:`fold_epoch`.

Every engine is a function with the signature of
:func:`hsm.mining.engines.polars_engine.fold_epoch`, over keyed Arrow tables (no strings);
they compute the rules documented in :mod:`hsm.mining.state` with the same operations in
the same order, so their states agree bit for bit. The Polars and numpy engines differ only
in how they order and group the events; both finish with the one kernel
:func:`hsm.mining.engines.kernels.finish_fold`. The DuckDB engine is SQL
(``sql/planner/fold_epoch.sql``). ``ENGINES`` maps the config's ``engine`` value to the
function; each engine's library is imported on first use only.
"""

from __future__ import annotations

__all__ = ["ENGINES", "fold_epoch_duckdb", "fold_epoch_numpy", "fold_epoch_polars"]


def fold_epoch_polars(*args, **kwargs):
    """:func:`hsm.mining.engines.polars_engine.fold_epoch`."""
    from hsm.mining.engines.polars_engine import fold_epoch

    return fold_epoch(*args, **kwargs)


def fold_epoch_duckdb(*args, **kwargs):
    """:func:`hsm.mining.engines.duckdb_engine.fold_epoch`."""
    from hsm.mining.engines.duckdb_engine import fold_epoch

    return fold_epoch(*args, **kwargs)


def fold_epoch_numpy(*args, **kwargs):
    """:func:`hsm.mining.engines.numpy_engine.fold_epoch` (whole-array numpy, no sort of the events)."""
    from hsm.mining.engines.numpy_engine import fold_epoch

    return fold_epoch(*args, **kwargs)


ENGINES = {"polars": fold_epoch_polars, "duckdb": fold_epoch_duckdb, "numpy": fold_epoch_numpy}
