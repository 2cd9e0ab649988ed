"""Peak memory of training a Qwen-VL checkpoint in full vs with LoRA (and frozen towers), through ``hsm train``.

    python bench/model_memory.py [--arch qwen2_5_vl] [--hidden 512] [--layers 8] [--steps 6]

Builds one tiny real-architecture checkpoint, then trains it once per variant, each in a fresh process
(``hsm.run.train`` with mining on, batch 4, AdamW). Peak memory is the process's peak RSS on CPU, or
``torch.cuda.max_memory_allocated`` when a GPU is present. Ratios are against the full fine-tune measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "full fine-tune": [],
    "full, frozen vision + aligner": ["model.freeze_vision=true", "model.freeze_aligner=true"],
    "LoRA r=16 (all-linear)": ["model.lora={r: 16, alpha: 32}"],
    "LoRA r=16, frozen vision": ["model.lora={r: 16, alpha: 32}", "model.freeze_vision=true"],
    "LoRA r=16 + activation checkpointing": ["model.lora={r: 16, alpha: 32}", "training.gradient_checkpointing=true"],
}

CHILD = r"""
import json, resource, sys, torch
from hsm.config_load import load_config
from hsm.run import train
cfg = load_config(sys.argv[1], sys.argv[2:])
summary = train(cfg)
model = summary["trainer"].model
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"peak_mb": peak, "trainable": trainable, "total": total, "steps": summary["global_step"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    import torch

    from hsm.train.model import build_checkpoint
    from hsm.data.synth import synthesize

    cuda = torch.cuda.is_available()

    work = Path(tempfile.mkdtemp(prefix="hsm-bench-mem-"))
    checkpoint = build_checkpoint(work / "ckpt", args.arch, hidden_size=args.hidden, num_layers=args.layers,
                                  vision_depth=args.vision_depth, max_pixels=256 * 256)
    corpus = synthesize(work / "data", n_target=32, n_source=8, n_val=1, size=128)
    base = [f"custom.fusion_config.target.train_jsonl={corpus['bbu']}", "custom.fusion_config.target.val_jsonl=null",
            f"custom.fusion_config.sources.0.train_jsonl={corpus['lvis']}",
            f"custom.fusion_config.sources.1.train_jsonl={corpus['coco']}", f"model.name_or_path={checkpoint}",
            "model.image_max_pixels=65536", "training.per_device_train_batch_size=4", "training.report_to=[]",
            "training.save_strategy='no'", f"training.max_steps={args.steps}", "training.logging_steps=1000",
            "custom.fusion_config.augmentation.enabled=false", f"training.use_cpu={str(not cuda).lower()}"]
    config = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    rows = []
    for i, (name, extra) in enumerate(VARIANTS.items()):
        out = [f"training.output_dir={work / f'run{i}'}"]
        overrides = base + out + extra
        proc = subprocess.run([sys.executable, "-c", CHILD, str(config), *overrides], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append((name, json.loads(line[7:])))
        print(name, rows[-1][1], flush=True)
    full = dict(rows)["full fine-tune"]["peak_mb"]
    where = "GPU max allocated" if cuda else "peak RSS"
    print(f"\n{args.arch}, hidden {args.hidden}, {args.layers} layers, vision depth {args.vision_depth}, "
          f"{args.steps} steps, batch 4 ({where})\n")
    print("| variant | trainable params | peak MB | x full |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['trainable'] / 1e6:.2f}M of {r['total'] / 1e6:.2f}M | {r['peak_mb']:.0f} | {r['peak_mb'] / full:.2f} |")


if __name__ == "__main__":
    main()
