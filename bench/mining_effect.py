"""Does mining help? Every arm at equal optimizer steps, over seeds, on a corpus with known hard slices.

    python bench/mining_effect.py [--seeds 0 1 2] [--arms uniform reweight ...] [--epochs 6]
        [--hidden 64] [--layers 2] [--out DIR] [--doc docs/mining_effect.md]

One invocation: for every seed, synthesize the slice corpus (``hsm.data.synth.synthesize_slices``:
rare class 5%, small objects, crowded scenes, clean majority; a balanced val split; one
source), train every arm with ``hsm.run.train`` (same corpus, init, schedule seed and number
of optimizer steps), then score the final model on val with one forward pass: token
accuracy, mean token loss, coord_loss and label_loss per sample, grouped by slice.
``--detection`` also generates answers and scores them with ``hsm eval`` (when available).
Prints a table (mean ± std over seeds, and the paired difference to uniform) and writes
JSON results, the markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Mining arms: name -> custom.hard_sample_mining (None: mining off, uniform sampling).
BASE = {"enabled": True, "start_epoch": 1}
ARMS: dict[str, dict | None] = {
    "uniform": None,
    "reweight": {**BASE, "mode": "reweight", "metric": "loss", "selector": {"mode": "percentile", "value": 0.2},
                 "hard_weight": 3.0},
    "reweight_w5": {**BASE, "mode": "reweight", "metric": "loss", "selector": {"mode": "percentile", "value": 0.2},
                    "hard_weight": 5.0},
    "reweight_acc": {**BASE, "mode": "reweight", "metric": "token_acc",
                     "selector": {"mode": "percentile", "value": 0.2}, "hard_weight": 3.0},
    "reweight_coord": {**BASE, "mode": "reweight", "metric": "coord_loss",
                       "selector": {"mode": "percentile", "value": 0.2}, "hard_weight": 3.0},
    "reweight_label": {**BASE, "mode": "reweight", "metric": "label_loss",
                       "selector": {"mode": "percentile", "value": 0.2}, "hard_weight": 3.0},
    "reweight_sum": {**BASE, "mode": "reweight", "metric": "loss_sum",
                     "selector": {"mode": "percentile", "value": 0.2}, "hard_weight": 3.0},
    "reweight_epoch_ema": {**BASE, "mode": "reweight", "metric": "loss", "aggregate": "epoch_ema", "ema_decay": 0.5,
                           "selector": {"mode": "percentile", "value": 0.2}, "hard_weight": 3.0},
    "reweight_last": {**BASE, "mode": "reweight", "metric": "loss", "aggregate": "last",
                      "selector": {"mode": "percentile", "value": 0.2}, "hard_weight": 3.0},
    "fixed_set": {**BASE, "mode": "fixed_set", "metric": "loss", "hard_sample_size": 32, "regular_sample_size": 64},
    "dynamic": {**BASE, "mode": "dynamic", "hard_pool_frac": 0.3},
}
DEFAULT_ARMS = ["uniform", "reweight", "reweight_w5", "reweight_coord", "reweight_label", "reweight_sum", "reweight_epoch_ema",
                "fixed_set", "dynamic"]
STATS = ("token_acc", "loss", "coord_loss", "label_loss")


def available_arms() -> list[str]:
    """Arms whose mining config this checkout accepts (new metrics/aggregates may not have landed)."""
    from hsm.config import MiningConfig

    ok = []
    for name, mining in ARMS.items():
        try:
            if mining is not None:
                MiningConfig.model_validate(mining)
            ok.append(name)
        except ValueError:
            pass
    return ok


def run_config(corpus: dict, out: Path, mining: dict | None, args, seed: int) -> dict:
    fusion = {
        "seed": seed,
        "target": {"name": "bbu", "train_jsonl": str(corpus["bbu"]), "domain": "target"},
        "sources": [{"name": "coco", "train_jsonl": str(corpus["coco"]), "ratio": args.source_ratio}],
        "domain_prompts": {"target": {"system": "You are a detection assistant.", "user": "Detect all objects."},
                           "source": {"system": "You are a detection assistant.", "user": "Detect every object."}},
    }
    training = {
        "output_dir": str(out), "num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch,
        "learning_rate": args.lr, "lr_scheduler_type": "cosine", "warmup_steps": args.warmup, "weight_decay": 0.0,
        "logging_steps": 10_000, "save_strategy": "no", "report_to": [], "seed": seed, "data_seed": seed,
        "dataloader_num_workers": 0, "disable_tqdm": True, "use_cpu": not args.cuda, "bf16": args.cuda,
    }
    custom = {"fusion_config": fusion}
    if mining is not None:
        custom["hard_sample_mining"] = {**mining, "seed": seed}
    return {"model": {"hidden_size": args.hidden, "num_layers": args.layers, "vision_depth": args.vision_depth},
            "training": training, "custom": custom}


def evaluate(trainer, corpus: dict, slices: dict[str, str], batch_size: int) -> dict[str, dict[str, float]]:
    """Per-slice means of the per-sample val statistics, one forward pass per batch."""
    import torch

    from hsm.data.fusion import DetectionCollator, Slot
    from hsm.data.records import read_jsonl
    from hsm.train.stats import STAT_ROWS, per_sample_stats, token_losses

    dataset = trainer.train_dataset
    records = read_jsonl(corpus["bbu_val"])
    collate = DetectionCollator(trainer.processing_class.pad_token_id)
    model = trainer.model
    model.eval()
    device = next(model.parameters()).device
    rows: list[tuple[str, np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            items = [dataset.load(Slot(0, i, False, 0, i), train=False, records=records)
                     for i in range(start, min(start + batch_size, len(records)))]
            batch = collate(items)
            meta = batch.pop("hsm_meta")
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(**batch).logits
            stats = per_sample_stats(*token_losses(logits, labels), meta["token_roles"]).float().cpu().numpy()
            for j, sample_id in enumerate(meta["sample_id"]):
                rows.append((slices[sample_id], stats[:, j]))
    out: dict[str, dict[str, float]] = {}
    names = sorted({s for s, _ in rows})
    for name in names:
        values = np.stack([v for s, v in rows if s == name])
        out[name] = {stat: float(np.nanmean(values[:, STAT_ROWS.index(stat)])) for stat in STATS}
    return out


def detection(trainer, corpus: dict, slices: dict[str, str], args) -> dict[str, dict[str, float]]:
    """``hsm eval`` metrics (greedy answers scored with faster-coco-eval) overall and per slice."""
    from hsm.data.encoding import resolve_prompts
    from hsm.eval.generation import generate_answers
    from hsm.eval.metrics import score_dataset
    from hsm.eval.scoring import read_image_names
    from hsm.data.records import read_jsonl

    records = read_jsonl(corpus["bbu_val"])
    names = read_image_names(corpus["bbu_val"])
    dataset = trainer.train_dataset
    answers = generate_answers(trainer.model, dataset.template.processor, records,
                               resolve_prompts(dataset.fusion, "bbu"), max_new_tokens=args.max_new_tokens,
                               batch_size=args.eval_batch, max_image_side=dataset.fusion.max_image_side)
    out = {}
    groups = {"all": list(range(len(records)))}
    for i, record in enumerate(records):
        groups.setdefault(slices[record.id], []).append(i)
    for group, index in groups.items():
        score = score_dataset([records[i] for i in index], [names[i] for i in index], [answers[i] for i in index],
                              "rel1000")
        out[group] = {k: score.metrics.get(k) for k in ("mAP", "AP50", "AR100", "recall50", "parse_failures")}
    return out


def overall(per_slice: dict[str, dict[str, float]], shares: dict[str, float]) -> dict[str, float]:
    """Slice means weighted by the slices' train shares: the target distribution, not the balanced val."""
    return {stat: sum(shares[s] * per_slice[s][stat] for s in per_slice) / sum(shares[s] for s in per_slice)
            for stat in STATS}


def run_all(args) -> dict:
    from hsm.config import parse_config
    from hsm.run import train
    from hsm.data.synth import synthesize_slices

    work = Path(args.out or tempfile.mkdtemp(prefix="hsm-mining-effect-"))
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "runs": []}
    for seed in args.seeds:
        corpus = synthesize_slices(work / f"data-{seed}", n_train=args.n_train, n_val_per_slice=args.n_val,
                                   n_source=args.n_source, size=args.size, seed=seed)
        slice_info = json.loads(Path(corpus["slices"]).read_text())
        for arm in args.arms:
            started = time.perf_counter()
            cfg = parse_config(run_config(corpus, work / f"run-{seed}-{arm}", ARMS[arm], args, seed), f"arm {arm}")
            summary = train(cfg)
            trained = time.perf_counter() - started
            per_slice = evaluate(summary["trainer"], corpus, slice_info["val"], args.eval_batch)
            per_slice["overall"] = overall(per_slice, slice_info["shares"])
            det = detection(summary["trainer"], corpus, slice_info["val"], args) if args.detection else None
            run = {"seed": seed, "arm": arm, "global_step": summary["global_step"], "train_loss": summary["train_loss"],
                   "seconds": time.perf_counter() - started, "train_seconds": trained, "val": per_slice,
                   "detection": det}
            results["runs"].append(run)
            print(f"seed {seed} {arm:20s} steps {run['global_step']:4d}  {run['seconds']:6.1f}s  "
                  + "  ".join(f"{s} acc {v['token_acc']:.3f} loss {v['loss']:.3f}" for s, v in per_slice.items())
                  + (f"  mAP {det['all']['mAP']} AR100 {det['all']['AR100']}" if det else ""), flush=True)
            del summary
    return results


def run_parallel(args) -> dict:
    """One worker process per seed (``--jobs`` at a time, ``--threads`` torch threads each); results merged."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    work = Path(args.out or tempfile.mkdtemp(prefix="hsm-mining-effect-"))
    work.mkdir(parents=True, exist_ok=True)

    def one(seed: int) -> dict:
        out = work / f"seed-{seed}.json"
        command = [sys.executable, __file__, "--seeds", str(seed), "--jobs", "1", "--out", str(work), "--json", str(out),
                   "--worker", "--arms", *args.arms]
        for key in ("epochs", "n_train", "n_val", "n_source", "source_ratio", "size", "hidden", "layers", "vision_depth",
                    "batch", "eval_batch", "lr", "warmup", "threads", "max_new_tokens"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        command.append("--detection" if args.detection else "--no-detection")
        with open(work / f"seed-{seed}.log", "w") as log:  # warnings and tracebacks of the worker
            subprocess.run(command, check=True, stdout=sys.stdout, stderr=log)
        return json.loads(out.read_text())

    with ThreadPoolExecutor(args.jobs) as pool:
        parts = list(pool.map(one, args.seeds))
    runs = [run for part in parts for run in part["runs"]]
    return {"args": {k: v for k, v in vars(args).items() if k != "func"}, "runs": runs}


def summarize(results: dict) -> dict:
    """mean/std over seeds per arm, slice and statistic, plus the paired difference to uniform."""
    runs = results["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    slices = list(runs[0]["val"])
    table: dict = {}
    for arm in arms:
        mine = {r["seed"]: r for r in runs if r["arm"] == arm}
        base = {r["seed"]: r for r in runs if r["arm"] == "uniform"}
        for name in slices:
            for stat in STATS:
                values = [mine[s]["val"][name][stat] for s in mine]
                diffs = [mine[s]["val"][name][stat] - base[s]["val"][name][stat] for s in mine if s in base]
                table[(arm, name, stat)] = {
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
                    "diff": statistics.fmean(diffs) if diffs else float("nan"),
                    "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
                }
    return {"arms": arms, "slices": slices, "table": table}


def verdicts(summary: dict, stat: str) -> dict[str, str]:
    """The issue's goal per arm on ``stat``: a hard slice better than uniform by more than 2 std of the paired
    difference over seeds, with the overall value no worse than uniform by more than 1 std (of uniform over seeds).
    ``(unpaired)`` is added where the gain also exceeds 2 std of uniform's own spread over seeds."""
    sign = 1.0 if stat == "token_acc" else -1.0  # token_acc: higher is better; losses: lower
    out = {}
    table = summary["table"]
    for arm in summary["arms"]:
        if arm == "uniform":
            continue
        wins = []
        for name in summary["slices"]:
            if name in ("overall", "clean"):
                continue
            cell = table[(arm, name, stat)]
            gain = sign * cell["diff"]
            if gain > 0 and gain > 2 * cell["diff_std"]:
                unpaired = gain > 2 * table[("uniform", name, stat)]["std"]
                wins.append(f"{name} ({cell['diff']:+.3f}{', unpaired too' if unpaired else ''})")
        base = table[("uniform", "overall", stat)]
        overall_ok = sign * table[(arm, "overall", stat)]["diff"] >= -base["std"]
        out[arm] = ("beats uniform on " + "; ".join(wins) if wins and overall_ok
                    else ("wins on " + "; ".join(wins) + " but overall worse" if wins else "no effect"))
    return out


def markdown(results: dict, summary: dict) -> str:
    table = summary["table"]
    lines = []
    for stat, better in (("token_acc", "higher"), ("loss", "lower"), ("coord_loss", "lower"), ("label_loss", "lower")):
        lines += [f"**val {stat}** ({better} is better): mean ± std over seeds; Δ = paired difference to uniform "
                  "(mean ± std over seeds)", "",
                  "| arm | " + " | ".join(summary["slices"]) + " |", "|---" * (len(summary["slices"]) + 1) + "|"]
        for arm in summary["arms"]:
            cells = []
            for name in summary["slices"]:
                c = table[(arm, name, stat)]
                cell = f"{c['mean']:.3f} ± {c['std']:.3f}"
                if arm != "uniform":
                    cell += f"<br>Δ {c['diff']:+.3f} ± {c['diff_std']:.3f}"
                cells.append(cell)
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(r.get("detection") for r in results["runs"]):
        lines += detection_table(results, summary["arms"])
    steps = {r["arm"]: r["global_step"] for r in results["runs"]}
    seconds = {}
    for r in results["runs"]:
        seconds.setdefault(r["arm"], []).append(r["seconds"])
    lines += ["| arm | optimizer steps | seconds per run (train + eval) | verdict on val token_acc | verdict on val loss |",
              "|---|---|---|---|---|"]
    on_acc, on_loss = verdicts(summary, "token_acc"), verdicts(summary, "loss")
    for arm in summary["arms"]:
        lines.append(f"| {arm} | {steps[arm]} | {statistics.fmean(seconds[arm]):.0f} | {on_acc.get(arm, 'baseline')} "
                     f"| {on_loss.get(arm, 'baseline')} |")
    return "\n".join(lines) + "\n"


def detection_table(results: dict, arms: list[str]) -> list[str]:
    """mAP and AR@100 (``hsm eval``, faster-coco-eval) per arm and slice, mean ± std over seeds."""
    groups = list(next(r["detection"] for r in results["runs"] if r.get("detection")))
    lines = ["**val detection** (`hsm eval`: greedy answers, every box scored 1.0): mAP / AR@100, mean ± std over seeds",
             "", "| arm | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for arm in arms:
        runs = [r for r in results["runs"] if r["arm"] == arm and r.get("detection")]
        cells = []
        for group in groups:
            parts = []
            for key in ("mAP", "AR100"):
                values = [r["detection"][group][key] or 0.0 for r in runs]
                std = statistics.stdev(values) if len(values) > 1 else float("nan")
                parts.append(f"{statistics.fmean(values):.3f} ± {std:.3f}")
            cells.append(" / ".join(parts))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(summary: dict, path: Path, title: str) -> None:
    """Paired differences to uniform (mean ± std over seeds) per slice: token_acc, loss, coord_loss, label_loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    arms = [a for a in summary["arms"] if a != "uniform"]
    slices = summary["slices"]
    fig, axes = plt.subplots(1, len(STATS), figsize=(18, 4.4))
    width = 0.8 / max(len(arms), 1)
    for ax, stat in zip(axes, STATS):
        for k, arm in enumerate(arms):
            means = [table[(arm, s, stat)]["diff"] for s in slices]
            stds = [table[(arm, s, stat)]["diff_std"] for s in slices]
            ax.bar(np.arange(len(slices)) + k * width, means, width, yerr=stds, label=arm, capsize=2)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(slices)) + 0.4 - width / 2, slices)
        better = "higher" if stat == "token_acc" else "lower"
        ax.set_title(f"Δ val {stat} vs uniform ({better} is better)", fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title + " — paired difference to uniform, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_ARMS)} (those available)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-val", type=int, default=24, help="val images per slice")
    parser.add_argument("--n-source", type=int, default=32)
    parser.add_argument("--source-ratio", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--detection", action=argparse.BooleanOptionalAction, default=True,
                        help="also generate on val and score with hsm eval (mAP, AR)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--jobs", type=int, default=3, help="seeds trained in parallel worker processes")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--doc", type=Path, default=None, help="write the markdown table here (and the PNG beside it)")
    parser.add_argument("--label", default="CPU", help="name of this configuration in the doc/plot")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a run_parallel child: no table
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render the table/doc/plot from a saved --json instead of training")
    args = parser.parse_args()
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        render(results, args)
        return
    import torch

    torch.set_num_threads(args.threads)
    args.cuda = torch.cuda.is_available()
    ok = available_arms()
    if args.arms is None:
        args.arms = [a for a in DEFAULT_ARMS if a in ok]
    missing = [a for a in args.arms if a not in ok]
    if missing:
        parser.error(f"arms not supported by this checkout's MiningConfig: {missing}")
    if "uniform" not in args.arms:
        args.arms = ["uniform", *args.arms]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    results = run_parallel(args) if args.jobs > 1 and len(args.seeds) > 1 else run_all(args)
    results["total_seconds"] = time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if not args.worker:
        render(results, args)


def render(results: dict, args) -> None:
    summary = summarize(results)
    text = markdown(results, summary)
    print(text)
    if "total_seconds" in results:
        print(f"total {results['total_seconds']:.0f} s for {len(results['runs'])} runs")
    if args.doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(text)
        setup = results["args"]
        plot(summary, args.doc.with_suffix(".png"), f"{args.label}: hidden {setup['hidden']}, {setup['layers']} layers, "
             f"{results['runs'][0]['global_step']} steps, seeds {setup['seeds']}")


if __name__ == "__main__":
    main()
