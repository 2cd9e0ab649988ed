"""Entry point of the 2-rank tests: ``torchrun --nproc_per_node 2 tests/dist_train.py CORPUS OUT [--tap] [KEY=VALUE ...]``.

``OUT`` may hold ``{rank}``: each rank then gets its own output directory, as nodes
without a shared file system do. Every rank writes ``OUT/rank{R}.json`` with what
the test compares: the Trainer's log history, the plan checksums it was told, the
launcher facts. With ``--tap`` the Trainer is :func:`step_tap.tapped`, and every rank also
writes ``OUT/rank{R}.safetensors``: each micro-batch's loss (``loss.K``) and every gradient
after DDP's all-reduce (``grad.S.NAME``), for the bit-identity test.
"""

import json
import os
import sys
from pathlib import Path

from transformers import Trainer

from hsm.config_load import load_config
from hsm.run import train
from step_tap import save_step, tapped

corpus, out, extra = sys.argv[1], sys.argv[2].replace("{rank}", os.environ.get("RANK", "0")), sys.argv[3:]
tap = extra[:1] == ["--tap"]
extra = extra[tap:]
cfg = load_config("configs/demo.yaml", [
    f"custom.fusion_config.target.train_jsonl={corpus}/bbu/train.jsonl", "custom.fusion_config.target.val_jsonl=null",
    f"custom.fusion_config.sources.0.train_jsonl={corpus}/lvis/train.jsonl",
    f"custom.fusion_config.sources.1.train_jsonl={corpus}/coco/train.jsonl",
    f"training.output_dir={out}", "training.num_train_epochs=3", "training.per_device_train_batch_size=4",
    "training.save_strategy='no'", "training.report_to=[]", "training.logging_steps=1", *extra,
])
summary = train(cfg, base_trainer=tapped(Trainer) if tap else None)
trainer = summary["trainer"]
if tap:
    save_step(trainer, Path(out) / f"rank{trainer.args.process_index}.safetensors")
sampler = trainer.mining.sampler
engine = getattr(trainer, "model_wrapped", None)
zero_stage = engine.zero_optimization_stage() if trainer.is_deepspeed_enabled else None
with open(Path(out) / f"rank{trainer.args.process_index}.json", "w") as f:
    json.dump({"expected": {str(k): v for k, v in sampler._expected.items()}, "steps": summary["global_step"],
               "deepspeed": trainer.is_deepspeed_enabled, "zero_stage": zero_stage,
               "backend": __import__("torch").distributed.get_backend(),
               "log_history": trainer.state.log_history}, f)
from hsm.train import distributed  # noqa: E402

if __name__ == "__main__":  # tests/dist_runs.py runs several in one launch and tears down once, after the last
    distributed.destroy_process_group()
