"""Data-side benchmark: plan load + schedule build at 10M target samples, and loader throughput.

    python bench/data.py [--n-target 10000000] [--repeats 3] [--items 120] [--before GIT_TREE]

(a) For a 10M-sample target with 4 sources (1M each, ratios 0.1-0.4, so 20M slots):
load and verify a plan of every target sample (sha256, dataset checks) and build the
epoch's schedule, in every mode (no plan, reweight, fixed_set, dynamic). Each run is
a fresh process; peak memory is its VmHWM minus the RSS after imports. ``--before``
also times an earlier checkout of hsm (``git worktree add /tmp/before COMMIT``) on the
same plan files, in the same run, the repeats interleaved so load drifts hit both alike.
(b) Items per second through FusionDataset on the synthetic corpus, with and
without augmentation, in the main process and with 2 DataLoader workers.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("HSM_BENCH_IMPL"):
    # Time another checkout of hsm: drop the editable install's finder, import from there.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, os.environ["HSM_BENCH_IMPL"])

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from stage import stage_impl  # bench/ is on sys.path when a bench runs as a script

SOURCES = [1_000_000] * 4
RATIOS = [0.1, 0.2, 0.3, 0.4]


def _mem_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_plan(hsm_dir: Path, n: int, mode: str) -> None:
    from hsm.mining.plan import write_plan
    from hsm.schemas import PLAN_SCHEMA

    rng = np.random.default_rng(0)
    idx = np.arange(n, dtype=np.int64)
    is_hard = rng.random(n) < 0.1
    if mode == "fixed_set":  # the hard 10% plus as many regular samples weigh 1, the rest 0
        weight = (is_hard | (rng.random(n) < 0.1)).astype(np.float64)
    else:
        weight = np.where(is_hard, 3.0, 1.0) if mode == "reweight" else np.ones(n)
    table = pa.Table.from_arrays(
        [pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["target"])),
         pa.array(idx), pa.array(rng.random(n)), pa.array(np.ones(n, np.int64)), pa.array(is_hard), pa.array(weight)],
        names=PLAN_SCHEMA.names,
    )
    write_plan(hsm_dir, 1, table, {"mode": mode, "triggered": True, "default_weight": 0.0 if mode == "fixed_set" else 1.0,
                                   "hard_pool_frac": 0.3, "target_epoch_size": None,
                                   "target": {"name": "target", "size": n, "fingerprint": None}})


def child(hsm_dir: Path, n: int, with_plan: bool) -> dict:
    from hsm.mining.plan import DatasetInfo, load_plan
    from hsm.data.schedule import build_schedule

    base_rss = _mem_mb("VmRSS:")
    start = time.perf_counter()
    plan = load_plan(hsm_dir, 1, dataset=DatasetInfo("target", n)) if with_plan else None
    loaded = time.perf_counter()
    schedule = build_schedule(plan, n_target=n, source_sizes=SOURCES, source_ratios=RATIOS, seed=0, epoch=1, batch_size=8)
    done = time.perf_counter()
    return {"load_s": loaded - start, "schedule_s": done - loaded, "total_s": done - start, "slots": len(schedule),
            "peak_mb": _mem_mb("VmHWM:") - base_rss}


def loader_throughput(items: int) -> list[tuple[str, float]]:
    import torch

    from hsm.config_load import parse_config
    from hsm.data.fusion import DetectionCollator, FusionDataset
    from hsm.train.model import build_processor
    from hsm.data.sampler import HsmSampler
    from hsm.data.synth import synthesize

    corpus = synthesize(Path(tempfile.mkdtemp()) / "data", n_target=96, n_source=48, n_val=2)
    rows = []
    for aug in (False, True):
        cfg = parse_config({"custom": {"fusion_config": {
            "target": {"name": "bbu", "train_jsonl": str(corpus["bbu"])},
            "sources": [{"name": "coco", "train_jsonl": str(corpus["coco"]), "ratio": 0.25, "augmentation": {"enabled": aug}}],
            "augmentation": {"enabled": aug}}}})
        processor = build_processor(cfg.model)
        dataset = FusionDataset(cfg.custom.fusion_config, processor, cfg.model)
        sampler = HsmSampler(sizes=dataset.sizes, ratios=dataset.ratios, target=dataset.target_info, seed=0, batch_size=8)
        slots = (list(sampler) * (items // len(sampler) + 1))[:items]
        start = time.perf_counter()
        for slot in slots:
            dataset[slot]
        rows.append((f"main process, augmentation {'on' if aug else 'off'}", items / (time.perf_counter() - start)))
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2,
                                             collate_fn=DetectionCollator(processor.tokenizer.pad_token_id))
        start = time.perf_counter()
        seen = sum(len(batch["hsm_meta"].sample_id) for batch in loader)
        rows.append((f"2 workers + collate, augmentation {'on' if aug else 'off'}", seen / (time.perf_counter() - start)))
    return rows


def run_child(kind: str, hsm_dir: Path, n: int, impl: Path | None) -> dict:
    env = dict(os.environ, HSM_BENCH_IMPL=str(impl)) if impl is not None else None
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--hsm-dir", str(hsm_dir), "--n-target", str(n)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.splitlines()[-1])


def schedule_table(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="hsm-bench-data-"))
    impl = stage_impl(args.before, work) if args.before else None
    versions = ([("before", impl)] if impl is not None else []) + [("after", None)]
    cases = [("none", "none", work / "reweight" / "hsm")] + [(m, "plan", work / m / "hsm") for m in ("reweight", "fixed_set", "dynamic")]
    for mode in ("reweight", "fixed_set", "dynamic"):
        make_plan(work / mode / "hsm", args.n_target, mode)
    runs: dict[tuple[str, str], list[dict]] = {(mode, v): [] for mode, *_ in cases for v, _ in versions}
    loads = []
    for _ in range(args.repeats):  # interleaved: a load spike hits every case alike
        for mode, kind, hsm_dir in cases:
            for version, tree in versions:
                runs[mode, version].append(run_child(kind, hsm_dir, args.n_target, tree))
        loads.append(os.getloadavg()[0])
    print(f"\n(a) plan load + schedule build, target {args.n_target:,}, 4 sources x 1M, "
          f"median time of {args.repeats}, worst peak; 1-min load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"{'mode':<10} {'version':<7} {'load s':>7} {'schedule s':>11} {'total s':>8} {'slots':>11} {'peak MB':>8} "
          f"{'time vs before':>15} {'peak vs before':>15}")
    for mode, *_ in cases:
        before = None
        for version, _ in versions:
            r = runs[mode, version]
            med = {k: statistics.median(x[k] for x in r) for k in ("load_s", "schedule_s", "total_s")}
            peak = max(x["peak_mb"] for x in r)
            ratio = (f"{med['total_s'] / before[0]:15.2f} {peak / before[1]:15.2f}" if before else f"{'':>15} {'':>15}")
            print(f"{mode:<10} {version:<7} {med['load_s']:7.2f} {med['schedule_s']:11.2f} {med['total_s']:8.2f} "
                  f"{r[0]['slots']:>11,} {peak:8.0f} {ratio}")
            before = before or (med["total_s"], peak)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-target", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--before", type=Path, help="A checkout of an earlier hsm to time on the same plan files.")
    parser.add_argument("--skip-loader", action="store_true", help="Only part (a).")
    parser.add_argument("--child", choices=["plan", "none"])
    parser.add_argument("--hsm-dir", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.hsm_dir, args.n_target, args.child == "plan")))
        return
    schedule_table(args)
    if args.skip_loader:
        return
    print(f"\n(b) loader throughput on the synthetic corpus (64x64 target images), {args.items} items")
    for name, rate in loader_throughput(args.items):
        print(f"  {name:<40} {rate:8.1f} items/s")


if __name__ == "__main__":
    main()
