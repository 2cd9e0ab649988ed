"""Entry point for the 2-rank eval test: ``torchrun --nproc_per_node 2 tests/dist_eval.py CORPUS OUT``."""

import json
import sys

import torch.distributed as dist

from hsm.config_load import load_config
from hsm.eval.evaluate import evaluate_model, select_datasets
from hsm.train import distributed
from hsm.train.model import build_model, build_processor

corpus, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
cfg = load_config("configs/demo.yaml", [f"custom.fusion_config.target.val_jsonl={corpus}/bbu/val.jsonl"])
processor = build_processor(cfg.model)
model = build_model(cfg.model, processor.tokenizer)
fusion = cfg.custom.fusion_config
results = evaluate_model(model, processor, fusion, select_datasets(fusion, ["target"]), out, "rel1000",
                         max_new_tokens=3, batch_size=2, max_samples=3)
with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
    json.dump({"datasets": sorted(results)}, f)
distributed.destroy_process_group()  # barrier first: rank 1 is done while rank 0 still scores
