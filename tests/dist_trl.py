"""Entry point of TRL's 2-rank test: ``torchrun --nproc_per_node 2 tests/dist_trl.py CHECKPOINT JSONL OUT EPOCHS MINING``.

``HsmSFTTrainer`` (mining ``on`` or ``off``) on the tiny Qwen3-VL, batch 2 per rank; every rank writes
``OUT/rank{R}.json`` with its log history and the plan checksums its sampler was told.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig

from hsm.config import MiningConfig, SelectorConfig
from hsm.data.synth import DEFAULT_PROMPTS
from hsm.integrations.trl import HsmSFTTrainer, detection_dataset
from hsm.train import distributed

checkpoint, jsonl, out, epochs, mining = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
system, user = DEFAULT_PROMPTS["target"]
config = MiningConfig(enabled=True, mode="reweight", metric="loss", start_epoch=1,
                      selector=SelectorConfig(mode="top_k", k=2), hard_weight=3.0)
args = SFTConfig(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=2, learning_rate=0.01,
                 lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                 seed=0, max_length=None, dataloader_num_workers=0)
trainer = HsmSFTTrainer(model=AutoModelForImageTextToText.from_pretrained(checkpoint), args=args,
                        train_dataset=detection_dataset(jsonl, system=system, user=user),
                        processing_class=AutoProcessor.from_pretrained(checkpoint),
                        mining=config if mining == "on" else None, dataset_name="bbu")
trainer.train()
with open(out / f"rank{trainer.args.process_index}.json", "w") as f:
    json.dump({"expected": {str(k): v for k, v in trainer.mining.sampler._expected.items()},
               "backend": dist.get_backend(), "world_size": dist.get_world_size(),
               "log_history": trainer.state.log_history}, f)
if __name__ == "__main__":  # tests/dist_runs.py runs several in one launch and tears down once, after the last
    distributed.destroy_process_group()
