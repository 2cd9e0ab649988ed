"""Entry point of TRL's 2-rank test: ``torchrun --nproc_per_node 2 tests/dist_trl.py CHECKPOINT JSONL OUT EPOCHS MINING``.

``HsmSFTTrainer`` (``MINING`` ``on`` or ``off``) on the tiny Qwen3-VL, batch 2 per rank; every rank writes
``OUT/rank{R}.json`` with its log history and the plan checksums its sampler was told.

``MINING`` ``identity``: one optimizer step (2 micro-batches of 2 rows per rank) of a tapped ``HsmSFTTrainer``
with mining on, then of a tapped plain ``SFTTrainer`` fed the rows hsm drew, in the order that gives every rank
the same micro-batches (accelerate deals a sequential loader's batches round robin); every rank writes
``OUT/{hsm,plain}-rank{R}.safetensors`` with each micro-batch's loss (``loss.K``) and every gradient after DDP's
all-reduce (``grad.S.NAME``).
"""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

from hsm.config import MiningConfig, SelectorConfig
from hsm.data.synth import DEFAULT_PROMPTS
from hsm.integrations.trl import HsmSFTTrainer, detection_dataset
from hsm.train import distributed
from step_tap import in_order, save_step, tapped

checkpoint, jsonl, out, epochs, mining = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
system, user = DEFAULT_PROMPTS["target"]
config = MiningConfig(enabled=True, mode="reweight", metric="loss", start_epoch=1,
                      selector=SelectorConfig(mode="top_k", k=2), hard_weight=3.0)
dataset = detection_dataset(jsonl, system=system, user=user)


def sft_args(folder: Path) -> SFTConfig:
    args = SFTConfig(output_dir=str(folder), num_train_epochs=epochs, per_device_train_batch_size=2, learning_rate=0.01,
                     lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     seed=0, max_length=None, dataloader_num_workers=0)
    if mining == "identity":
        args.max_steps, args.max_grad_norm, args.gradient_accumulation_steps = 1, 0.0, 2
    return args


def drawn_order(hsm_dir: Path, world_size: int, batch: int) -> list[int]:
    """The rows hsm's step drew, ordered so that dealing batches of ``batch`` round robin gives each rank its own."""
    parts = sorted((hsm_dir / "events" / "epoch=0").glob("rank=*/*.parquet"))
    events = pa.concat_tables([pq.read_table(p, columns=["rank", "position", "base_idx"]) for p in parts]).to_pylist()
    per_rank = [[e["base_idx"] for e in sorted((e for e in events if e["rank"] == r), key=lambda e: e["position"])]
                for r in range(world_size)]
    n_batches = len(per_rank[0]) // batch
    return [i for k in range(n_batches) for r in range(world_size) for i in per_rank[r][k * batch:(k + 1) * batch]]


processor = AutoProcessor.from_pretrained(checkpoint)
trainer_class = tapped(HsmSFTTrainer) if mining == "identity" else HsmSFTTrainer
trainer = trainer_class(model=AutoModelForImageTextToText.from_pretrained(checkpoint), args=sft_args(out),
                        train_dataset=dataset, processing_class=processor,
                        mining=None if mining == "off" else config, dataset_name="bbu")
trainer.train()
rank = trainer.args.process_index
if mining == "identity":
    save_step(trainer, out / f"hsm-rank{rank}.safetensors")
    dist.barrier()  # every rank's events are on disk
    order = drawn_order(out / "hsm", dist.get_world_size(), 2)
    plain = tapped(in_order(SFTTrainer))(model=AutoModelForImageTextToText.from_pretrained(checkpoint),
                                         args=sft_args(out / "plain"), train_dataset=dataset.select(order),
                                         processing_class=processor)
    plain.train()
    save_step(plain, out / f"plain-rank{rank}.safetensors")
else:
    with open(out / f"rank{rank}.json", "w") as f:
        json.dump({"expected": {str(k): v for k, v in trainer.mining.sampler._expected.items()},
                   "backend": dist.get_backend(), "world_size": dist.get_world_size(),
                   "log_history": trainer.state.log_history}, f)
if __name__ == "__main__":  # tests/dist_runs.py runs several in one launch and tears down once, after the last
    distributed.destroy_process_group()
