"""Two real processes under torchrun (gloo, CPU) through the real Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hsm.plan import DatasetInfo, load_plan
from hsm.schedule import build_schedule
from hsm.synth import synthesize

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_two_ranks_same_plans_and_every_slot_logged_once(tmp_path, launch):
    corpus = tmp_path / "corpus"
    synthesize(corpus, n_target=24, n_source=8, n_val=2)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["deepspeed=configs/deepspeed_zero2.json"] if launch == "zero2" else []
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # DeepSpeed's JIT op, built once
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "tests/dist_train.py", str(corpus), str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=480, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["expected"] == ranks[1]["expected"] and len(ranks[0]["expected"]) == 3  # one checksum per plan on both ranks
    assert all(r["backend"] == "gloo" for r in ranks)
    if launch == "zero2":
        assert all(r["deepspeed"] and r["zero_stage"] == 2 for r in ranks)
    info = json.loads((out / "hsm" / "dataset.json").read_text())
    target = DatasetInfo(info["target"]["name"], info["target"]["size"], info["target"]["fingerprint"])
    sizes = [d["size"] for d in info["datasets"]]
    names = [d["name"] for d in info["datasets"]]
    for epoch in range(3):
        parts = sorted((out / "hsm" / "events" / f"epoch={epoch}").rglob("part-*.parquet"))
        events = pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()
        keys = Counter((e["global_step"], e["rank"], e["position"]) for e in events)
        assert max(keys.values()) == 1  # no observation logged twice
        assert {e["rank"] for e in events} == {0, 1}
        plan = load_plan(out / "hsm", epoch, dataset=target)
        schedule = build_schedule(plan if plan is not None and plan.triggered else None, n_target=sizes[0],
                                  source_sizes=sizes[1:], source_ratios=[0.25, 0.25], seed=0, epoch=epoch, batch_size=4)
        expected = Counter((names[c], int(i)) for c, i in zip(schedule.dataset, schedule.base_idx))
        logged = Counter((e["dataset"], e["base_idx"]) for e in events)
        # The union of the ranks' shards is the global schedule, plus the slots accelerate
        # repeats from the start so both ranks run the same number of steps.
        assert not (expected - logged)
        padding = logged - expected
        first = Counter((names[c], int(i)) for c, i in zip(schedule.dataset[:8], schedule.base_idx[:8]))
        assert sum(padding.values()) == (-len(schedule)) % 8 and not (padding - first)
