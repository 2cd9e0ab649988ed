"""Training-step overhead of hsm: plain Trainer vs the hsm Trainer, interleaved on one model.

    python bench/train_overhead.py [--hidden 512] [--layers 8] [--batch 4] [--steps 40] [--bf16]

Both trainers share the same weights and the same pre-collated batches; each round
runs one ``training_step`` (forward + backward) of every variant, in rotating order,
and gradients are cleared in between, so the variants see identical work. The hsm
variant includes everything it does on the training path: metadata stripping,
per-sample statistics, and the periodic device-to-host drain into the event writer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hsm.config import MiningConfig

from hsm.config_load import parse_config
from hsm.data.fusion import DetectionCollator, FusionDataset
from hsm.train.model import build_model, build_processor
from hsm.data.sampler import HsmSampler
from hsm.data.synth import synthesize
from hsm.layout import RunPaths
from hsm.train.session import MiningSession
from hsm.train.trainer import make_trainer_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="hsm-bench-train-"))
    corpus = synthesize(work / "data", n_target=64, n_source=32, n_val=2)
    cfg = parse_config({"model": {"hidden_size": args.hidden, "num_layers": args.layers, "vision_depth": 2},
                        "custom": {"fusion_config": {"target": {"name": "bbu", "train_jsonl": str(corpus["bbu"])},
                                                     "sources": [{"name": "coco", "train_jsonl": str(corpus["coco"]), "ratio": 0.25}]}}})
    processor = build_processor(cfg.model)
    model = build_model(cfg.model, processor.tokenizer)
    dataset = FusionDataset(cfg.custom.fusion_config, processor, cfg.model)
    sampler = HsmSampler(sizes=dataset.sizes, ratios=dataset.ratios, target=dataset.target_info, seed=0, batch_size=args.batch)
    slots = list(sampler)
    collate = DetectionCollator(processor.tokenizer.pad_token_id)
    n_batches = min(len(slots) // args.batch, args.steps)
    batches = [collate([dataset[s] for s in slots[i * args.batch:(i + 1) * args.batch]]) for i in range(n_batches)]

    targs = TrainingArguments(output_dir=str(work / "out"), report_to=[], use_cpu=not cuda, bf16=args.bf16,
                              per_device_train_batch_size=args.batch)
    mining = MiningConfig(enabled=True)
    variants = {"plain": Trainer(model=model, args=targs)}
    for name in ("hsm",):
        trainer = make_trainer_class(Trainer, mining=True)(model=model, args=targs)
        session = MiningSession(sampler=sampler, fusion=cfg.custom.fusion_config, mining=mining,
                                paths=RunPaths.at(work / name / "hsm"), run_id=name)
        trainer.use_session(session)
        session.start(None)  # no claim (start=None): opens the event writer
        variants[name] = trainer
    model = variants["plain"].model  # moved to the device by the Trainer
    for trainer in variants.values():
        trainer.current_gradient_accumulation_steps = 1  # set by the train loop, which this bench bypasses
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, int] = {k: 0 for k in variants}
    names = list(variants)
    for round_ in range(args.warmup + args.steps):
        batch = batches[round_ % len(batches)]
        n_items = int((batch["labels"][:, 1:] != -100).sum())
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            inputs = dict(batch) if name != "plain" else {k2: v for k2, v in batch.items() if k2 != "hsm_meta"}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            variants[name].training_step(model, inputs, num_items_in_batch=torch.tensor(n_items))
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if round_ >= args.warmup:
                times[name].append(elapsed)
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
    for name in names[1:]:
        variants[name].mining.close()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    base = statistics.median(times["plain"])
    print(f"\ndevice: {device}; hidden {args.hidden}, {args.layers} layers, batch {args.batch}, "
          f"bf16 {args.bf16}, {args.steps} timed rounds, tokens/batch ~{int(batches[0]['input_ids'].numel())}")
    print(f"{'variant':<10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'ratio':>7} {'peak MiB':>9}")
    for name in names:
        t = sorted(times[name])
        peak = f"{peaks[name] / 2**20:9.0f}" if cuda else "      n/a"
        print(f"{name:<10} {statistics.median(t) * 1e3:10.2f} {t[len(t) // 10] * 1e3:8.2f} {t[(9 * len(t)) // 10] * 1e3:8.2f} "
              f"{statistics.median(t) / base:7.3f} {peak}")


if __name__ == "__main__":
    main()
