"""Entry point of the start-up agreement test: ``torchrun --nproc_per_node 2 tests/dist_session.py [CORPUS] OUT``
(a run of ``tests/dist_runs.py``'s shared launch; the corpus is not read).

A :class:`MiningSession` whose ``prepare`` (the stack's own checks and writes once the run is claimed) fails on
rank 0 only, as a write of the run's files would; every rank writes ``OUT/rank{R}.json`` with the error its
``start`` raised (none: ``null``), within the launch's timeout instead of waiting for a gradient all-reduce.
"""

import json
import sys
from pathlib import Path

from hsm.config import FusionConfig, TargetConfig
from hsm.layout import RunPaths
from hsm.train import distributed
from hsm.train.session import MiningSession
from hsm.train.startup import StartRequest

out = Path(sys.argv[-1])
distributed.init_from_launcher()
world = distributed.current_world()
paths = RunPaths.of(out / "run")


def prepare() -> None:
    if world.rank == 0:
        raise OSError(f"{paths.samples}: No space left on device")


session = MiningSession(sampler=None, fusion=FusionConfig(target=TargetConfig(name="t")), mining=None, paths=paths,
                        run_id="run", start=StartRequest(paths, check_files=False), prepare=prepare)
try:
    session.start(None)
    error = None
except Exception as e:  # what this rank's trainer.train() would raise
    error = f"{type(e).__name__}: {e}"
(out / f"rank{world.rank}.json").write_text(json.dumps({"error": error}))
if __name__ == "__main__":  # tests/dist_runs.py runs several in one launch and tears down once, after the last
    distributed.destroy_process_group()
