"""Planner benchmark: fold + select + write at 1M and 10M events, against a naive
per-event Python tracker and a bare DuckDB group-by over the same files (the floor).

    python bench/planner.py [--sizes 1000000 10000000] [--repeats 3] [--workdir DIR] [--before GIT_DIR_OR_TREE]

Each measurement runs in a fresh subprocess so its peak RSS is its own. Prints a
table with ratios against the floor measured in the same run. ``--before`` also
times an earlier version of hsm (a checkout, e.g. ``git worktree add /tmp/before
COMMIT``) on the same event files, in the same run, each version with its own state.
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
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stage import stage_impl  # bench/ is on sys.path when a bench runs as a script
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.mining.events import PART_WRITE_OPTIONS, list_event_files
from hsm.schemas import EVENT_SCHEMA

TARGET, SOURCES = "target", ("lvis", "coco")
PART_ROWS = 1 << 20


def epoch_events(rng, epoch: int, n_events: int, n_target: int) -> list[pa.Table]:
    """One epoch as training logs it: 85% target (5% of samples shown twice, as reweighting does), 15% sources."""
    n_tgt = int(n_events * 0.85)
    base = rng.permutation(n_target)[: int(n_tgt * 0.95)]
    base = np.concatenate([base, base[: n_tgt - len(base)]])
    datasets = [np.full(n_tgt, 0)]
    idx = [base]
    for code, _ in enumerate(SOURCES, start=1):
        m = (n_events - n_tgt) // len(SOURCES)
        datasets.append(np.full(m, code))
        idx.append(rng.integers(0, n_target // 10, m))
    code = np.concatenate(datasets)
    idx = np.concatenate(idx).astype(np.int64)
    order = rng.permutation(len(idx))
    code, idx = code[order], idx[order]
    names = pa.array([TARGET, *SOURCES])
    dataset = pa.DictionaryArray.from_arrays(pa.array(code.astype(np.int32)), names).cast(pa.string())
    sample_id = pc.binary_join_element_wise(dataset, pc.cast(pa.array(idx), pa.string()), ":")
    n = len(idx)
    hard = (idx % 17 == 0) & (code == 0)
    loss = (rng.gamma(2.0, 0.4, n) + hard * 1.5).astype(np.float32)
    n_tok = rng.integers(20, 400, n).astype(np.int32)
    acc = (np.round(rng.beta(8, 2, n) * n_tok) / n_tok).astype(np.float32)
    step = (np.arange(n) // 16).astype(np.int64) + epoch * (n // 16 + 1)
    rank = ((np.arange(n) // 8) % 2).astype(np.int32)
    table = pa.table(
        {
            "run_id": pa.array(["bench-run"] * 1).take(pa.array(np.zeros(n, dtype=np.int32))),
            "attempt": np.zeros(n, np.int32), "epoch": np.full(n, epoch, np.int32), "global_step": step,
            "rank": rank, "position": (np.arange(n) % 8).astype(np.int32), "dataset": dataset,
            "base_idx": idx, "sample_id": sample_id, "loss": loss, "token_acc": acc, "n_tokens": n_tok,
            "aug_seed": rng.integers(0, 2**31, n), "drawn_as_hard": hard,
            # Box-aware columns, as a detection run logs them.
            "coord_loss": (loss * 0.6).astype(np.float32), "label_loss": (loss * 0.4).astype(np.float32),
            "loss_sum": (loss * n_tok).astype(np.float32),
            "det_f1": pa.nulls(n, pa.float32()),  # logged only by det_f1 runs
        },
        schema=EVENT_SCHEMA,
    )
    return [table.filter(pc.equal(table.column("rank"), r)) for r in (0, 1)]


def generate(workdir: Path, n_events: int) -> Path:
    hsm_dir = workdir / f"run-{n_events}" / "hsm"
    if (hsm_dir / "ready").exists():
        return hsm_dir
    shutil.rmtree(hsm_dir.parent, ignore_errors=True)
    rng = np.random.default_rng(0)
    n_target = n_events
    for epoch in (0, 1):
        for rank, table in enumerate(epoch_events(rng, epoch, n_events, n_target)):
            out = hsm_dir / "events" / f"epoch={epoch}" / f"rank={rank}"
            out.mkdir(parents=True, exist_ok=True)
            for part, start in enumerate(range(0, table.num_rows, PART_ROWS)):
                pq.write_table(table.slice(start, PART_ROWS), out / f"part-{part:05d}.parquet", compression_level=3, **PART_WRITE_OPTIONS)
    (hsm_dir / "ready").touch()
    return hsm_dir


def generate_wide(workdir: Path, n_events: int, n_samples: int) -> Path:
    """One epoch of ``n_events`` over ``n_samples`` distinct samples (85% target), written part by part."""
    hsm_dir = workdir / f"wide-{n_events}-{n_samples}" / "hsm"
    if (hsm_dir / "ready").exists():
        return hsm_dir
    shutil.rmtree(hsm_dir.parent, ignore_errors=True)
    rng = np.random.default_rng(1)
    names = pa.array([TARGET, *SOURCES])
    step = 0
    for part in range(-(-n_events // PART_ROWS)):
        n = min(PART_ROWS, n_events - part * PART_ROWS)
        rank = part % 2
        code = rng.choice(3, size=n, p=[0.85, 0.075, 0.075]).astype(np.int32)
        idx = np.where(code == 0, rng.integers(0, int(n_samples * 0.85), n), rng.integers(0, int(n_samples * 0.075), n))
        dataset = pa.DictionaryArray.from_arrays(pa.array(code), names).cast(pa.string())
        loss = rng.gamma(2.0, 0.4, n).astype(np.float32)
        table = pa.table({
            "run_id": pa.array(["bench-run"]).take(pa.array(np.zeros(n, dtype=np.int32))),
            "attempt": np.zeros(n, np.int32), "epoch": np.zeros(n, np.int32),
            "global_step": (np.arange(n) // 8 + step).astype(np.int64), "rank": np.full(n, rank, np.int32),
            "position": (np.arange(n) % 8).astype(np.int32), "dataset": dataset, "base_idx": idx.astype(np.int64),
            "sample_id": pc.binary_join_element_wise(dataset, pc.cast(pa.array(idx), pa.string()), ":"),
            "loss": loss, "token_acc": np.full(n, 0.5, np.float32), "n_tokens": np.full(n, 100, np.int32),
            "aug_seed": np.zeros(n, np.int64), "drawn_as_hard": np.zeros(n, bool),
        }, schema=pa.schema([f for f in EVENT_SCHEMA if not f.nullable]))
        if rank == 1:
            step += -(-n // 8)
        out = hsm_dir / "events" / "epoch=0" / f"rank={rank}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / f"part-{part // 2:05d}.parquet", compression_level=3, **PART_WRITE_OPTIONS)
    (hsm_dir / "ready").touch()
    return hsm_dir


def _mining(engine: str):
    from hsm.config import MiningConfig

    return MiningConfig(enabled=True, engine=engine, selector={"mode": "percentile", "value": 0.1})


def measure(kind: str, hsm_dir: Path, sample: int) -> dict:
    """Run one measurement in this process; returns seconds and peak RSS.

    Modules are imported before the clock starts (every row alike): the rows time the
    work, not the interpreter loading DuckDB or hsm. That includes pandas: pyarrow imports
    it on its first array conversion (0.4-1.3 s on the development VM), which every
    process that plans pays once, whatever it does.
    """
    if kind == "pyarrow-first-array":  # what the warm-up below keeps off the clock
        import pyarrow as pa_cold

        start = time.perf_counter()
        pa_cold.array([0])
        return {"seconds": time.perf_counter() - start, "rss_mb": _rss_mb()}
    import pyarrow as pa_warm

    pa_warm.array([0])  # pyarrow's lazy pandas import, before the clock
    import duckdb  # noqa: F401
    import filelock  # noqa: F401  (the run lock's library, imported by plan_epoch on first use)
    import hsm.mining.engines.duckdb_engine  # noqa: F401  (every engine's library: polars, duckdb)
    import hsm.mining.engines.numpy_engine  # noqa: F401
    import hsm.mining.engines.polars_engine  # noqa: F401
    import hsm.mining.planner  # noqa: F401

    start, cpu = time.perf_counter(), time.process_time()
    extra = {}
    if kind == "fold-0":
        from hsm.mining.update import fold_pending

        if not (hsm_dir / "state" / "epoch=0" / "state.parquet").exists():
            fold_pending(hsm_dir, 0, _mining("polars"))
    elif kind.startswith("hsm1-"):
        from hsm.mining.events import list_event_files as files_of
        from hsm.mining.fold import DEFAULT_MEMORY_LIMIT, buckets_for

        buckets = buckets_for(files_of(hsm_dir, 0), None, DEFAULT_MEMORY_LIMIT)
        return _timed_plan(hsm_dir, 1, kind[5:], start, cpu, buckets=buckets)
    elif kind.startswith("duckdb-scan"):
        extra = {"groups": _duckdb_groups(list_event_files(hsm_dir, 0 if kind.endswith("-0") else 1))}
    elif kind.startswith("hsm-"):
        phases = _timed_phases() if os.environ.get("HSM_BENCH_PHASES") else None
        return _timed_plan(hsm_dir, 2, kind[4:], start, cpu, phases=phases)
    elif kind == "naive-dict":
        # The seeds' design: a dict of running stats per sample_id, updated per event.
        files = list_event_files(hsm_dir, 1)
        table = pa.concat_tables([pq.read_table(f, columns=["sample_id", "loss"]) for f in files]).slice(0, sample)
        ids, losses = table.column("sample_id").to_pylist(), table.column("loss").to_pylist()
        start, cpu = time.perf_counter(), time.process_time()  # time the tracker, not the read
        tracker: dict[str, list] = {}
        decay = 0.9
        for sid, loss in zip(ids, losses):
            entry = tracker.get(sid)
            if entry is None:
                tracker[sid] = [1, loss, loss, loss]
            else:
                entry[0] += 1
                entry[1] += loss
                entry[2] = decay * entry[2] + (1 - decay) * loss
                entry[3] = loss
        extra = {"events_timed": len(ids)}
    elif kind == "append":
        tmp = Path(tempfile.mkdtemp())
        writer = EventWriter(tmp, run_id="bench", rank=0)
        batch = 8
        ids = [f"target:{i}" for i in range(batch)]
        names = [TARGET] * batch
        arrays = [np.arange(batch), np.ones(batch, np.float32), np.ones(batch, np.float32), np.full(batch, 10), np.arange(batch), np.zeros(batch, bool)]
        calls = sample // batch
        start = time.perf_counter()
        for step in range(calls):
            writer.append(EventBatch(epoch=0, global_step=step, dataset=names, base_idx=arrays[0], sample_id=ids,
                                     loss=arrays[1], token_acc=arrays[2], n_tokens=arrays[3], aug_seed=arrays[4],
                                     drawn_as_hard=arrays[5]))
        seconds = time.perf_counter() - start
        writer.close()
        shutil.rmtree(tmp)
        return {"seconds": seconds, "per_sample_us": seconds / (calls * batch) * 1e6, "rss_mb": _rss_mb()}
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu, "rss_mb": _rss_mb(), **extra}


def _timed_plan(hsm_dir: Path, epoch: int, engine: str, start: float, cpu: float, **extra) -> dict:
    """``plan_epoch`` for ``epoch`` with ``engine``; seconds since ``start`` (wall) and ``cpu`` (CPU
    seconds of every thread: steadier than wall on a shared machine), peak RSS and the files' digest."""
    from hsm.mining.planner import PlanRequest, plan_epoch

    result = plan_epoch(PlanRequest(hsm_dir, epoch, _mining(engine), TARGET))
    seconds = time.perf_counter() - start
    digest = _digest(hsm_dir / "plans" / f"epoch={epoch}" / "plan.parquet",
                     hsm_dir / "state" / f"epoch={epoch - 1}" / "state.parquet")
    return {"seconds": seconds, "cpu": time.process_time() - cpu, "rss_mb": _rss_mb(),
            "hard": result.manifest["counts"]["hard"], "digest": digest, **extra}


def _duckdb_groups(files: list[Path]) -> int:
    """The floor: a bare DuckDB group-by of the events by ``sample_id``."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads TO 2")
    query = "SELECT count(*) FROM (SELECT sample_id, sum(loss), count(*) FROM read_parquet($f) GROUP BY sample_id)"
    return con.execute(query, {"f": [str(p) for p in files]}).fetchone()[0]


def _digest(*paths: Path) -> str:
    """sha256 over the bytes of ``paths``: equal digests mean byte-identical plan and state."""
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_PHASES = ("read_state", "fold_table", "read_epoch_events", "fold_in_memory", "fold_out_of_core", "write_sample_ids",
           "disk_table", "write_state", "build_plan_table", "write_plan")


def _timed_phases() -> dict[str, float]:
    """Wrap the planner's phases (attributes of the modules that call them) to sum their wall seconds into the returned dict."""
    import functools
    import importlib
    import importlib.util

    totals: dict[str, float] = {}
    callers = [importlib.import_module(m) for m in ("hsm.mining.planner", "hsm.mining.update", "hsm.mining.plan_table")
               if importlib.util.find_spec(m) is not None]
    for planner, name in ((module, name) for module in callers for name in _PHASES):
        inner = getattr(planner, name, None)
        if inner is None:
            continue

        @functools.wraps(inner)
        def timed(*args, _inner=inner, _name=name, **kwargs):
            begin = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - begin

        setattr(planner, name, timed)
    return totals


def _rss_mb() -> float:
    # VmHWM is this process image's own peak; ru_maxrss would include the parent's peak at fork.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ewm_parity(n_samples: int = 20_000, k: int = 4) -> list[tuple[float, int]]:
    """Polars' ``ewm_mean(alpha=1 - decay, adjust=False)`` against the state's rule, per decay.

    Each sample's observations are seeded with a carried EMA as the first value; returns
    ``(decay, samples whose result differs in any bit)``. Why the Polars engine folds
    observations 2..k with a numpy loop instead (hsm.mining.engines.polars_engine).
    """
    import polars as pl

    rng = np.random.default_rng(0)
    out = []
    for decay in (0.5, 0.75, 0.9, 0.99):
        x, seed = rng.random((n_samples, k)), rng.random(n_samples)
        ema = seed.copy()
        for j in range(k):
            ema = decay * ema + (1.0 - decay) * x[:, j]
        frame = pl.DataFrame({"g": np.repeat(np.arange(n_samples), k + 1),
                              "x": np.concatenate([seed[:, None], x], axis=1).ravel()})
        polars_ema = frame.group_by("g", maintain_order=True).agg(
            pl.col("x").ewm_mean(alpha=1.0 - decay, adjust=False).last()).get_column("x").to_numpy()
        out.append((decay, int(np.count_nonzero(polars_ema != ema))))
    return out


def before_dir(hsm_dir: Path) -> Path:
    """A run directory for the earlier version: the same event files (linked), its own state."""
    other = hsm_dir.parent.with_name(hsm_dir.parent.name + "-before") / "hsm"
    other.mkdir(parents=True, exist_ok=True)
    if not (other / "events").exists():
        (other / "events").symlink_to(hsm_dir / "events")
    return other


def run_child(kind: str, hsm_dir: Path, sample: int, impl: Path | None = None, *, phases: bool = False) -> dict:
    for epoch in (1,):
        shutil.rmtree(hsm_dir / "state" / f"epoch={epoch}", ignore_errors=True)
        shutil.rmtree(hsm_dir / "sample_ids" / f"epoch={epoch}", ignore_errors=True)
    shutil.rmtree(hsm_dir / "plans", ignore_errors=True)
    env = dict(os.environ, **({"HSM_BENCH_IMPL": str(impl)} if impl is not None else {}),
               **({"HSM_BENCH_PHASES": "1"} if phases else {}))
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--hsm-dir", str(hsm_dir), "--sample", str(sample)],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_previous_state(hsm_dir: Path, impl: Path | None = None) -> None:
    if impl is not None:
        run_child("fold-0", hsm_dir, 0, impl)
        return
    from hsm.mining.update import fold_pending

    fold_pending(hsm_dir, 0, _mining("polars")).wait()  # reuses a stored, current state


def wide(args) -> None:
    """The out-of-core case: a fresh state from one epoch of many events, with the default fold budget."""
    n_events, n_samples = args.wide
    hsm_dir = generate_wide(args.workdir, n_events, n_samples)
    after = stage_impl(args.impl, args.workdir, "after-impl") if args.impl else None
    rows = [("duckdb-scan", run_child("duckdb-scan-0", hsm_dir, 0))]
    for engine in args.wide_engines:
        shutil.rmtree(hsm_dir / "state", ignore_errors=True)
        shutil.rmtree(hsm_dir / "sample_ids", ignore_errors=True)
        rows.append((f"hsm-{engine}", run_child(f"hsm1-{engine}", hsm_dir, 0, after)))
    floor = rows[0][1]["seconds"]
    digests = {r["digest"] for name, r in rows[1:]}
    print(f"\n{n_events:,} events, {n_samples:,} samples, one epoch, folded from scratch")
    if len(rows) > 2:
        print(f"engine parity (plan + state sha256): {'byte-identical' if len(digests) == 1 else 'DIFFERENT'} {' '.join(sorted(digests))}")
    print(f"{'measure':<16} {'seconds':>9} {'x floor':>8} {'peak RSS MB':>12} {'buckets':>8}")
    for name, r in rows:
        print(f"{name:<16} {r['seconds']:>9.1f} {r['seconds'] / floor:>8.2f} {r['rss_mb']:>12.0f} {r.get('buckets', '-'):>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-sample", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hsm-bench-planner")
    parser.add_argument("--child")
    parser.add_argument("--hsm-dir", type=Path)
    parser.add_argument("--sample", type=int, default=0)
    parser.add_argument("--before", type=Path, help="A checkout of an earlier hsm to time on the same files.")
    parser.add_argument("--impl", type=Path, help="Time this checkout as 'after' (default: the installed hsm).")
    parser.add_argument("--wide", type=int, nargs=2, metavar=("EVENTS", "SAMPLES"),
                        help="Instead: one epoch of EVENTS events over SAMPLES samples, folded out of core.")
    parser.add_argument("--wide-engines", nargs="+", default=["polars"])
    parser.add_argument("--engines", nargs="+", default=["polars", "duckdb", "numpy"],
                        help="Engines of the installed (or --impl) hsm to time; the first is the parity reference.")
    parser.add_argument("--phases", action="store_true", help="Also time the planner's phases in one more after run.")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.hsm_dir, args.sample)))
        return
    if args.wide:
        return wide(args)
    rows, parity, phase_rows = [], [], []
    impl = stage_impl(args.before, args.workdir) if args.before else None
    after = stage_impl(args.impl, args.workdir, "after-impl") if args.impl else None
    for size in args.sizes:
        hsm_dir = generate(args.workdir, size)
        ensure_previous_state(hsm_dir, after)
        if impl is not None:
            ensure_previous_state(before_dir(hsm_dir), impl)
        files = list_event_files(hsm_dir, 1)
        n_events = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        bytes_per_event = sum(f.stat().st_size for f in files) / n_events
        results = {}
        kinds = [("duckdb-scan", "duckdb-scan", hsm_dir, None)]
        if impl is not None:
            kinds += [(f"before: {k}", k, before_dir(hsm_dir), impl) for k in ("hsm-polars", "hsm-duckdb")]
        kinds += [(f"hsm-{e}", f"hsm-{e}", hsm_dir, after) for e in args.engines]
        # Interleave the repeats so machine load drifts hit every measurement alike.
        runs: dict[str, list] = {label: [] for label, *_ in kinds}
        for _ in range(args.repeats):
            for label, kind, directory, version in kinds:
                runs[label].append(run_child(kind, directory, 0, version))
        for label, measured in runs.items():
            results[label] = {"seconds": statistics.median(r["seconds"] for r in measured),
                              "cpu": statistics.median(r["cpu"] for r in measured),
                              "rss_mb": max(r["rss_mb"] for r in measured)}
        digests = set().union(*({r["digest"] for r in runs[f"hsm-{e}"]} for e in args.engines))
        parity.append((size, len(digests) == 1, sorted(digests)))
        if args.phases:
            phase_rows.append((size, run_child("hsm-polars", hsm_dir, 0, after, phases=True)))
        sample = min(args.naive_sample, n_events)
        naive = run_child("naive-dict", hsm_dir, sample)
        results["naive-dict"] = {"seconds": naive["seconds"] * n_events / sample, "cpu": naive["cpu"] * n_events / sample,
                                 "rss_mb": naive["rss_mb"], "extrapolated": sample < n_events}
        floor, cpu_floor = results["duckdb-scan"]["seconds"], results["duckdb-scan"]["cpu"]
        for kind, r in results.items():
            rows.append((size, kind, r["seconds"], r["seconds"] / floor, results["naive-dict"]["seconds"] / r["seconds"],
                         r["rss_mb"], r.get("extrapolated", False), r["cpu"], r["cpu"] / cpu_floor))
        rows.append((size, "bytes/event on disk", bytes_per_event, None, None, None, False, None, None))
    append = run_child("append", args.workdir, 800_000)
    first_array = run_child("pyarrow-first-array", args.workdir, 0)
    print(f"\n{'events':>10} {'measure':<26} {'seconds':>9} {'x floor':>8} {'vs naive':>9} {'peak RSS MB':>12} "
          f"{'CPU s':>8} {'CPU x floor':>12}")
    for size, kind, seconds, ratio, speedup, rss, extrapolated, cpu, cpu_ratio in rows:
        if ratio is None:
            print(f"{size:>10} {kind:<26} {seconds:>9.1f}")
            continue
        mark = "*" if extrapolated else ""
        print(f"{size:>10} {kind:<26} {seconds:>8.2f}{mark} {ratio:>8.2f} {speedup:>8.1f}x {rss:>12.0f} {cpu:>8.2f} {cpu_ratio:>12.2f}")
    for size, same, digests in parity:
        print(f"{size:>10} engine parity (plan + state sha256, {', '.join(args.engines)}, every repeat): "
              f"{'byte-identical' if same else 'DIFFERENT'} {' '.join(digests)}")
    for size, measured in phase_rows:
        phases = measured["phases"] or {}
        print(f"{size:>10} phases of one hsm-polars run ({measured['seconds']:.2f} s; write_state runs beside the plan): "
              + ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items()))
    print("\nPolars ewm_mean(alpha=1-decay, adjust=False) vs the state's rule, 20000 samples of 4 observations: "
          + ", ".join(f"decay {d}: {n} differ" for d, n in ewm_parity()))
    print(f"\npyarrow's first array in a fresh process (its lazy pandas import; kept off every row's clock): "
          f"{first_array['seconds']:.2f} s")
    print(f"\nEventWriter.append on the calling thread: {append['per_sample_us']:.2f} us per sample (batches of 8)")
    print("* extrapolated linearly from a subsample; floor = bare DuckDB group-by over the same files")


if __name__ == "__main__":
    main()
