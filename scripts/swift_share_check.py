"""Source shares of ``swift sft`` with the hsm plugin, on real data: tree crowns of one NEON site as the target,
the other sites as a COCO-format source (issue 18).

The deepforest wheel ships annotated aerial images of three NEON sites (YELL, OSBS, SOAP; see
``scripts/deepforest_coco.py``). This script, run with ``.venv-swift``'s Python:

1. cuts them into COCO chips with ``scripts/deepforest_coco.py`` (200 px for the target, 100 px for the source,
   so the two small OSBS/SOAP tiles give more than a handful of rows), splits each ``instances.json`` by image
   file-name prefix (``2019_YELL_`` -> target ``yell``; ``OSBS_``, ``SOAP_`` -> source ``osbs_soap``), imports
   both with ``hsm data import-coco`` and writes ms-swift's grounding JSONL (even rows ``bbox_2d`` JSON answers,
   odd rows ``objects`` rows: ``hsm.integrations.swift.write_grounding_jsonl``);
2. runs the real ``swift sft`` CLI with ``--dataset yell.jsonl osbs_soap.jsonl#N`` on the tiny Qwen3-VL
   (``build_checkpoint(path, "qwen3_vl")``) with the flags of ``swift_sft`` in ``tests/integrations/test_swift.py``, mining on
   (reweight, ``coord_loss``, start_epoch 1, percentile 0.2, hard_weight 3);
3. checks the run with ``hsm sql`` over its hsm dir and prints each query and its table: per epoch and dataset
   the rows drawn (target = its size, source = N exactly), ``drawn_as_hard`` never true for the source, the
   plans hold target rows only, hard target rows are drawn more often than regular ones in epochs >= 1 and
   each draw's ``drawn_as_hard`` equals the plan's ``is_hard``, sample ids ``<dataset>:<base_idx>`` with the
   source's ``base_idx`` in ``[0, N)`` (on N ranks a share may lack only the fewer than N last slots of an
   epoch, which hsm, as ms-swift, does not deal); and it ties the ids to files with ms-swift's own
   ``load_dataset``. Exits 1 if any check fails. Results: ``docs/swift_real_share.md``.

    .venv-swift/bin/python scripts/swift_share_check.py --work /tmp/swiftshare --source-n 50 --epochs 3
    .venv-swift/bin/python scripts/swift_share_check.py --work /tmp/swiftshare --source-n 50 --epochs 3 --ranks 2
    .venv-swift/bin/python scripts/swift_share_check.py --ranks 2 --check-only   # the existing run

The ``swift sft`` command it runs (printed in full), in short::

    HSM_CONFIG=hsm.yaml swift sft --model tiny-qwen3-vl --model_type qwen3_vl --template hsm_tiny_qwen3_vl \\
        --dataset swift_data/yell.jsonl swift_data/osbs_soap.jsonl#50 --split_dataset_ratio 0 ... \\
        --external_plugins "$(python -m hsm.integrations.swift)" tests/integrations/swift_plugins/tiny_qwen3_vl_template.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_PLUGIN = REPO / "tests" / "integrations" / "swift_plugins" / "tiny_qwen3_vl_template.py"
BIN = Path(sys.executable).parent
TARGET, SOURCE = "yell", "osbs_soap"
# entry -> (chip side, file-name prefixes of its site(s))
SPLITS = {TARGET: (200, ("2019_YELL_",)), SOURCE: (100, ("OSBS_", "SOAP_"))}
BATCH = 4
HSM_YAML = (
    "custom:\n"
    "  hard_sample_mining: {enabled: true, mode: reweight, metric: coord_loss, start_epoch: 1,"
    " selector: {mode: percentile, value: 0.2}, hard_weight: 3.0}\n"
    f"  fusion_config: {{target: {{name: {TARGET}}}}}\n"
)


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {shlex.join(map(str, command))}\n{result.stdout[-3000:]}"
                 f"\n{result.stderr[-6000:]}")
    return result


def split_coco(coco_json: Path, prefixes: tuple[str, ...], out: Path) -> dict:
    """The images whose file name starts with one of ``prefixes`` and their annotations, as a COCO file."""
    coco = json.loads(coco_json.read_text())
    images = [im for im in coco["images"] if im["file_name"].startswith(prefixes)]
    ids = {im["id"] for im in images}
    subset = {"images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
              "categories": coco["categories"]}
    out.write_text(json.dumps(subset))
    return subset


def prepare(work: Path, wheel: Path) -> dict[str, Path]:
    """COCO chips per site -> ``hsm data import-coco`` -> ms-swift JSONL; returns entry -> ms-swift JSONL."""
    from hsm.integrations.swift import write_grounding_jsonl

    out = {}
    for name, (chip, prefixes) in SPLITS.items():
        coco_dir = work / f"coco{chip}"
        if not (coco_dir / "instances.json").exists():
            print(run([BIN / "python", REPO / "scripts" / "deepforest_coco.py", wheel, coco_dir, "--chip", chip]).stdout,
                  end="")
        (work / "coco").mkdir(parents=True, exist_ok=True)
        subset = split_coco(coco_dir / "instances.json", prefixes, work / "coco" / f"{name}.json")
        hsm_jsonl, swift_file = work / "hsm_data" / f"{name}.jsonl", work / "swift_data" / f"{name}.jsonl"
        swift_file.parent.mkdir(parents=True, exist_ok=True)
        result = run([BIN / "hsm", "data", "import-coco", work / "coco" / f"{name}.json", "--images",
                      coco_dir / "images", "--out", hsm_jsonl, "--id-prefix", name])
        print(f"$ hsm data import-coco coco/{name}.json ...\n{result.stdout.strip()}")
        rows = write_grounding_jsonl(hsm_jsonl, swift_file)
        print(f"{name}: {len(subset['images'])} chips ({chip} px, {', '.join(prefixes)}), "
              f"{len(subset['annotations'])} boxes -> {rows} rows in {swift_file}")
        out[name] = swift_file
    return out


def swift_sft(work: Path, name: str, data: dict[str, Path], n_source: int, epochs: int, ranks: int) -> tuple[Path, float]:
    from hsm.integrations.swift import plugin_path
    from hsm.train.model import build_checkpoint

    checkpoint = work / "tiny-qwen3-vl"
    if not (checkpoint / "config.json").exists():
        build_checkpoint(checkpoint, "qwen3_vl")
    config = work / "hsm.yaml"
    config.write_text(HSM_YAML)
    out = work / "runs" / name
    if out.exists():
        shutil.rmtree(out)
    command = [
        BIN / "swift", "sft", "--model", checkpoint, "--model_type", "qwen3_vl",
        "--template", "hsm_tiny_qwen3_vl", "--dataset", data[TARGET], f"{data[SOURCE]}#{n_source}",
        "--split_dataset_ratio", "0",
        "--tuner_type", "full", "--num_train_epochs", epochs, "--per_device_train_batch_size", BATCH,
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--warmup_ratio", "0", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--use_cpu", "true", "--check_model", "false",
        "--seed", "0", "--output_dir", out, "--dataset_shuffle", "false",
        "--external_plugins", plugin_path(), TEMPLATE_PLUGIN,
    ]
    env = {**os.environ, "HSM_CONFIG": str(config), "OMP_NUM_THREADS": "1"}
    prefix = f"HSM_CONFIG={config} OMP_NUM_THREADS=1 "
    if ranks > 1:  # ms-swift's own launcher re-runs itself under torchrun
        env.update(NPROC_PER_NODE=str(ranks), MASTER_PORT=str(29500 + os.getpid() % 1000))
        prefix += f"NPROC_PER_NODE={ranks} "
    print(f"$ {prefix}{shlex.join(map(str, command))}", flush=True)
    start = time.monotonic()
    result = run(command, env=env, timeout=3600)
    wall = time.monotonic() - start
    (out / "swift_sft.log").write_text(result.stdout + result.stderr)
    (run_dir,) = out.glob("v*-*")
    print(f"swift sft: {wall:.0f} s wall, run dir {run_dir}")
    return run_dir, wall


def sql(run_dir: Path, query: str, *, show: bool = True) -> list[dict]:
    """Run ``hsm sql -e`` on the run: print the command, the query and its table; return the rows."""
    base = [BIN / "hsm", "sql", "--run-dir", run_dir, "-e", query]
    if show:
        print(f"\n$ hsm sql --run-dir {run_dir} -e \"$Q\"\n{query.strip()}\n")
        print(run(base + ["--format", "table", "--limit", "1000"]).stdout.rstrip())
    return json.loads(run(base + ["--format", "json"]).stdout)


def file_coverage(run_dir: Path, data: dict[str, Path], n_source: int) -> list[str]:
    """Tie the events' ids to files: ms-swift's own ``load_dataset`` with the run's dataset flags (``--data_seed``
    42, ``--dataset_shuffle false``, ``--split_dataset_ratio 0``) and hsm's ``provenance`` give each entry's
    ``base_idx -> image``; print per epoch how many distinct source files the source draws reached."""
    from swift.dataset import load_dataset

    from hsm.integrations.swift import provenance

    train, _ = load_dataset([str(data[TARGET]), f"{data[SOURCE]}#{n_source}"], split_dataset_ratio=0.0,
                            shuffle=False, seed=42, num_proc=1)
    target_rows, sources = provenance(train, TARGET)
    image = [row[0]["path"] for row in train["images"]]
    lines = [json.loads(line)["images"][0] for line in data[TARGET].open()]
    problems = [] if [image[i] for i in target_rows] == lines else [f"{TARGET}: base_idx k is not line k of the file"]
    source_files = [image[i] for i in sources[0].rows]
    n_files = sum(1 for _ in data[SOURCE].open())
    print(f"\nms-swift's train set (load_dataset, data_seed 42): {TARGET} base_idx k = line k of {data[TARGET].name}: "
          f"{not problems}; {SOURCE} #{n_source}: {len(source_files)} rows over {len(set(source_files))} of its "
          f"{n_files} files")
    draws = sql(run_dir, f"SELECT epoch, base_idx, count(*) AS n FROM events WHERE dataset = '{SOURCE}' "
                         "GROUP BY epoch, base_idx", show=False)
    print("epoch  source_draws  distinct_base_idx  distinct_files")
    for epoch in sorted({r["epoch"] for r in draws}):
        rows = [r for r in draws if r["epoch"] == epoch]
        files = {source_files[r["base_idx"]] for r in rows}
        print(f"{epoch:5d}  {sum(r['n'] for r in rows):12d}  {len(rows):17d}  {len(files):9d} of {n_files}")
    return problems


SHARES = """
SELECT epoch, dataset, count(*) AS draws, count(DISTINCT base_idx) AS distinct_rows,
       min(base_idx) AS min_idx, max(base_idx) AS max_idx,
       count(*) FILTER (WHERE drawn_as_hard) AS drawn_as_hard, count(DISTINCT rank) AS ranks
FROM events GROUP BY epoch, dataset ORDER BY epoch, dataset
"""
PLANS = """
SELECT epoch, dataset, count(*) AS plan_rows, count(*) FILTER (WHERE is_hard) AS hard,
       round(min(weight), 3) AS min_weight, round(max(weight), 3) AS max_weight
FROM plans GROUP BY epoch, dataset ORDER BY epoch, dataset
"""
HARD_DRAWS = """
WITH d AS (SELECT epoch, base_idx, count(*) AS n, bool_or(drawn_as_hard) AS any_hard,
                  bool_and(drawn_as_hard) AS all_hard
           FROM events WHERE dataset = '{target}' GROUP BY epoch, base_idx)
SELECT p.epoch, p.is_hard, count(*) AS plan_rows, count(d.n) AS rows_drawn, coalesce(sum(d.n), 0) AS draws,
       round(avg(coalesce(d.n, 0)), 3) AS mean_draws, min(coalesce(d.n, 0)) AS min_draws,
       max(coalesce(d.n, 0)) AS max_draws,
       count(*) FILTER (WHERE d.n > 0 AND (d.any_hard <> p.is_hard OR d.all_hard <> p.is_hard)) AS flag_mismatch
FROM plans p LEFT JOIN d ON d.epoch = p.epoch AND d.base_idx = p.base_idx
WHERE p.dataset = '{target}' AND p.epoch IN (SELECT DISTINCT epoch FROM events)
GROUP BY p.epoch, p.is_hard ORDER BY p.epoch, p.is_hard
"""
IDS = """
SELECT dataset, count(DISTINCT base_idx) AS base_idx_values, count(DISTINCT sample_id) AS sample_ids,
       count(DISTINCT (base_idx, sample_id)) AS pairs,
       count(*) FILTER (WHERE sample_id <> dataset || ':' || base_idx) AS malformed_ids,
       min(base_idx) AS min_idx, max(base_idx) AS max_idx
FROM events GROUP BY dataset ORDER BY dataset
"""


def check(run_dir: Path, sizes: dict[str, int], n_source: int, epochs: int) -> list[str]:
    """Run the queries; the list of failed checks (empty when every share and id holds).

    On N ranks hsm deals the schedule as ms-swift's ``BatchSamplerShard`` would: no slot twice, and the
    ``slots % N`` last slots of an epoch (fewer than N) not trained; those are the only draws a share may lack.
    """
    problems = []
    shares = sql(run_dir, SHARES)
    want = {TARGET: sizes[TARGET], SOURCE: n_source}
    world = max(r["ranks"] for r in shares)
    undealt = sum(want.values()) % world
    for epoch in range(epochs):
        got = {r["dataset"]: r for r in shares if r["epoch"] == epoch}
        if set(got) != set(want):
            problems.append(f"epoch {epoch}: datasets {sorted(got)} drawn, expected {sorted(want)}")
            continue
        short = {name: count - got[name]["draws"] for name, count in want.items()}
        if any(v < 0 for v in short.values()) or sum(short.values()) != undealt:
            problems.append(f"epoch {epoch}: draws {({n: got[n]['draws'] for n in want})}, shares {want} "
                            f"({undealt} last slot(s) undealt on {world} ranks)")
        if SOURCE in got and got[SOURCE]["drawn_as_hard"]:
            problems.append(f"epoch {epoch}: {got[SOURCE]['drawn_as_hard']} source draws marked drawn_as_hard")
        if epoch == 0 and TARGET in got and got[TARGET]["distinct_rows"] != sizes[TARGET]:
            problems.append(f"epoch 0: {got[TARGET]['distinct_rows']} distinct target rows, not {sizes[TARGET]}")
    plans = sql(run_dir, PLANS)
    if {r["dataset"] for r in plans} != {TARGET}:
        problems.append(f"plans hold datasets {sorted({r['dataset'] for r in plans})}, expected only {TARGET}")
    for r in plans:
        if r["dataset"] == TARGET and (r["plan_rows"] != sizes[TARGET] or not r["hard"]):
            problems.append(f"plan epoch {r['epoch']}: {r['plan_rows']} target rows, {r['hard']} hard")
    if sorted(r["epoch"] for r in plans) != list(range(1, epochs + 1)):
        problems.append(f"plans for epochs {sorted(r['epoch'] for r in plans)}, expected 1..{epochs}")
    draws = sql(run_dir, HARD_DRAWS.format(target=TARGET))
    for epoch in range(1, epochs):
        by_hard = {r["is_hard"]: r for r in draws if r["epoch"] == epoch}
        if set(by_hard) != {True, False}:
            problems.append(f"epoch {epoch}: no hard/regular split in the draws {by_hard}")
            continue
        if not by_hard[True]["mean_draws"] > by_hard[False]["mean_draws"]:
            problems.append(f"epoch {epoch}: hard rows drawn {by_hard[True]['mean_draws']} times on average, "
                            f"regular {by_hard[False]['mean_draws']}")
        if by_hard[True]["flag_mismatch"] or by_hard[False]["flag_mismatch"]:
            problems.append(f"epoch {epoch}: drawn_as_hard disagrees with the plan's is_hard")
    for r in sql(run_dir, IDS):
        if r["malformed_ids"] or not r["base_idx_values"] == r["sample_ids"] == r["pairs"]:
            problems.append(f"{r['dataset']}: ids not one sample_id '<dataset>:<base_idx>' per base_idx: {r}")
        if r["dataset"] == SOURCE and not (r["min_idx"] >= 0 and r["max_idx"] < n_source):
            problems.append(f"{SOURCE}: base_idx outside [0, {n_source}): {r}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, default=Path("/tmp/wheels/deepforest-2.1.0-py3-none-any.whl"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/swiftshare"), help="work folder (data, runs)")
    parser.add_argument("--source-n", type=int, default=50, help="the source entry's #N")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=1, help="NPROC_PER_NODE (gloo on CPU)")
    parser.add_argument("--name", help="run name under WORK/runs (default: ranks<R>)")
    parser.add_argument("--check-only", action="store_true", help="check the existing run, do not train")
    args = parser.parse_args()
    name = args.name or f"ranks{args.ranks}"
    data = prepare(args.work, args.wheel)
    sizes = {k: sum(1 for _ in p.open()) for k, p in data.items()}
    print(f"target {TARGET}: {sizes[TARGET]} rows; source {SOURCE}: {sizes[SOURCE]} rows, #{args.source_n} "
          f"({args.source_n / sizes[TARGET]:.0%} of the target)")
    if args.check_only:
        (run_dir,) = (args.work / "runs" / name).glob("v*-*")
    else:
        run_dir, _ = swift_sft(args.work, name, data, args.source_n, args.epochs, args.ranks)
    problems = check(run_dir, sizes, args.source_n, args.epochs) + file_coverage(run_dir, data, args.source_n)
    print()
    for problem in problems:
        print(f"FAIL: {problem}")
    print("shares: FAIL" if problems else
          f"shares: OK ({TARGET} {sizes[TARGET]}, {SOURCE} {args.source_n} per epoch; hard set target-only)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
