"""The epoch sampler: loads the plan for the epoch at ``set_epoch``, builds the schedule, yields slots.

Built and iterated in the main process (accelerate calls the sampler's
``set_epoch``; a dataset's may never be called, and DataLoader workers hold
copies of the dataset). It yields the global schedule as slot tuples
``(dataset_code, base_idx, is_hard, epoch, position)``; under the HF Trainer,
accelerate deals whole batches of it to the ranks. With an explicit ``world``
it yields this rank's batches itself (:func:`hsm.data.schedule.shard_positions`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hsm.mining.plan import DatasetInfo, Plan, PlanError, load_plan, plan_dir
from hsm.data.draws import epoch_length
from hsm.data.schedule import Schedule, build_schedule, shard_positions
from hsm.world import World

__all__ = ["HsmSampler"]

_CHUNK = 8192


class HsmSampler(torch.utils.data.Sampler):
    """Plan-driven, epoch-seeded sampler over a fusion of target and sources."""

    def __init__(self, *, sizes: list[int], ratios: list[float], target: DatasetInfo, seed: int, batch_size: int,
                 hsm_dir: str | Path | None = None, world: World | None = None, target_epoch_size: int | None = None):
        if target_epoch_size is not None and target_epoch_size < 1:
            raise ValueError(f"target_epoch_size must be >= 1, got {target_epoch_size}")
        self.sizes = sizes
        self.ratios = ratios
        self.target = target
        self.seed = seed
        self.batch_size = batch_size
        self.hsm_dir = Path(hsm_dir) if hsm_dir is not None else None
        self.world = world
        self.target_epoch_size = target_epoch_size
        # Fixed for the whole run: transformers counts the steps per epoch once, from the first epoch.
        self.epoch_length = epoch_length(sizes[0], ratios, target_epoch_size)
        if self.epoch_length == 0:
            raise ValueError(f"an epoch of the fusion has no slots (target '{target.name}' n={sizes[0]})")
        self.epoch = 0
        self.plan: Plan | None = None
        self._expected: dict[int, str] = {}
        self._schedule: Schedule | None = None

    def expect_plan(self, epoch: int, checksum: str) -> None:
        """The checksum rank 0 broadcast for ``epoch``'s plan; loading verifies against it."""
        self._expected[epoch] = checksum
        if epoch == self.epoch:
            self._schedule = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._schedule = None
        self.epoch = epoch

    @property
    def schedule(self) -> Schedule:
        """This epoch's global schedule (built once per epoch)."""
        if self._schedule is None:
            plan = None
            if self.hsm_dir is not None:
                plan = load_plan(self.hsm_dir, self.epoch, dataset=self.target, expected_checksum=self._expected.get(self.epoch))
            self.plan = plan
            if plan is not None and plan.manifest.get("target_epoch_size") != self.target_epoch_size:
                raise PlanError(
                    f"{plan_dir(self.hsm_dir, self.epoch) / 'manifest.json'}: plan was built for target_epoch_size "
                    f"{plan.manifest.get('target_epoch_size')}, this run uses {self.target_epoch_size}; "
                    f"re-run hsm plan --epoch {self.epoch} with the run's config"
                )
            self._schedule = build_schedule(
                plan if plan is not None and plan.triggered else None,
                n_target=self.sizes[0], source_sizes=self.sizes[1:], source_ratios=self.ratios,
                seed=self.seed, epoch=self.epoch, batch_size=self.batch_size, target_epoch_size=self.target_epoch_size,
            )
            assert len(self._schedule) == self.epoch_length  # the schedule's own invariant, not input validation
        return self._schedule

    def _positions(self) -> np.ndarray | None:
        """This rank's slot positions, or None for a single rank (all slots in order)."""
        if self.world is None or self.world.world_size == 1:
            return None
        return shard_positions(self.epoch_length, self.batch_size, self.world)

    def __iter__(self) -> Iterator[tuple[int, int, bool, int, int]]:
        schedule = self.schedule
        positions = self._positions()
        total = len(schedule) if positions is None else len(positions)
        for start in range(0, total, _CHUNK):  # decode in chunks: never a Python list of the whole epoch
            stop = min(start + _CHUNK, total)
            if positions is None:
                where = range(start, stop)
                codes, idx, hard = schedule.decode(start, stop)
            else:
                where = positions[start:stop].tolist()
                codes, idx, hard = schedule.decode_at(positions[start:stop])
            yield from zip(codes, idx, hard, [self.epoch] * (stop - start), where)

    def __len__(self) -> int:
        if self.world is None or self.world.world_size == 1:
            return self.epoch_length
        return len(shard_positions(self.epoch_length, self.batch_size, self.world))

    def warn_uneven_ranks(self, world_size: int) -> int:
        """Warn when an epoch does not split evenly over ``world_size`` ranks, and say what happens to the rest.

        Under an accelerate-prepared loader (no ``world``), accelerate evens the ranks out by repeating the
        epoch's first slots (``even_batches``: trained and logged twice). When this sampler deals the ranks
        itself (``world`` set, as under ms-swift), the fewer than ``world_size`` slots left after the last
        even split are not trained that epoch (:func:`shard_positions`). Returns the slots repeated (positive)
        or left out (negative) per epoch; 0: even, no warning.
        """
        if world_size <= 1:
            return 0
        if self.world is not None:
            left = self.epoch_length % world_size  # what shard_positions leaves out: whole rounds and equal shares
            if left:
                warnings.warn(
                    f"hsm: an epoch of {self.epoch_length} slots on {world_size} ranks x batch {self.batch_size}: the "
                    f"last {left} slot(s) of each epoch are not trained (the ranks take equal shares, as ms-swift's "
                    f"BatchSamplerShard deals them; nothing is trained twice). An epoch length that is a multiple of "
                    f"{world_size} leaves none out", stacklevel=2)
            return -left
        per_round = world_size * self.batch_size
        repeats = -self.epoch_length % per_round
        if repeats:
            warnings.warn(
                f"hsm: an epoch of {self.epoch_length} slots on {world_size} ranks x batch {self.batch_size}: accelerate "
                f"repeats the epoch's first {repeats} slot(s) to give every rank whole batches; they are trained and "
                f"logged twice per epoch (an extra observation each, and their datasets drawn beyond their share). "
                f"An epoch length that is a multiple of {per_round} has no repeats", stacklevel=2)
        return repeats
