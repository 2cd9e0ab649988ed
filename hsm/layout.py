"""The on-disk layout of a run: the one place that spells a path under ``<output_dir>/hsm``.

Every reader and writer asks :class:`RunPaths` for a path instead of joining names itself, so the
layout (a public contract: users query these files) can be read in one screen::

    <output_dir>/hsm/config.yaml                               resolved mining + fusion config
    <output_dir>/hsm/dataset.json                              the target's size and fingerprint
    <output_dir>/hsm/run.json                                  run id, attempts, epochs trained
    <output_dir>/hsm/.lock                                     the writers' lock
    <output_dir>/hsm/samples.parquet                           TRL / ms-swift: what each base_idx names
    <output_dir>/hsm/events/epoch=E/rank=R/part-NNNNN.parquet  event parts (+ _sha256.json ledger)
    <output_dir>/hsm/sample_ids/epoch=E/sample_ids.parquet     append-only id table
    <output_dir>/hsm/state/epoch=E/state.parquet               per-sample state after epoch E
    <output_dir>/hsm/plans/epoch=E/plan.parquet                plan consumed by set_epoch(E)
    <output_dir>/hsm/plans/epoch=E/manifest.json               published with its plan
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hsm.io import epoch_partitions

__all__ = ["HSM_DIR_NAME", "RunPaths"]

HSM_DIR_NAME = "hsm"


class _Under:
    """A fixed name under the run's root, read like a property (``paths.config`` -> ``<root>/config.yaml``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, paths: RunPaths | None, owner: type | None = None) -> Path:
        if paths is None:
            raise AttributeError(f"RunPaths.{self.name} is a path of one run: ask RunPaths.of(output_dir)")
        return paths.root / self.name


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run, from its ``hsm`` folder (``RunPaths.of(output_dir)`` from the Trainer's ``output_dir``).

    Attributes:
        root: ``<output_dir>/hsm``.
    """

    root: Path

    @classmethod
    def of(cls, output_dir: str | Path) -> RunPaths:
        """The layout of the run whose Trainer ``output_dir`` is ``output_dir``."""
        return cls(Path(output_dir) / HSM_DIR_NAME)

    @classmethod
    def at(cls, hsm_dir: str | Path) -> RunPaths:
        """The layout rooted at an ``hsm`` folder itself."""
        return cls(Path(hsm_dir))

    @property
    def output_dir(self) -> Path:
        return self.root.parent

    config = _Under("config.yaml")
    dataset_info = _Under("dataset.json")
    run_info = _Under("run.json")
    samples = _Under("samples.parquet")  # TRL / ms-swift runs: base_idx -> sample id, image and answer
    lock = _Under(".lock")
    events_root = _Under("events")
    sample_ids_root = _Under("sample_ids")
    state_root = _Under("state")
    plans_root = _Under("plans")

    def events(self, epoch: int, rank: int | None = None) -> Path:
        """``events/epoch=E`` or, with ``rank``, ``events/epoch=E/rank=R``."""
        path = self.events_root / f"epoch={epoch}"
        return path if rank is None else path / f"rank={rank}"

    def event_parts(self, rank: int | str = "*") -> list[Path]:
        """Every committed event part (``events/epoch=*/rank=R/part-*.parquet``; hidden temp files excluded), sorted."""
        return sorted(self.events_root.glob(f"epoch=*/rank={rank}/part-*.parquet"))

    def sample_ids(self, epoch: int) -> Path:
        return self.sample_ids_root / f"epoch={epoch}" / "sample_ids.parquet"

    def state(self, epoch: int) -> Path:
        return self.state_root / f"epoch={epoch}" / "state.parquet"

    def plan_dir(self, epoch: int) -> Path:
        return self.plans_root / f"epoch={epoch}"

    def plan(self, epoch: int) -> Path:
        return self.plan_dir(epoch) / "plan.parquet"

    def manifest(self, epoch: int) -> Path:
        return self.plan_dir(epoch) / "manifest.json"

    def epochs(self, kind: str) -> dict[int, Path]:
        """``{E: folder}`` of the ``epoch=E`` partitions under ``events``, ``sample_ids``, ``state`` or ``plans``."""
        roots = {"events": self.events_root, "sample_ids": self.sample_ids_root, "state": self.state_root,
                 "plans": self.plans_root}
        if kind not in roots:
            raise ValueError(f"no partitioned folder {kind!r} in a run (one of {', '.join(roots)})")
        return epoch_partitions(roots[kind])
