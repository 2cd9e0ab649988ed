"""Arrow schemas of the three on-disk artefacts: events, state and plans.

The column names and types are a public contract (docs/design.md §7; state and plans
carry no ``sample_id``: the ``hsm sql`` views join it from the id table): users query
these files with DuckDB and Polars. Writers cast to these schemas; readers check
against them with :func:`check_schema`, which names the file and the column.
"""

from __future__ import annotations

import pyarrow as pa

from hsm.metrics import NULLABLE_EVENT_COLUMNS

__all__ = [
    "EVENT_SCHEMA",
    "STATE_SCHEMA",
    "PLAN_SCHEMA",
    "SAMPLE_ID_SCHEMA",
    "SchemaError",
    "check_schema",
    "conform",
]

EVENT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("global_step", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("base_idx", pa.int64(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("loss", pa.float32(), nullable=False),
        pa.field("token_acc", pa.float32(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("aug_seed", pa.int64(), nullable=False),
        pa.field("drawn_as_hard", pa.bool_(), nullable=False),
        # Box-aware difficulty. Nullable columns are optional:
        # logs written before them still read, with nulls. Null also means the
        # sample had no such tokens (e.g. an empty answer has no coordinates).
        # coord_loss, label_loss, loss_sum, det_f1: hsm.metrics.
        *(pa.field(name, pa.float32(), nullable=True) for name in NULLABLE_EVENT_COLUMNS),
    ]
)

# Keyed by (dataset, base_idx); the sample_id strings live once in the append-only
# id table (SAMPLE_ID_SCHEMA), not in every epoch's state and plan.
STATE_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("base_idx", pa.int64(), nullable=False),
        pa.field("n_obs", pa.int64(), nullable=False),
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("ema", pa.float64(), nullable=False),
        pa.field("last", pa.float64(), nullable=False),
        pa.field("last_epoch", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        # Per-epoch aggregates; null unless aggregate is epoch_ema or last.
        pa.field("n_epochs", pa.int32(), nullable=True),
        pa.field("epoch_mean", pa.float64(), nullable=True),
        pa.field("epoch_ema", pa.float64(), nullable=True),
    ]
)

SAMPLE_ID_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("base_idx", pa.int64(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
    ]
)

PLAN_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("base_idx", pa.int64(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("n_obs", pa.int64(), nullable=False),
        pa.field("is_hard", pa.bool_(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),
    ]
)


class SchemaError(ValueError):
    """A table does not have the columns or types of its contract."""


def check_schema(table_schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise :class:`SchemaError` naming ``where`` if a column is missing or mistyped.

    Extra columns are allowed (forward compatibility); a missing nullable column
    is allowed too (it was added to the contract later, and :func:`conform`
    fills it with nulls). Nullability itself is not checked here because Parquet
    readers may relax it.
    """
    problems = []
    for field in expected:
        idx = table_schema.get_field_index(field.name)
        if idx < 0 and field.nullable:
            continue
        if idx < 0:
            problems.append(f"missing column '{field.name}' ({field.type})")
            continue
        actual = table_schema.field(idx).type
        if actual != field.type and not (
            pa.types.is_dictionary(actual) and actual.value_type == field.type
        ):
            problems.append(f"column '{field.name}' is {actual}, expected {field.type}")
    if problems:
        raise SchemaError(f"{where}: " + "; ".join(problems))


def conform(table: pa.Table, expected: pa.Schema, where: str, *, keep_dictionary: bool = False) -> pa.Table:
    """Check ``table`` against ``expected`` and return it cast to that schema.

    Columns are reordered to the contract and extra columns dropped; dictionary
    encoded strings are decoded unless ``keep_dictionary`` (readers keep them,
    which saves decoding repeated names). A missing nullable column becomes nulls;
    only non-nullable columns must be free of nulls.
    """
    check_schema(table.schema, expected, where)
    columns = []
    for field in expected:
        if field.nullable and table.schema.get_field_index(field.name) < 0:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if keep_dictionary and pa.types.is_dictionary(column.type) and column.type.value_type == field.type:
            pass
        elif column.type != field.type:
            column = column.cast(field.type)
        if column.null_count and not field.nullable:
            raise SchemaError(f"{where}: column '{field.name}' has {column.null_count} nulls")
        columns.append(column)
    return pa.Table.from_arrays(columns, names=expected.names)
