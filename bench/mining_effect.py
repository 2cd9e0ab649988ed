"""Does mining make the detector better? Every arm at equal optimizer steps, over seeds, scored in mAP per slice.

    python bench/mining_effect.py --preset cpu [--seeds 0 1 2] [--arms uniform loss ...] [--jobs 2]
        [--out DIR] [--doc docs/mining_effect.md]
    python bench/mining_effect.py --from-dir DIR --doc docs/mining_effect.md   # re-render what DIR holds

For every seed the grid corpus (``hsm.data.synth.synthesize_grid``: hard slices known by
construction, a label-noise slice) is written once; every (seed, arm) is one worker process
that trains through ``hsm.run.train`` (the real Trainer, sampler and planner), generates
greedy answers on val and scores them per slice with faster-coco-eval (``hsm.eval``). Each
run writes ``DIR/runs/seed-S-ARM.json`` as it finishes, so an interrupted experiment keeps
its finished runs and a re-run skips them. The summary gives, per arm and slice, mAP50, mAP
and recall@0.5 (mean ± std over seeds) and the paired difference to uniform (same corpus,
init and schedule seed), supervised tokens, seconds, the det_f1 pass's cost and the
label-noise suspects' precision and recall.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # 16 visual tokens (64 px, patch 8, merge 2: one token per grid cell), 0.98M parameters;
    # 10 epochs of 4,000 images = 2,500 steps (9 plans). 1,750 steps left two of three seeds short of
    # clean mAP50 0.5 (docs/mining_effect.md, History).
    "cpu": {"size": 64, "patch": 8, "n_train": 4000, "n_val": 48, "hidden": 128, "layers": 4, "vision_depth": 2,
            "vision_hidden": 64, "batch": 16, "lr": 3e-3, "warmup": 100, "epochs": 10, "eval_batch": 96,
            "max_new_tokens": 200, "det_every": 3, "curve_from": 5},
    # Not run yet (no GPU in the session that wrote it): 128 px (64 visual tokens), a wider model, more steps.
    "gpu": {"size": 128, "patch": 8, "n_train": 40000, "n_val": 200, "hidden": 384, "layers": 8, "vision_depth": 4,
            "vision_hidden": 128, "batch": 64, "lr": 1e-3, "warmup": 500, "epochs": 8, "eval_batch": 256,
            "max_new_tokens": 400, "det_every": 2, "curve_from": 4},
    # A smoke test of the whole path in a minute (learns nothing).
    "smoke": {"size": 64, "patch": 8, "n_train": 64, "n_val": 4, "hidden": 32, "layers": 1, "vision_depth": 1,
              "vision_hidden": 16, "batch": 16, "lr": 3e-3, "warmup": 2, "epochs": 3, "eval_batch": 24,
              "max_new_tokens": 40, "det_every": 1, "curve_from": 2},
}
SELECT = {"selector": {"mode": "percentile", "value": 0.2}, "hard_weight": 3.0}
BASE = {"enabled": True, "start_epoch": 1}
# Arm -> custom.hard_sample_mining (None: no mining, the fusion sampler's uniform schedule).
ARMS: dict[str, dict | None] = {
    "uniform": None,
    "loss": {**BASE, "mode": "reweight", "metric": "loss", **SELECT},
    "loss_sum": {**BASE, "mode": "reweight", "metric": "loss_sum", **SELECT},
    "coord_loss": {**BASE, "mode": "reweight", "metric": "coord_loss", **SELECT},
    "label_loss": {**BASE, "mode": "reweight", "metric": "label_loss", **SELECT},
    "det_f1": {**BASE, "mode": "reweight", "metric": "det_f1", "aggregate": "last", **SELECT},
    "dynamic": {**BASE, "mode": "dynamic", "hard_pool_frac": 0.2},
    # The pool (the 400 hardest, 10%) is half the per-batch share (20%): each pooled image is drawn twice an epoch.
    "dynamic_k400": {**BASE, "mode": "dynamic", "hard_pool_frac": 0.2, "hard_pool_k": 400},
    "fixed_set": {**BASE, "mode": "fixed_set", "metric": "loss", "hard_sample_size": 800, "regular_sample_size": 1600},
    "loss_suspects": {**BASE, "mode": "reweight", "metric": "loss", "exclude_suspects": True, **SELECT},
}
# In order of priority (an experiment cut short keeps the first ones).
DEFAULT_ARMS = ["uniform", "loss", "det_f1", "coord_loss", "label_loss", "loss_sum", "loss_suspects", "dynamic", "fixed_set"]
METRICS = ("AP50", "mAP", "recall50")


def corpus_paths(out: Path, seed: int, preset: dict) -> dict[str, Path]:
    """The seed's corpus under ``out/data-S`` (written on first use)."""
    from hsm.data.synth import synthesize_grid

    root = out / f"data-{seed}"
    if (root / "bbu" / "slices.json").is_file():
        return {"bbu": root / "bbu/train.jsonl", "bbu_val": root / "bbu/val.jsonl", "slices": root / "bbu/slices.json"}
    return synthesize_grid(root, n_train=preset["n_train"], n_val_per_slice=preset["n_val"], size=preset["size"],
                           seed=seed)


def run_config(corpus: dict, out: Path, mining: dict | None, preset: dict, seed: int, cuda: bool) -> dict:
    """The ``hsm train`` config of one arm (the tiny model sized by the preset)."""
    # Short prompts: the tiny tokenizer spells them letter by letter, and every prompt token is compute
    # (the long pair was 57 of a clean sample's ~174 tokens).
    prompts = {"system": "Detector.", "user": "Detect."}
    fusion = {"seed": seed, "target": {"name": "bbu", "train_jsonl": str(corpus["bbu"]), "domain": "target"},
              "domain_prompts": {"target": prompts}, "max_image_side": preset["size"]}
    training = {
        "output_dir": str(out), "num_train_epochs": preset["epochs"], "per_device_train_batch_size": preset["batch"],
        "learning_rate": preset["lr"], "lr_scheduler_type": "cosine", "warmup_steps": preset["warmup"],
        "weight_decay": 0.0, "logging_steps": 100, "save_strategy": "no", "report_to": [], "seed": seed,
        "data_seed": seed, "dataloader_num_workers": 0, "disable_tqdm": True, "use_cpu": not cuda, "bf16": cuda,
    }
    custom: dict = {"fusion_config": fusion}
    if mining is not None:
        custom["hard_sample_mining"] = {**mining, "seed": seed}
        if mining.get("metric") == "det_f1":
            custom["det_f1"] = {"every": preset["det_every"], "batch_size": preset["eval_batch"],
                                "max_new_tokens": preset["max_new_tokens"]}
    pixels = preset["size"] ** 2
    model = {"hidden_size": preset["hidden"], "num_layers": preset["layers"], "vision_depth": preset["vision_depth"],
             "vision_hidden_size": preset["vision_hidden"], "patch_size": preset["patch"],
             "image_min_pixels": pixels, "image_max_pixels": pixels}
    return {"model": model, "training": training, "custom": custom}


def counting_trainer(curve: dict | None = None):
    """A ``transformers.Trainer`` that counts the supervised tokens it trains on.

    With ``curve`` (``corpus``, ``slices``, ``shares``, ``preset``, ``from_epoch``), it also scores
    val at the end of every epoch from ``from_epoch`` on (greedy answers, no training RNG drawn)
    and keeps ``(global_step, overall, clean, supervised_tokens)`` in ``trainer.curve`` (mAP50s and the
    tokens trained on so far): the steps an arm needs to reach uniform's final mAP50, and its mAP50 at
    uniform's token count.
    """
    from transformers import Trainer, TrainerCallback

    class CurveCallback(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_epoch_end(self, args, state, control, **kwargs):
            if curve is None or state.epoch is None or round(state.epoch) < curve["from_epoch"]:
                return
            import torch

            rng = torch.get_rng_state()
            per_slice = detection(self.trainer, curve["corpus"], curve["slices"], curve["preset"])
            torch.set_rng_state(rng)
            total = overall(per_slice, curve["shares"])
            self.trainer.curve.append((state.global_step, total["AP50"], per_slice["clean"]["AP50"],
                                       self.trainer.supervised_tokens))

    class CountingTrainer(Trainer):
        supervised_tokens = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.curve: list[tuple[int, float, float, int]] = []
            if curve is not None:
                self.add_callback(CurveCallback(self))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.supervised_tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return CountingTrainer


def detection(trainer, corpus: dict, slices: dict[str, str], preset: dict) -> dict[str, dict[str, float]]:
    """mAP50 / mAP / recall@0.5 of greedy answers on val, per slice (faster-coco-eval via ``hsm.eval``)."""
    from hsm.data.encoding import resolve_prompts
    from hsm.data.records import read_jsonl
    from hsm.eval.generation import generate_answers
    from hsm.eval.metrics import score_dataset
    from hsm.eval.scoring import read_image_names

    records, names = read_jsonl(corpus["bbu_val"]), read_image_names(corpus["bbu_val"])
    dataset = trainer.train_dataset
    order = sorted(range(len(records)), key=lambda k: len(records[k].objects))  # equal answer lengths per batch
    generated = generate_answers(trainer.model, dataset.template.processor, [records[k] for k in order],
                                 resolve_prompts(dataset.fusion, "bbu"), max_new_tokens=preset["max_new_tokens"],
                                 batch_size=preset["eval_batch"], max_image_side=dataset.fusion.max_image_side)
    answers: list[str] = [""] * len(records)
    for k, answer in zip(order, generated):
        answers[k] = answer
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(slices[record.id], []).append(i)
    out = {}
    for group, index in groups.items():
        score = score_dataset([records[i] for i in index], [names[i] for i in index], [answers[i] for i in index],
                              "rel1000")
        out[group] = {k: float(score.metrics.get(k) or 0.0) for k in METRICS}
    return out


def overall(per_slice: dict[str, dict[str, float]], shares: dict[str, float]) -> dict[str, float]:
    """The target distribution: slice metrics weighted by train shares (noise images are clean ones on val)."""
    weights = {name: shares.get(name, 0.0) + (shares.get("noise", 0.0) if name == "clean" else 0.0) for name in per_slice}
    total = sum(weights.values())
    return {k: sum(weights[s] * per_slice[s][k] for s in per_slice) / total for k in METRICS}


def last_hard_ids(hsm_dir: Path, epochs: int) -> set[str] | None:
    """Sample ids of the hard set of the last plan training used (``None`` without one), read through hsm's verified readers."""
    from hsm.mining.plan import read_plan_table
    from hsm.mining.plan_table import hard_set
    from hsm.mining.state import read_sample_ids

    if not (hsm_dir / "plans" / f"epoch={epochs - 1}").is_dir():
        return None
    _, plan = read_plan_table(hsm_dir, epochs - 1, columns=["base_idx", "is_hard"])
    ids = read_sample_ids(hsm_dir, epochs - 1).to_pydict()
    sample_id = dict(zip(ids["base_idx"], ids["sample_id"]))
    return {sample_id[i] for i in hard_set(plan)}


def suspects_found(hsm_dir: Path, epochs: int, noise: set[str]) -> dict | None:
    """The data map's label-noise suspects (on loss) against the injected noise, and noise in the last hard set."""
    from hsm.mining.suspects import data_map, read_epoch_metrics

    if not (hsm_dir / "events").is_dir():
        return None
    dm = data_map(read_epoch_metrics(hsm_dir, range(epochs), "bbu", "loss"))
    found = {str(s) for s in np.asarray(dm.sample_id)[dm.is_suspect]} if hasattr(dm, "sample_id") else set()
    hit = len(found & noise)
    out = {"n_suspects": len(found), "precision": hit / len(found) if found else 0.0, "recall": hit / len(noise)}
    hard = last_hard_ids(hsm_dir, epochs)
    if hard is not None:
        out["hard_set_noise_share"] = len(hard & noise) / len(hard) if hard else 0.0
    return out


def train_one(seed: int, arm: str, preset: dict, out: Path) -> dict:
    """Train one arm on one seed, score it on val; the run's result row."""
    import torch

    from hsm.config_load import parse_config
    from hsm.run import train

    corpus = corpus_paths(out, seed, preset)
    info = json.loads(Path(corpus["slices"]).read_text())
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    cfg = parse_config(run_config(corpus, out / f"run-{seed}-{arm}", ARMS[arm], preset, seed, cuda), f"arm {arm}")
    curve = None
    if preset.get("curve_from", 0) > 0 and ARMS[arm] is not None:  # mining arms only: uniform needs its final value
        curve = {"corpus": corpus, "slices": info["val"], "shares": info["shares"], "preset": preset,
                 "from_epoch": int(preset["curve_from"])}
    summary = train(cfg, base_trainer=counting_trainer(curve))
    trainer = summary["trainer"]
    trained = time.perf_counter() - started
    per_slice = detection(trainer, corpus, info["val"], preset)
    per_slice["overall"] = overall(per_slice, info["shares"])
    det_cost = [getattr(c, "seconds", None) for c in trainer.callback_handler.callbacks
                if type(c).__name__ == "DetF1Callback"]
    return {"seed": seed, "arm": arm, "global_step": summary["global_step"], "train_loss": summary["train_loss"],
            "train_seconds": trained, "seconds": time.perf_counter() - started, "val": per_slice,
            "supervised_tokens": trainer.supervised_tokens, "det_f1_seconds": det_cost[0] if det_cost else None,
            "suspects": suspects_found(Path(summary["hsm_dir"]), preset["epochs"], set(info["noise"])),
            "threads": torch.get_num_threads(), "curve": trainer.curve}


def run_parallel(args, preset: dict) -> None:
    """Every (seed, arm) not yet in ``out/runs`` as one worker process, ``--jobs`` at a time, seed-major."""
    out = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        corpus_paths(out, seed, preset)  # once, before workers share it
    # Arm-major: an interrupted experiment leaves whole arms (every seed, paired with uniform), not whole seeds.
    tasks = [(s, a) for a in args.arms for s in args.seeds if not (out / "runs" / f"seed-{s}-{a}.json").is_file()]

    def one(task: tuple[int, str]) -> None:
        seed, arm = task
        command = [sys.executable, __file__, "--worker", "--preset", args.preset, "--seeds", str(seed), "--arms", arm,
                   "--out", str(out), "--threads", str(args.threads), "--epochs", str(preset["epochs"]),
                   "--set", *[f"{k}={v}" for k, v in preset.items()]]
        with open(out / "runs" / f"seed-{seed}-{arm}.log", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{time.strftime('%H:%M:%S')} seed {seed} {arm}: {'done' if code == 0 else f'FAILED ({code})'}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, tasks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, choices=sorted(ARMS), help=f"default: {' '.join(DEFAULT_ARMS)}")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (equal for every arm)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override preset keys (numbers), e.g. --set n_train=4000 lr=0.005")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--jobs", type=int, default=1, help="workers at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/mining_effect"), help="work directory (resumable)")
    parser.add_argument("--doc", type=Path, default=None, help="write the markdown tables here (and the PNG beside it)")
    parser.add_argument("--from-dir", type=Path, default=None, help="only render the runs a work directory holds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_dir is not None:
        from bench.mining_effect_report import render

        render(args.from_dir, args.doc)
        return
    preset = dict(PRESETS[args.preset])
    if args.epochs is not None:
        preset["epochs"] = args.epochs
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in preset:
            parser.error(f"--set {item}: no preset key {key!r} (keys: {', '.join(sorted(preset))})")
        preset[key] = type(preset[key])(float(value)) if isinstance(preset[key], int) else float(value)
    args.arms = args.arms or DEFAULT_ARMS
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        row = train_one(args.seeds[0], args.arms[0], preset, args.out)
        row["preset"] = {**preset, "name": args.preset}
        path = args.out / "runs" / f"seed-{row['seed']}-{row['arm']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(row, indent=1))
        path.with_suffix(".tmp").replace(path)
        print(json.dumps({k: row[k] for k in ("seed", "arm", "global_step", "seconds")}), row["val"]["clean"], flush=True)
        return
    if "uniform" not in args.arms:
        args.arms = ["uniform", *args.arms]
    started = time.perf_counter()
    run_parallel(args, preset)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    from bench.mining_effect_report import render

    render(args.out, args.doc)


if __name__ == "__main__":
    main()
