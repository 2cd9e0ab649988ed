"""``hsm report`` render time against the number of target samples.

    python bench/report.py [--sizes 100 10000] [--top 12] [--workdir DIR]

For each size: a synthetic corpus (hsm.data.synth) of N target images, 4 epochs of
events written with the event writer (every sample once per epoch), plans 1..4
from the real planner; then ``hsm report`` runs in a fresh process (imports
included) and is timed end to end, with its peak RSS. The goal: 10k target
samples in <= 30 s on 2 cores. Ratios are against the smallest size, measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from hsm.config import MiningConfig
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.data.synth import synthesize

N_EPOCHS = 4
BATCH = 64


def build_run(root: Path, n_target: int) -> Path:
    paths = synthesize(root / "data", n_target=n_target, n_source=4, n_val=2)
    ids = [json.loads(line)["id"] for line in paths["bbu"].read_text().splitlines()]
    run = root / "run"
    hsm_dir = run / "hsm"
    hsm_dir.mkdir(parents=True)
    mining = MiningConfig(enabled=True, selector={"mode": "percentile", "value": 0.2})
    config = {"custom": {"hard_sample_mining": mining.model_dump(mode="json"),
                         "fusion_config": {"target": {"name": "bbu", "train_jsonl": str(paths["bbu"])}}}}
    (hsm_dir / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, n_target)
    step = 0
    with EventWriter(hsm_dir, run_id="bench", rank=0, attempt=0, flush_rows=1 << 16) as writer:
        for epoch in range(N_EPOCHS):
            order = rng.permutation(n_target)
            for start in range(0, n_target, BATCH):
                batch = order[start:start + BATCH]
                loss = (base[batch] * 0.8 ** epoch + rng.normal(0, 0.1, len(batch))).tolist()
                writer.append(EventBatch(
                    epoch=epoch, global_step=step, dataset=["bbu"] * len(batch), base_idx=batch.tolist(),
                    sample_id=[ids[i] for i in batch], loss=loss, token_acc=rng.uniform(0, 1, len(batch)).tolist(),
                    n_tokens=[30] * len(batch), aug_seed=[0] * len(batch), drawn_as_hard=[False] * len(batch)))
                step += 1
            writer.flush()
            plan_epoch(PlanRequest(hsm_dir, epoch + 1, mining, "bbu"))
    return run


def time_report(run: Path, top: int) -> tuple[float, float]:
    probe = (
        "import resource, sys, time; t = time.perf_counter(); "
        "from hsm.cli.app import app; "
        f"sys.argv = ['hsm', 'report', '--run-dir', {str(run)!r}, '--top', '{top}']; "
        "exec('try:\\n    app()\\nexcept SystemExit:\\n    pass'); "
        "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    return float(line[1]), float(line[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10000])
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            started = time.perf_counter()
            run = build_run(Path(tmp) / f"n{n}", n)
            setup = time.perf_counter() - started
            seconds, rss = time_report(run, args.top)
            html = run / "report.html"
            rows.append((n, seconds, rss, html.stat().st_size / 1e6, setup))
    base = rows[0][1]
    print("| target samples | hsm report seconds | x smallest | peak RSS MB | HTML MB | setup seconds (not timed) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, seconds, rss, size, setup in rows:
        print(f"| {n} | {seconds:.2f} | {seconds / base:.2f} | {rss:.0f} | {size:.2f} | {setup:.0f} |")


if __name__ == "__main__":
    main()
