"""The difficulty metrics hsm can mine on: one table, read by the config, the event schema and the planner.

Adding a metric is one row of :data:`METRICS` (and whatever writes its event column):
``custom.hard_sample_mining.metric`` accepts its name, the event schema gains its column
(nullable when the metric is), and the planner reads that column and turns it into a
difficulty with the row's transform. Higher difficulty is harder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Metric", "METRICS", "METRIC_NAMES", "NULLABLE_EVENT_COLUMNS", "metric", "difficulty", "sql_difficulty"]


@dataclass(frozen=True)
class Metric:
    """One difficulty signal.

    Attributes:
        name: the value of ``custom.hard_sample_mining.metric``.
        column: the float event column it reads.
        flip: difficulty is ``1 - value`` (an accuracy or F1); otherwise the value itself (a loss).
        nullable: the column may be null, and a null is not an observation of the metric.
        source: ``train`` (per-sample statistics of the training step) or ``generation``
            (greedy answers on the target train set, :mod:`hsm.eval.train_quality`).
        doc: one line for the config's description.
    """

    name: str
    column: str
    flip: bool
    nullable: bool
    source: str
    doc: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("loss", "loss", False, False, "train", "mean token loss"),
    Metric("token_acc", "token_acc", True, False, "train", "1 - argmax token accuracy"),
    Metric("coord_loss", "coord_loss", False, True, "train", "mean loss over box-coordinate tokens"),
    Metric("label_loss", "label_loss", False, True, "train", "mean loss over label tokens"),
    Metric("loss_sum", "loss_sum", False, True, "train", "summed loss over answer tokens (grows with the answer)"),
    Metric("det_f1", "det_f1", True, True, "generation",
           "1 - detection F1 at IoU 0.5 of the model's own greedy answer on the train image"),
)}
METRIC_NAMES = tuple(METRICS)
# The optional event columns, in schema order (older logs read with nulls there).
NULLABLE_EVENT_COLUMNS = tuple(m.column for m in METRICS.values() if m.nullable)


def metric(name: str) -> Metric:
    """The registry row of ``name``.

    Args:
        name: a metric name.

    Raises:
        ValueError: naming the accepted metrics.
    """
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"metric: {name!r} is not one of {', '.join(METRIC_NAMES)}") from None


def difficulty(name: str, values: np.ndarray) -> np.ndarray:
    """Difficulty (higher is harder) as float64 from the metric's column values.

    Args:
        name: a metric name.
        values: the column's values (nulls already dropped).
    """
    out = np.asarray(values, dtype=np.float64)
    out = 1.0 - out if metric(name).flip else out.copy()
    out += 0.0  # -0.0 becomes 0.0: a fold may sum a single value onto 0.0
    return out


def sql_difficulty(name_sql: str) -> str:
    """A SQL expression: each event row's difficulty in the metric that ``name_sql`` names.

    What :func:`difficulty` computes, as a ``CASE`` over :data:`METRICS` (``hsm sql``'s
    ``event_values`` view uses it, so the shipped queries follow the registry). NULL where
    the row did not observe the metric, or for a name the registry does not know.

    Args:
        name_sql: a SQL expression giving a metric name (e.g. the latest manifest's ``metric``).
    """
    cases = " ".join(f"WHEN '{m.name}' THEN {'1.0 - ' if m.flip else ''}CAST({m.column} AS DOUBLE)"
                     for m in METRICS.values())
    return f"CASE {name_sql} {cases} END"
