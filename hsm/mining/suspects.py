"""Dataset Cartography over the event log: the data map and its label-noise suspects.

Per target sample ``i`` with per-epoch metric means ``x[i, e]`` (the mean of that
epoch's observations of ``loss`` or ``1 - token_acc``; higher is harder) over the
epochs ``E_i`` in which it was drawn:

    mean[i]        = mean over e in E_i of x[i, e]
    variability[i] = population std over e in E_i of x[i, e]

A sample is *mapped* when ``|E_i| >= min_epochs``. Over the mapped samples
(``q`` is numpy's linear quantile, DuckDB's ``quantile_cont``):

    region = "ambiguous" if variability > q(variability, 2/3)
             "hard"      elif mean >= q(mean, 2/3)
             "easy"      elif mean <= q(mean, 1/3)
             "medium"    otherwise

A *label-noise suspect* is a mapped sample that is persistently hard with low
variability, Cartography's hard-to-learn corner: in the top ``top_frac`` by mean and
``variability <= q(variability, 1/2)``. "In the top" counts samples, so a tie cannot
flood the list: a sample is in it when the mapped samples with a mean ``>=`` its own
number at most ``ceil(top_frac * n_mapped)`` (for distinct means the same samples as
``mean >= q(mean, 1 - top_frac)``; a group tied across that count is left out whole,
and when every mean is equal, the metric carries no signal and nobody is a suspect). While the model
learns, the metric of a learnable sample falls, so it moves (variability); a
wrongly labelled sample stays high and moves little.

``x`` is in the plan's metric and its units (``metric`` in the manifest), as the registry
(:mod:`hsm.metrics`) defines it: ``1 - token_acc`` for ``token_acc``, ``1 - det_f1`` for
``det_f1``, else the metric's own column; a null, NaN or infinite value is not an observation. This module is the definition;
``sql/suspects.sql`` (``hsm sql suspects``) computes the same list in DuckDB from the
latest manifest's metric, and tests hold both to a naive loop and to each other. Pure functions over numpy/Arrow; :func:`read_epoch_metrics` is the
only one that touches files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hsm.metrics import metric as metric_row
from hsm.mining.select import ceil_share

__all__ = [
    "MIN_EPOCHS",
    "TOP_FRAC",
    "REGIONS",
    "DataMap",
    "epoch_metrics",
    "read_epoch_metrics",
    "data_map",
    "metric_label",
]

MIN_EPOCHS = 3
TOP_FRAC = 0.1
REGIONS = ("easy", "medium", "hard", "ambiguous")
_METRIC_COLUMNS = ("attempt", "epoch", "global_step", "rank", "dataset", "base_idx", "sample_id", "loss", "token_acc")


@dataclass(frozen=True)
class DataMap:
    """Per target sample (sorted by ``base_idx``): the data map coordinates and the verdicts."""

    base_idx: np.ndarray  # int64
    sample_id: list[str]
    n_epochs: np.ndarray  # int64, epochs in which the sample was drawn
    mean: np.ndarray  # float64
    variability: np.ndarray  # float64
    region: list[str | None]  # None when not mapped (fewer than min_epochs epochs)
    is_suspect: np.ndarray  # bool
    thresholds: dict[str, float | None]

    def to_table(self) -> pa.Table:
        return pa.table({
            "base_idx": pa.array(self.base_idx, pa.int64()),
            "sample_id": pa.array(self.sample_id, pa.string()),
            "n_epochs": pa.array(self.n_epochs, pa.int64()),
            "mean": pa.array(self.mean, pa.float64()),
            "variability": pa.array(self.variability, pa.float64()),
            "region": pa.array(self.region, pa.string()),
            "is_suspect": pa.array(self.is_suspect, pa.bool_()),
        })


def epoch_metrics(events: pa.Table, target: str, metric: str) -> pa.Table:
    """Per ``(base_idx, epoch)`` of the target: the mean metric of that epoch's observations.

    ``events`` must already be de-duplicated by attempt. Returns columns
    ``base_idx, sample_id, epoch, value`` sorted by ``(base_idx, epoch)``;
    ``value`` is the registry's difficulty (``1 - token_acc`` for ``token_acc``, ``1 - det_f1``
    for ``det_f1``, else the metric's own column); a null, NaN or infinite value is not an observation.
    """
    row = metric_row(metric)  # ValueError naming the registry's metrics
    rows = events.filter(pc.equal(events.column("dataset").cast(pa.string()), target))
    rows = rows.filter(pc.is_valid(rows.column(row.column)))
    finite = pc.is_finite(rows.column(row.column))
    if not pc.all(finite).as_py():  # NaN or infinite: not an observation
        rows = rows.filter(finite)
    value = rows.column(row.column).cast(pa.float64())
    if row.flip:
        value = pc.subtract(1.0, value)
    table = pa.table({
        "base_idx": rows.column("base_idx"), "sample_id": rows.column("sample_id").cast(pa.string()),
        "epoch": rows.column("epoch"), "value": value,
    })
    grouped = table.group_by(["base_idx", "epoch"], use_threads=False).aggregate(
        [("value", "mean"), ("sample_id", "min")]
    )
    grouped = grouped.rename_columns({"value_mean": "value", "sample_id_min": "sample_id"})
    grouped = grouped.select(["base_idx", "sample_id", "epoch", "value"])
    return grouped.sort_by([("base_idx", "ascending"), ("epoch", "ascending")])


def read_epoch_metrics(hsm_dir: str | Path, epochs: range | list[int], target: str, metric: str,
                       *, skip_corrupt: bool = False) -> pa.Table:
    """:func:`epoch_metrics` over the events of ``epochs`` read from ``<hsm_dir>/events``.

    Args:
        hsm_dir: the run's ``hsm`` directory.
        epochs: the epochs to read.
        target: the mined dataset's name.
        metric: the difficulty metric (``hsm.metrics``).
        skip_corrupt: skip damaged event parts with a warning.
    """
    from hsm.mining.event_reader import read_epoch_events

    parts = []
    for epoch in epochs:
        column = metric_row(metric).column
        columns = _METRIC_COLUMNS if column in _METRIC_COLUMNS else (*_METRIC_COLUMNS, column)
        events = read_epoch_events(hsm_dir, epoch, skip_corrupt=skip_corrupt, columns=columns).table
        if events.num_rows:
            parts.append(epoch_metrics(events, target, metric))
    if not parts:
        return pa.table({"base_idx": pa.array([], pa.int64()), "sample_id": pa.array([], pa.string()),
                         "epoch": pa.array([], pa.int32()), "value": pa.array([], pa.float64())})
    return pa.concat_tables(parts).sort_by([("base_idx", "ascending"), ("epoch", "ascending")])


def metric_label(metric: str) -> str:
    """What the per-epoch value ``x`` of ``metric`` is, for axes and captions: ``1 - token_acc``
    for ``token_acc`` (``1 - column`` for every flipped metric of the registry), else the metric's
    own name (``loss_sum`` is a sum over tokens, not a mean).

    Args:
        metric: the plan's metric.
    """
    row = metric_row(metric)
    return f"1 - {row.column}" if row.flip else metric


def data_map(per_epoch: pa.Table, *, min_epochs: int = MIN_EPOCHS, top_frac: float = TOP_FRAC) -> DataMap:
    """The data map and the suspects from :func:`epoch_metrics` rows (see the module docstring).

    Naive equivalent, per sample ``i``: ``xs = [x for (j, e, x) in rows if j == i]``;
    ``mean = statistics.fmean(xs)``; ``variability = statistics.pstdev(xs)``; then the
    quantile and count rules of the module docstring.

    Args:
        per_epoch: :func:`epoch_metrics` rows ``(base_idx, sample_id, epoch, x)``.
        min_epochs: epochs a sample needs to be a suspect.
        top_frac: the share of samples on each extreme the rules look at.
    """
    base_idx = per_epoch.column("base_idx").to_numpy()
    epoch = per_epoch.column("epoch").to_numpy().astype(np.int64)
    value = per_epoch.column("value").to_numpy().astype(np.float64)
    ids = per_epoch.column("sample_id").to_pylist()
    if len(base_idx) == 0:
        empty = np.zeros(0)
        return DataMap(np.zeros(0, np.int64), [], np.zeros(0, np.int64), empty, empty, [], np.zeros(0, bool),
                       {"mean_low": None, "mean_high": None, "variability_high": None, "variability_median": None,
                        "mean_top": None})
    order = np.lexsort((epoch, base_idx))
    base_idx, epoch, value = base_idx[order], epoch[order], value[order]
    ids = [ids[k] for k in order]
    samples, first, inverse, counts = np.unique(base_idx, return_index=True, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=value, minlength=len(samples))
    mean = sums / counts
    variability = np.sqrt(np.maximum(np.bincount(inverse, weights=(value - mean[inverse]) ** 2) / counts, 0.0))
    mapped = counts >= min_epochs
    region: list[str | None] = [None] * len(samples)
    is_suspect = np.zeros(len(samples), dtype=bool)
    thresholds: dict[str, float | None] = {"mean_low": None, "mean_high": None, "variability_high": None,
                                           "variability_median": None, "mean_top": None}
    if mapped.any():
        m, v = mean[mapped], variability[mapped]
        low, high = float(np.quantile(m, 1 / 3)), float(np.quantile(m, 2 / 3))
        v_high, v_median = float(np.quantile(v, 2 / 3)), float(np.quantile(v, 0.5))
        top = float(np.quantile(m, 1.0 - top_frac))
        thresholds = {"mean_low": low, "mean_high": high, "variability_high": v_high, "variability_median": v_median,
                      "mean_top": top}
        for k in np.flatnonzero(mapped):
            if variability[k] > v_high:
                region[k] = "ambiguous"
            elif mean[k] >= high:
                region[k] = "hard"
            elif mean[k] <= low:
                region[k] = "easy"
            else:
                region[k] = "medium"
        # Mapped samples with a mean >= each one's; the top holds those within the count.
        at_least = np.zeros(len(samples), dtype=np.int64)
        at_least[mapped] = len(m) - np.searchsorted(np.sort(m), m, side="left")
        in_top = mapped & (at_least <= ceil_share(top_frac, len(m)))
        is_suspect = in_top & (variability <= v_median)
    return DataMap(samples.astype(np.int64), [ids[k] for k in first], counts.astype(np.int64), mean, variability,
                   region, is_suspect, thresholds)
