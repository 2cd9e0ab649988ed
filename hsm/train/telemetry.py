"""What a training logs per epoch besides the loss: fusion counts per dataset and the mining scalars.

Both are logged through the Trainer's own ``log`` (TensorBoard / W&B), under the mining
config's ``log_prefix``.
"""

from __future__ import annotations

import numpy as np

from hsm.data.meta import TELEMETRY, HsmMeta
from hsm.train import distributed

__all__ = ["FusionCounts", "epoch_telemetry"]


class FusionCounts:
    """Per-dataset sums of the epoch's training items: items and each :data:`hsm.data.meta.TELEMETRY` field.

    Args:
        names: the datasets, target first (the order of the logged table).
    """

    def __init__(self, names: list[str]):
        self.names = names
        self._rows: dict[str, np.ndarray] = {}

    def count(self, meta: HsmMeta) -> None:
        """Add one training batch."""
        for i, name in enumerate(meta.dataset):
            row = self._rows.setdefault(name, np.zeros(len(TELEMETRY) + 1))
            row[0] += 1
            for j, key in enumerate(TELEMETRY, start=1):
                row[j] += float(getattr(meta, key)[i])

    def collect(self, epoch_size: int) -> dict[str, float]:
        """The epoch's aggregates, summed over ranks (collective); resets the counts.

        ``oversize`` counts images larger than the processor's ``image_max_pixels`` (the
        processor shrinks them; images over ``max_image_side`` never train, they raise).
        """
        table = np.stack([self._rows.get(n, np.zeros(len(TELEMETRY) + 1)) for n in self.names])
        table = distributed.all_reduce_sum(table)
        self._rows = {}
        out = {"fusion/epoch_size": float(epoch_size)}
        for name, row in zip(self.names, table):
            items = max(row[0], 1.0)
            out[f"fusion/{name}/items"] = row[0]
            out[f"fusion/{name}/augmented_frac"] = row[1] / items
            out[f"fusion/{name}/object_capped"] = row[2]
            out[f"fusion/{name}/oversize"] = row[3]
            out[f"fusion/{name}/aug_dropped_boxes"] = row[4]
            out[f"fusion/{name}/input_len_mean"] = row[5] / items
            out[f"fusion/{name}/drawn_as_hard"] = row[6]
        return out


def epoch_telemetry(result, events, target: str, sampler, epoch: int) -> dict[str, float]:
    """Mining scalars for the epoch that just ended and the plan just built (rank 0).

    ``seen_hard``/``seen_regular`` count the epoch's target events drawn as hard or
    not, ``hard_hit_rate`` is the hard share of them, and ``hard_pool_coverage`` the
    share of the applied plan's hard samples drawn at least once.

    Args:
        result: the :class:`hsm.mining.planner.PlanResult` of the plan for the next epoch.
        events: the epoch's events (an Arrow table).
        target: the target dataset's name.
        sampler: the :class:`hsm.data.sampler.HsmSampler` (the plan it applied, its schedule).
        epoch: the epoch that ended.
    """
    import pyarrow.compute as pc

    target_rows = events.filter(pc.equal(events.column("dataset"), target))
    target_rows = target_rows.filter(pc.is_finite(target_rows.column("loss")))  # draws only: det_f1 rows carry NaN
    acc = target_rows.column("token_acc").to_numpy()
    hard = target_rows.column("drawn_as_hard").to_numpy(zero_copy_only=False)
    used = sampler.plan
    manifest = result.manifest
    selector = (manifest.get("selector") or {}).get("mode") or manifest["mode"]
    logs: dict[str, float] = {
        "epoch": epoch,
        "triggered": float(manifest["triggered"]),
        "num_hard": manifest["counts"]["hard"],
        "nonfinite": float(manifest["counts"].get("nonfinite", 0)),  # NaN/inf metric values: not observations
        "no_signal": float(bool(manifest.get("no_signal"))),
        "hard_pool_size": manifest["counts"]["hard"],
        "top_loss_mean": manifest["scores"]["hard"]["mean"] or 0.0,
        "weights/max": manifest["weights"]["max"] or 0.0,
        "weights/min": manifest["weights"]["min"] or 0.0,
        f"mode/{manifest['mode']}": 1.0,
        f"selector/{selector}": 1.0,
        "epoch_size": float(sampler.epoch_length),
        "target_draws": float(len(hard)),
        "seen_hard": float(hard.sum()),
        "seen_regular": float((~hard).sum()),
        "hard_hit_rate": float(hard.mean()) if len(hard) else 0.0,
        "shortfall": float(sampler.schedule.shortfall),
    }
    if manifest.get("suspects") is not None:  # exclude_suspects: logged as hsm/suspects
        logs["suspects"] = float(manifest["suspects"]["count"])
    if used is not None and used.triggered and used.is_hard.any():
        pool = set(used.hard_idx.tolist())
        seen = set(target_rows.filter(pc.field("drawn_as_hard")).column("base_idx").to_pylist())
        logs["hard_pool_coverage"] = len(pool & seen) / len(pool)
    else:
        logs["hard_pool_coverage"] = 0.0
    for name, values in (("hard", acc[hard]), ("regular", acc[~hard])):
        logs[f"train_acc_{name}_mean"] = float(values.mean()) if len(values) else 0.0
        logs[f"train_acc_{name}_p90"] = float(np.quantile(values, 0.9)) if len(values) else 0.0
    return logs
