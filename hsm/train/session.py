"""The one object that joins a Trainer to hsm: :class:`MiningSession`.

A trainer holds it as ``trainer.mining`` (:meth:`hsm.train.trainer.FusionSamplerMixin.use_session`).
It owns the run's paths, the plan-driven sampler, the event writer, the world and the epoch-end
protocol; the trainer makes one call per step and one callback (:class:`SessionCallback`) drives the
rest::

    start(resume)     claim the run (lock, used-folder refusal, file checks), run the stack's own checks and
                      writes, open the event writer                                   (trainer.train begins)
    hold(inputs)      take the batch's HsmMeta out of the model inputs, count its telemetry  (_prepare_inputs)
    record(meta, losses, mask, correct)
                      per-sample statistics of the loss pass, queued for the log           (from the loss)
    end_epoch(epoch)  flush, gather every rank's events on rank 0, plan, broadcast the plan  (epoch end)
    finish()          release the run's lock                                           (trainer.train ends)

With mining off (``mining=None``) the session only drives the schedule and its telemetry: no
events, no plans.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import TrainerCallback

from hsm.config import FusionConfig, MiningConfig
from hsm.data.meta import META_KEY, HsmMeta
from hsm.data.sampler import HsmSampler
from hsm.io import file_sha256
from hsm.layout import RunPaths
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.mining.plan import publish_plan, stage_plan_bytes
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.train import distributed
from hsm.train.run_files import resume_attempt, write_run_info
from hsm.train.startup import StartRequest, claim_run
from hsm.train.stats import StatRows, batch_stats
from hsm.train.telemetry import FusionCounts, epoch_telemetry

__all__ = ["MiningSession", "SessionCallback"]

# Micro-batches whose statistics travel to the host in one copy.
_FLUSH_EVERY_STEPS = 32
# An offline `hsm plan` on the run may hold its lock for a while; training waits rather than fail an epoch.
_LOCK_WAIT_SECONDS = 600.0


class MiningSession:
    """One training's hsm state and protocol (see the module docstring).

    Args:
        sampler: the plan-driven schedule the trainer reads its training rows by.
        fusion: the datasets trained on; ``fusion.target.name`` is the one mined.
        mining: the mining configuration, or None: the schedule only.
        paths: the run's layout (``RunPaths.of(output_dir)``).
        run_id: the run's name in the events.
        start: what :meth:`start` asks of :func:`hsm.train.startup.claim_run` (its ``resume`` is the one
            ``train()`` is given); None when the caller has claimed the run itself (``hsm train``, before the
            model loads).
        prepare: what the stack checks and writes once the run is claimed, before step 0 (image checks, the
            run's config and dataset files), or None; its outcome is agreed over the ranks.

    Attributes:
        held: the metadata of the batch :meth:`hold` took last, until :meth:`take` hands it out.
        loss_meta: the batch whose loss is being computed (for a loss hook that sees only outputs and labels).
        writer: the event writer, from :meth:`start` on (None with mining off).
        world: this process's rank and world size.
        attempt: the run's resume count (events of a resumed run supersede the earlier attempt's).
        num_train_epochs: the epochs the Trainer runs (what ``activate_after_pct`` counts).
    """

    def __init__(self, *, sampler: HsmSampler, fusion: FusionConfig, mining: MiningConfig | None, paths: RunPaths,
                 run_id: str, start: StartRequest | None = None, prepare: Callable[[], None] | None = None):
        self.sampler = sampler
        self.fusion = fusion
        self.config = mining
        self.paths = paths
        self.run_id = run_id
        self.start_request = start
        self.prepare = prepare
        self.world = distributed.current_world()
        self.writer: EventWriter | None = None
        self.attempt = 0
        self.num_train_epochs = 1.0
        self.held: HsmMeta | None = None
        self.loss_meta: HsmMeta | None = None
        self.log_prefix = mining.log_prefix if mining is not None else "hsm/"
        self.trainer = None
        self._counts = FusionCounts([fusion.target.name] + [s.name for s in fusion.sources])
        self._claim = contextlib.ExitStack()
        self._pending: list[tuple[HsmMeta, torch.Tensor, int, int]] = []
        self._in_flight: list[tuple[list, torch.Tensor, torch.cuda.Event | None]] = []
        self._micro = (-1, 0)

    @property
    def is_mining(self) -> bool:
        """Whether events are logged and plans built (mining configured)."""
        return self.config is not None

    # --- start and finish -------------------------------------------------------------------------------------

    def start(self, resume: str | bool | None) -> str | None:
        """Claim the run and open the log before step 0; returns the checkpoint to resume from (None: fresh).

        Collective. ``resume`` is what ``trainer.train`` was given: True means the newest complete checkpoint.
        """
        from hsm.train.checkpoints import LAST

        claims = self.start_request is not None
        created = False
        self.world = distributed.current_world()
        if claims:
            asked = LAST if resume is True else (str(resume) if resume else None)
            created = not self.paths.root.exists()
            resume = claim_run(self._claim, dataclasses.replace(self.start_request, resume=asked))
        try:
            self._prepare_on_every_rank()
        except BaseException:
            self.finish()
            if created and distributed.on_main(self.world):  # leave no hsm/ behind that holds only the lock file
                shutil.rmtree(self.paths.root, ignore_errors=True)
            raise
        if self.is_mining:
            self.attempt = resume_attempt(self.paths.root)
            self.writer = EventWriter(self.paths.root, run_id=self.run_id, rank=self.world.rank, attempt=self.attempt)
        return resume

    def _prepare_on_every_rank(self) -> None:
        """Run ``prepare`` and agree on its outcome: a failure on one rank (rank 0 alone writes the run's files)
        fails every rank here, naming it, instead of leaving the others to wait at the first gradient all-reduce
        under a launcher that does not tear the job down."""
        failure = None
        try:
            if self.prepare is not None:
                self.prepare()
        except Exception as e:
            failure = e
        verdict = b"" if failure is None else f"{type(failure).__name__}: {failure}".encode()
        verdicts = distributed.all_gather_bytes(verdict)
        if failure is not None:
            raise failure
        for rank, verdict in enumerate(verdicts):
            if verdict:
                raise RuntimeError(f"hsm: rank {rank} failed before step 0, so this rank stops too: "
                                   f"{verdict.decode(errors='replace')}")

    def finish(self) -> None:
        """Release the run's lock (held from :meth:`start` on rank 0)."""
        self._claim.close()

    # --- every step -------------------------------------------------------------------------------------------

    def hold(self, inputs, *, training: bool) -> None:
        """Take the batch's metadata out of ``inputs`` (it must never reach ``model(**inputs)``) and keep it for
        :meth:`take`; a training batch is counted in the epoch's fusion telemetry."""
        meta = inputs.pop(META_KEY, None) if isinstance(inputs, dict) else None
        self.held = meta
        if meta is not None and training:
            self._counts.count(meta)

    def take(self, inputs: dict | None = None) -> HsmMeta | None:
        """The batch's metadata, once: from ``inputs`` when it is still there, else what :meth:`hold` kept."""
        meta = inputs.pop(META_KEY, None) if isinstance(inputs, dict) else None
        meta = meta if meta is not None else self.held
        self.held = None
        return meta

    def take_loss_meta(self) -> HsmMeta | None:
        """:attr:`loss_meta`, once."""
        meta, self.loss_meta = self.loss_meta, None
        return meta

    def record(self, meta: HsmMeta, losses: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> None:
        """Queue one training micro-batch's per-sample statistics for the event log.

        The statistics (:func:`hsm.train.stats.batch_stats`) stay on the device; every
        ``_FLUSH_EVERY_STEPS`` micro-batches they travel to the host in one non-blocking copy.

        Args:
            meta: the batch's metadata (:meth:`take`).
            losses: ``[rows, seq - 1]`` per-token losses of the shifted labels (the trainer's own pass).
            mask: ``[rows, seq - 1]`` supervised tokens.
            correct: ``[rows, seq - 1]`` argmax == label.
        """
        stats = batch_stats(losses, mask, correct, meta)
        step = self.trainer.state.global_step
        self._pending.append((meta, stats, step, self._position_offset(len(meta), step)))
        if len(self._pending) >= _FLUSH_EVERY_STEPS:
            self.drain(wait=False)

    def _position_offset(self, batch_size: int, global_step: int) -> int:
        # Under gradient accumulation several micro-batches share a global_step;
        # positions continue across them so (epoch, global_step, rank, position) stays unique.
        step, offset = self._micro
        if step != global_step:
            step, offset = global_step, 0
        self._micro = (step, offset + batch_size)
        return offset

    def drain(self, *, wait: bool = True) -> None:
        """Start one non-blocking device-to-host copy of the pending statistics and hand finished copies to the
        writer.

        With ``wait=False`` (during training) the copy just started stays in flight and only the previous one,
        long finished by then, is read: the training loop never waits on the device. ``wait=True`` (checkpoint,
        epoch end) reads every copy.
        """
        if self._pending:
            pending, self._pending = self._pending, []
            stats = torch.cat([s for _, s, _, _ in pending], dim=1)
            host = stats.to("cpu", non_blocking=True)  # from CUDA: into pinned memory, asynchronously
            copied = None
            if stats.is_cuda:
                copied = torch.cuda.Event()
                copied.record()
            self._in_flight.append((pending, host, copied))
        while self._in_flight and (wait or len(self._in_flight) > 1):
            pending, host, copied = self._in_flight.pop(0)
            if copied is not None:
                copied.synchronize()
            self._write(pending, host.numpy())

    def _write(self, pending: list, stats: np.ndarray) -> None:
        start = 0
        for meta, s, step, offset in pending:
            n = s.shape[1]
            rows = StatRows.from_stacked(stats[:, start:start + n])
            start += n
            self.writer.append(EventBatch(
                epoch=int(meta.epoch[0]), global_step=step, dataset=meta.dataset, base_idx=meta.base_idx,
                sample_id=meta.sample_id, loss=rows.loss, token_acc=rows.token_acc, n_tokens=rows.n_tokens,
                aug_seed=meta.aug_seed, drawn_as_hard=meta.drawn_as_hard, position_offset=offset,
                metrics=rows.metrics,
            ))

    def flush(self) -> None:
        """Every queued statistic into a written part (before a checkpoint, so a resume re-logs only later steps)."""
        if self.writer is not None:
            self.drain()
            self.writer.flush()

    def close(self) -> None:
        """Write what is queued and stop the writer (training ended)."""
        if self.writer is not None:
            self.drain()
            self.writer.close()

    # --- every epoch ------------------------------------------------------------------------------------------

    def fusion_telemetry(self) -> dict[str, float]:
        """The epoch's per-dataset fusion aggregates, summed over ranks (collective); resets the counts."""
        return self._counts.collect(self.sampler.epoch_length)

    def end_epoch(self, epoch: int, dump_dir: Path) -> dict[str, float]:
        """Flush, gather every rank's events of ``epoch`` on rank 0, plan ``epoch + 1`` there, broadcast the plan
        and make the sampler expect it. Collective; returns the mining scalars to log (rank 0's; others: timing).

        Args:
            epoch: the epoch that ended.
            dump_dir: where ``dump: true`` writes ``hard_samples_epoch_{n}.json`` (the Trainer's ``output_dir``).
        """
        from hsm.mining.event_reader import read_epoch_events
        from hsm.train.event_sync import sync_epoch_events

        self.flush()
        started = time.perf_counter()
        # Every rank's parts of this epoch reach rank 0's disk (shipped when there is no shared file system).
        logged = sync_epoch_events(self.paths.root, epoch, self.world)
        logs: dict[str, float] = {}
        manifest_bytes = plan_bytes = b""
        if distributed.on_main(self.world):
            result = plan_epoch(PlanRequest(
                self.paths.root, epoch + 1, self.config, self.fusion.target.name,
                num_train_epochs=self.num_train_epochs, dataset=self.sampler.target, dump_dir=dump_dir,
                lock_timeout=_LOCK_WAIT_SECONDS,
            ))
            manifest_bytes = self.paths.manifest(epoch + 1).read_bytes()
            plan_bytes = self.paths.plan(epoch + 1).read_bytes()
            # The planner has just read this epoch's events to fold them; reuse them.
            events = result.last_events if result.last_events is not None else read_epoch_events(self.paths.root, epoch).table
            logs = epoch_telemetry(result, events, self.fusion.target.name, self.sampler, epoch)
            logs["events_shipped_parts"] = float(logged["shipped"])
        # The plan travels by broadcast, so ranks need no shared file system.
        manifest_bytes = distributed.broadcast_bytes(manifest_bytes)
        plan_bytes = distributed.broadcast_bytes(plan_bytes)
        manifest = json.loads(manifest_bytes)
        plan = self.paths.plan(epoch + 1)
        if not plan.is_file() or file_sha256(plan) != manifest["checksum"]:
            # Plan and manifest appear together (this rank's disk, written by this rank only).
            publish_plan(stage_plan_bytes(self.paths.root, epoch + 1, plan_bytes, manifest_bytes), self.paths.root, epoch + 1)
        self.sampler.expect_plan(epoch + 1, manifest["checksum"])
        logs["plan_seconds"] = time.perf_counter() - started
        return logs

    def log(self, logs: dict[str, float]) -> None:
        """Log ``logs`` under the prefix through the Trainer, on every rank, as the Trainer itself calls ``log``
        (only the main process writes): ms-swift's ``log`` is a collective (``all_gather_object`` of its metric
        names), so a main-only call would deadlock or pair with the next hsm collective."""
        self.trainer.log({f"{self.log_prefix}{k}": float(v) for k, v in logs.items()})


class SessionCallback(TrainerCallback):
    """Drives a :class:`MiningSession` from the Trainer's events: the sampler's epoch, flushes before
    checkpoints, the epoch-end protocol and the telemetry."""

    def __init__(self, session: MiningSession):
        self.session = session

    def on_train_begin(self, args, state, control, **kwargs):
        # state.num_train_epochs is what the Trainer will run, also when max_steps drives the run.
        session = self.session
        session.num_train_epochs = float(state.num_train_epochs)
        dataset = session.trainer.train_dataset
        if hasattr(dataset, "num_train_epochs"):  # the fusion dataset's curriculum counts them
            dataset.num_train_epochs = max(float(state.num_train_epochs), 1.0)
        if session.is_mining and distributed.on_main(session.world):
            write_run_info(session.paths.root, state.num_train_epochs, state.max_steps)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # After skip_first_batches on several ranks, accelerate's set_epoch stops one wrapper short
        # of the sampler; the Trainer's state knows the epoch (2.33 after a resume in epoch 2).
        self.session.sampler.set_epoch(math.floor(state.epoch + 1e-9))

    def on_step_end(self, args, state, control, **kwargs):
        # Events up to a checkpoint must be on disk before the checkpoint is: a run
        # resumed from it re-logs only the steps after it.
        if control.should_save:
            self.session.flush()

    def on_epoch_end(self, args, state, control, **kwargs):
        session = self.session
        session.log(session.fusion_telemetry())
        if session.is_mining:
            session.log(session.end_epoch(session.sampler.epoch, Path(args.output_dir)))

    def on_train_end(self, args, state, control, **kwargs):
        self.session.close()
