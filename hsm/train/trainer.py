"""Trainer integration: the mixin, the mining callback and the trainer factory.

:class:`HsmTrainerMixin` composes with any ``transformers.Trainer`` subclass. It
plugs its loss in through the Trainer's own ``compute_loss_func`` hook, so the
Trainer keeps applying its own gradient-accumulation and cross-device token
averaging to it: the training loss is the one the plain Trainer computes, and the
per-sample statistics come from the same cross-entropy pass.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from hsm.train import distributed
from hsm.config import FusionConfig, MiningConfig
from hsm.mining.event_writer import EventWriter
from hsm.data.fusion import FusionDataset
from hsm.io import file_sha256, write_recorded
from hsm.mining.plan import plan_dir, publish_plan, stage_plan_bytes
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.data.sampler import HsmSampler
from hsm.train.stats import STAT_ROWS, causal_lm_loss, per_sample_stats
from hsm.layout import RunPaths

__all__ = [
    "HsmTrainerMixin",
    "MiningCallback",
    "SamplerEpochCallback",
    "make_trainer_class",
    "FusionSamplerMixin",
    "resume_attempt",
    "write_dataset_info",
]

_FLUSH_EVERY_STEPS = 32
_TELEMETRY = ("augmented", "object_capped", "oversize", "aug_dropped", "input_len", "drawn_as_hard")


class FusionSamplerMixin:
    """Trains on the fusion schedule; the only change when mining is off.

    It keeps ``hsm_meta`` (the per-sample metadata the collator carries) out of
    ``model(**inputs)`` always, keeps the sampler's epoch in step with the Trainer's
    (also after a mid-epoch resume on several ranks, where accelerate's ``set_epoch``
    chain no longer reaches the sampler), and logs per-dataset fusion telemetry.
    """

    hsm_sampler: HsmSampler

    def use_sampler(self, sampler: HsmSampler, fusion: FusionConfig, *, log_prefix: str = "hsm/") -> None:
        """Train on ``sampler``; ``fusion`` names the datasets whose telemetry is logged."""
        self.hsm_sampler = sampler
        self.hsm_fusion = fusion
        self.hsm_log_prefix = log_prefix
        self.hsm_telemetry: dict[str, np.ndarray] = {}
        self._hsm_meta: dict | None = None
        self.add_callback(SamplerEpochCallback(self))

    def _get_train_sampler(self, train_dataset=None):
        return self.hsm_sampler

    def _prepare_inputs(self, inputs):
        # Every path to model(**inputs) (training_step, prediction_step) prepares its inputs here.
        meta = inputs.pop("hsm_meta", None) if isinstance(inputs, dict) else None
        self._hsm_meta = meta  # the mining loss reads it; the batch's tensors go on without it
        if meta is not None and self.model.training:
            self._count_telemetry(meta)
        return super()._prepare_inputs(inputs)

    def take_hsm_meta(self, inputs: dict) -> dict | None:
        """The batch's metadata, once: from ``inputs`` when called directly, else what ``_prepare_inputs`` kept."""
        meta = inputs.pop("hsm_meta", None)
        meta = meta if meta is not None else self._hsm_meta
        self._hsm_meta = None
        return meta

    def _count_telemetry(self, meta: dict) -> None:
        for i, name in enumerate(meta["dataset"]):
            row = self.hsm_telemetry.setdefault(name, np.zeros(len(_TELEMETRY) + 1))
            row[0] += 1
            for j, key in enumerate(_TELEMETRY, start=1):
                row[j] += float(meta[key][i])


class SamplerEpochCallback(TrainerCallback):
    """Sets the sampler's epoch from the Trainer's state at every epoch start; logs fusion telemetry."""

    def __init__(self, trainer: FusionSamplerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # state.num_train_epochs is what the Trainer will run, also when max_steps drives the run.
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "num_train_epochs"):
            dataset.num_train_epochs = max(float(state.num_train_epochs), 1.0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # After skip_first_batches on several ranks, accelerate's set_epoch stops one wrapper short
        # of the sampler; the Trainer's state knows the epoch (2.33 after a resume in epoch 2).
        self.trainer.hsm_sampler.set_epoch(math.floor(state.epoch + 1e-9))

    def on_epoch_end(self, args, state, control, **kwargs):
        logs = fusion_telemetry(self.trainer)
        # On every rank, as the Trainer itself calls log (only the main process writes): ms-swift's log
        # is a collective (all_gather_object of its metric names), so a main-only call would deadlock or
        # pair with the next hsm collective.
        self.trainer.log({f"{self.trainer.hsm_log_prefix}{k}": float(v) for k, v in logs.items()})


class HsmTrainerMixin(FusionSamplerMixin):
    """Logs per-sample loss/token accuracy while training on the plan-driven schedule."""

    def setup_hsm(self, *, mining: MiningConfig, fusion: FusionConfig, hsm_dir: Path, sampler: HsmSampler,
                  num_train_epochs: float, attempt: int, run_id: str, owns_loss: bool = True) -> None:
        """Start logging events and planning on ``sampler``'s schedule.

        Args:
            mining: the mining configuration (mode, selector, metric, ...).
            fusion: the datasets trained on; ``fusion.target.name`` is the one mined.
            hsm_dir: where events, plans and ``dataset.json`` live (``<output_dir>/hsm``).
            sampler: the plan-driven schedule this Trainer reads its training rows by.
            num_train_epochs: epochs of the run (``activate_after_pct`` counts them).
            attempt: :func:`resume_attempt` of ``hsm_dir`` (0 for a fresh run).
            run_id: the run's name in the events.
            owns_loss: True (``hsm train``): hsm computes the training loss through the Trainer's
                ``compute_loss_func`` and the statistics from the same cross-entropy pass. False (a
                trainer with its own loss, e.g. TRL or ms-swift): the loss is left alone and the trainer's
                ``compute_loss`` hands each micro-batch's statistics to :meth:`record_stats`.
        """
        if owns_loss:
            if self.compute_loss_func is not None:
                raise ValueError("hsm computes the training loss itself; this Trainer already has a compute_loss_func "
                                 "(pass owns_loss=False and call record_stats from your compute_loss)")
            self.compute_loss_func = self._hsm_loss
        self.use_sampler(sampler, fusion, log_prefix=mining.log_prefix)
        self.hsm_mining, self.hsm_dir = mining, hsm_dir
        self.hsm_num_epochs = num_train_epochs
        self.hsm_world = distributed.current_world()
        self.hsm_writer = EventWriter(hsm_dir, run_id=run_id, rank=self.hsm_world.rank, attempt=attempt)
        self._hsm_pending: list[tuple[dict, torch.Tensor, int, int]] = []
        self._hsm_in_flight: list[tuple[list, torch.Tensor, torch.cuda.Event | None]] = []
        self._hsm_loss_meta: dict | None = None  # the batch whose loss compute_loss is computing
        self._hsm_micro = (-1, 0)
        self.add_callback(MiningCallback(self))

    def record_stats(self, meta: dict, stats: torch.Tensor, step: int) -> None:
        """Queue one micro-batch's per-sample statistics for the event log (moved to the host in bulk).

        Args:
            meta: the batch's ``hsm_meta`` (from :meth:`take_hsm_meta`): lists of ``sample_id``,
                ``dataset``, ``base_idx``, ``epoch``, ``aug_seed``, ``drawn_as_hard``, one entry per sample.
            stats: ``[len(STAT_ROWS), batch]`` from :func:`hsm.train.stats.per_sample_stats`, on any device.
            step: the Trainer's ``state.global_step`` the micro-batch belongs to.
        """
        self._hsm_pending.append((meta, stats, step, self._position_offset(stats.shape[1], step)))
        if len(self._hsm_pending) >= _FLUSH_EVERY_STEPS:
            self.hsm_drain(wait=False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._hsm_loss_meta = self.take_hsm_meta(inputs)
        # The plain Trainer counts tokens across devices (and later multiplies the loss by the
        # number of processes) only for a model that accepts loss kwargs. Qwen-VL does not: its
        # loss is each rank's own per-token mean. Hand our loss what the plain Trainer would have
        # handed the model, so the loss and the gradients are the plain Trainer's on any world size.
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _hsm_loss(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        meta, self._hsm_loss_meta = self._hsm_loss_meta, None
        supervised = meta.pop("supervised_index", None) if meta is not None else None
        # The model's own loss, op for op (bit-identical loss and gradients), and the statistics from its pass.
        loss, losses, mask, correct = causal_lm_loss(logits, labels, num_items_in_batch, supervised)
        # Tell training_step whether that is already scaled for gradient accumulation (as it infers for the plain model).
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if self.model.training and meta is not None:
            stats = per_sample_stats(losses, mask, correct, meta.pop("token_roles", None))
            self.record_stats(meta, stats, self.state.global_step)
        return loss

    def _position_offset(self, batch_size: int, global_step: int) -> int:
        # Under gradient accumulation several micro-batches share a global_step;
        # positions continue across them so (epoch, global_step, rank, position) stays unique.
        step, offset = self._hsm_micro
        if step != global_step:
            step, offset = global_step, 0
        self._hsm_micro = (step, offset + batch_size)
        return offset

    def hsm_drain(self, *, wait: bool = True) -> None:
        """Start one non-blocking device-to-host copy of the pending statistics and hand finished copies to the writer.

        With ``wait=False`` (during training) the copy just started stays in flight and only the previous one, long
        finished by then, is read: the training loop never waits on the device. ``wait=True`` (checkpoint, epoch
        end) reads every copy.
        """
        if self._hsm_pending:
            pending, self._hsm_pending = self._hsm_pending, []
            stats = torch.cat([s for _, s, _, _ in pending], dim=1)
            host = stats.to("cpu", non_blocking=True)  # from CUDA: into pinned memory, asynchronously
            copied = None
            if stats.is_cuda:
                copied = torch.cuda.Event()
                copied.record()
            self._hsm_in_flight.append((pending, host, copied))
        while self._hsm_in_flight and (wait or len(self._hsm_in_flight) > 1):
            pending, host, copied = self._hsm_in_flight.pop(0)
            if copied is not None:
                copied.synchronize()
            self._hsm_write(pending, host.numpy())

    def _hsm_write(self, pending: list, stats: np.ndarray) -> None:
        start = 0
        for meta, s, step, offset in pending:
            n = s.shape[1]
            rows = dict(zip(STAT_ROWS, stats[:, start:start + n]))
            start += n
            self.hsm_writer.append(
                epoch=int(meta["epoch"][0]), global_step=step,
                dataset=meta["dataset"], base_idx=meta["base_idx"], sample_id=meta["sample_id"],
                n_tokens=rows.pop("n_tokens").astype(np.int32), aug_seed=meta["aug_seed"],
                drawn_as_hard=meta["drawn_as_hard"], position_offset=offset, **rows,
            )


# An offline `hsm plan` on the run may hold its lock for a while; training waits rather than fail an epoch.
_LOCK_WAIT_SECONDS = 600.0


class MiningCallback(TrainerCallback):
    """Epoch end: flush events, agree on the log, plan on rank 0, broadcast the plan, log telemetry."""

    def __init__(self, trainer: HsmTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # What activate_after_pct counts: the epochs the Trainer will run, also when max_steps drives it.
        # hsm/run.json keeps it, so that hsm plan offline triggers as training did.
        self.trainer.hsm_num_epochs = float(state.num_train_epochs)
        if distributed.on_main(self.trainer.hsm_world):
            write_recorded(_json_bytes({"num_train_epochs": float(state.num_train_epochs),
                                        "max_steps": int(state.max_steps)}), RunPaths.at(self.trainer.hsm_dir).run_info)

    def on_step_end(self, args, state, control, **kwargs):
        # Events up to a checkpoint must be on disk before the checkpoint is: a run
        # resumed from it re-logs only the steps after it.
        if control.should_save:
            self.trainer.hsm_drain()
            self.trainer.hsm_writer.flush()

    def on_epoch_end(self, args, state, control, **kwargs):
        from hsm.train.event_sync import sync_epoch_events

        t = self.trainer
        epoch = t.hsm_sampler.epoch
        t.hsm_drain()
        t.hsm_writer.flush()
        world = t.hsm_world
        started = time.perf_counter()
        # Every rank's parts of this epoch reach rank 0's disk (shipped when there is no shared file system).
        logged = sync_epoch_events(t.hsm_dir, epoch, world)
        logs: dict[str, float] = {}
        manifest_bytes = plan_bytes = b""
        if distributed.on_main(world):
            result = plan_epoch(PlanRequest(
                t.hsm_dir, epoch + 1, t.hsm_mining, t.hsm_fusion.target.name, num_train_epochs=t.hsm_num_epochs,
                dataset=t.hsm_sampler.target, dump_dir=Path(args.output_dir), lock_timeout=_LOCK_WAIT_SECONDS,
            ))
            directory = plan_dir(t.hsm_dir, epoch + 1)
            manifest_bytes = (directory / "manifest.json").read_bytes()
            plan_bytes = (directory / "plan.parquet").read_bytes()
            logs = epoch_telemetry(t, epoch, result)
            logs["events_shipped_parts"] = float(logged["shipped"])
        # The plan travels by broadcast, so ranks need no shared file system.
        manifest_bytes = distributed.broadcast_bytes(manifest_bytes)
        plan_bytes = distributed.broadcast_bytes(plan_bytes)
        manifest = json.loads(manifest_bytes)
        directory = plan_dir(t.hsm_dir, epoch + 1)
        if not (directory / "plan.parquet").is_file() or file_sha256(directory / "plan.parquet") != manifest["checksum"]:
            # Plan and manifest appear together (this rank's disk, written by this rank only).
            publish_plan(stage_plan_bytes(t.hsm_dir, epoch + 1, plan_bytes, manifest_bytes), t.hsm_dir, epoch + 1)
        t.hsm_sampler.expect_plan(epoch + 1, manifest["checksum"])
        logs["plan_seconds"] = time.perf_counter() - started
        # Every rank calls log, as the Trainer does (the main process writes): see SamplerEpochCallback.
        t.log({f"{t.hsm_mining.log_prefix}{k}": float(v) for k, v in logs.items()})

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.hsm_drain()
        self.trainer.hsm_writer.close()


def fusion_telemetry(trainer: FusionSamplerMixin) -> dict[str, float]:
    """Per-dataset aggregates of the epoch's items, summed over ranks; resets the counters.

    ``oversize`` counts images larger than the processor's ``image_max_pixels`` (the
    processor shrinks them; images over ``max_image_side`` never train, they raise).
    """
    names = [trainer.hsm_fusion.target.name] + [s.name for s in trainer.hsm_fusion.sources]
    table = np.stack([trainer.hsm_telemetry.get(n, np.zeros(len(_TELEMETRY) + 1)) for n in names])
    table = distributed.all_reduce_sum(table)
    trainer.hsm_telemetry = {}
    out = {"fusion/epoch_size": float(trainer.hsm_sampler.epoch_length)}
    for name, row in zip(names, table):
        items = max(row[0], 1.0)
        out[f"fusion/{name}/items"] = row[0]
        out[f"fusion/{name}/augmented_frac"] = row[1] / items
        out[f"fusion/{name}/object_capped"] = row[2]
        out[f"fusion/{name}/oversize"] = row[3]
        out[f"fusion/{name}/aug_dropped_boxes"] = row[4]
        out[f"fusion/{name}/input_len_mean"] = row[5] / items
        out[f"fusion/{name}/drawn_as_hard"] = row[6]
    return out


def epoch_telemetry(trainer: HsmTrainerMixin, epoch: int, result) -> dict[str, float]:
    """Mining scalars for the epoch that just ended and the plan just built (rank 0).

    ``seen_hard``/``seen_regular`` count the epoch's target events drawn as hard or
    not, ``hard_hit_rate`` is the hard share of them, and ``hard_pool_coverage`` the
    share of the applied plan's hard samples drawn at least once.
    """
    import pyarrow.compute as pc

    from hsm.mining.event_reader import read_epoch_events

    # The planner has just read this epoch's events to fold them; reuse them.
    events = result.last_events if result.last_events is not None else read_epoch_events(trainer.hsm_dir, epoch).table
    target = events.filter(pc.equal(events.column("dataset"), trainer.hsm_fusion.target.name))
    target = target.filter(pc.is_finite(target.column("loss")))  # draws only: det_f1 rows carry NaN loss
    acc = target.column("token_acc").to_numpy()
    hard = target.column("drawn_as_hard").to_numpy(zero_copy_only=False)
    used = trainer.hsm_sampler.plan
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
        "epoch_size": float(trainer.hsm_sampler.epoch_length),
        "target_draws": float(len(hard)),
        "seen_hard": float(hard.sum()),
        "seen_regular": float((~hard).sum()),
        "hard_hit_rate": float(hard.mean()) if len(hard) else 0.0,
        "shortfall": float(trainer.hsm_sampler.schedule.shortfall),
    }
    if result.manifest.get("suspects") is not None:  # exclude_suspects: logged as hsm/suspects
        logs["suspects"] = float(result.manifest["suspects"]["count"])
    if used is not None and used.triggered and used.is_hard.any():
        pool = set(used.hard_idx.tolist())
        seen = set(target.filter(pc.field("drawn_as_hard")).column("base_idx").to_pylist())
        logs["hard_pool_coverage"] = len(pool & seen) / len(pool)
    else:
        logs["hard_pool_coverage"] = 0.0
    for name, values in (("hard", acc[hard]), ("regular", acc[~hard])):
        logs[f"train_acc_{name}_mean"] = float(values.mean()) if len(values) else 0.0
        logs[f"train_acc_{name}_p90"] = float(np.quantile(values, 0.9)) if len(values) else 0.0
    return logs


def make_trainer_class(base: type[Trainer] = Trainer, *, mining: bool) -> type[Trainer]:
    """``base`` with the hsm mixin (mining on) or only the fusion sampler (mining off)."""
    mixin = HsmTrainerMixin if mining else FusionSamplerMixin
    return type(f"Hsm{base.__name__}" if mining else f"Fusion{base.__name__}", (mixin, base), {})


def resume_attempt(hsm_dir: Path) -> int:
    """One more than the highest attempt in the event log (0 for a fresh run), agreed over ranks.

    Collective: without a shared file system each rank sees only its own parts.

    Args:
        hsm_dir: the run's hsm directory (its ``events/`` are read).
    """
    import pyarrow.parquet as pq

    best = -1
    for part in RunPaths.at(hsm_dir).event_parts():
        try:
            column = pq.read_table(part, columns=["attempt"]).column("attempt")
            best = max(best, max(column.to_pylist(), default=-1))
        except Exception:  # a corrupt part must not stop a resume; the planner reports it
            continue
    return distributed.all_reduce_max(best) + 1


def write_dataset_info(hsm_dir: Path, dataset: FusionDataset) -> None:
    """Write ``<hsm_dir>/dataset.json``: the target's identity (name, size, fingerprint) and every dataset's size.

    Args:
        hsm_dir: the run's hsm directory.
        dataset: anything with ``names`` and ``sizes`` (target first, in fusion order) and ``target_info``
            (a :class:`hsm.mining.plan.DatasetInfo`): a :class:`FusionDataset`, or an integration's
            :class:`hsm.integrations.common.SlotDataset`.
    """
    datasets = [{"name": n, "size": s} for n, s in zip(dataset.names, dataset.sizes)]  # target first, fusion order
    write_recorded(_json_bytes({"target": dataset.target_info.to_dict(), "datasets": datasets}), RunPaths.at(hsm_dir).dataset_info)


def _json_bytes(payload: dict) -> bytes:
    """Indented, key-sorted JSON, as :func:`hsm.io.write_json_atomic` writes it."""
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")

