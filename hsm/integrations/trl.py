"""hsm inside TRL's ``SFTTrainer`` (vision-language path).

Usage (``pip install 'hsm[trl]'``)::

    from trl import SFTConfig
    from hsm.config import MiningConfig
    from hsm.integrations.trl import HsmSFTTrainer

    trainer = HsmSFTTrainer(model=model, args=SFTConfig(output_dir="run", ...), train_dataset=dataset,
                            processing_class=processor, mining=MiningConfig(mode="reweight", ...),
                            dataset_name="bbu")
    trainer.train()

``dataset`` is TRL's VLM format: rows with ``messages`` and ``images`` (plus an optional ``id`` column, the
stable sample id; else ``<dataset_name>:<row>``). TRL's own collator does the encoding; hsm only wraps it so each
row's identity rides in the batch, trains on the plan-driven schedule (the hsm sampler) and plans at epoch end
(hsm's mining callback). The loss is TRL's own, unchanged: per-sample loss and token accuracy come from the same
fused LM-head pass (``outputs.log_probs``, ``label_mask``, ``is_top1``) that TRL computes its loss from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trl
from packaging.version import Version
from trl import SFTTrainer

from hsm.config import MiningConfig
from hsm.integrations.common import MetaCollator, SlotDataset, single_target_fusion
from hsm.data.sampler import HsmSampler
from hsm.train.stats import per_sample_stats
from hsm.train.trainer import HsmTrainerMixin, resume_attempt, write_dataset_info

__all__ = ["HsmSFTTrainer", "detection_dataset"]

# The per-sample statistics are read from SFTTrainer's fused LM-head outputs (log_probs, label_mask, is_top1).
_MIN_TRL = "1.16"
if Version(trl.__version__) < Version(_MIN_TRL):
    raise ImportError(f"hsm.integrations.trl needs trl>={_MIN_TRL} (SFTTrainer's fused LM head); found {trl.__version__}")

_FLUSH_EVERY_STEPS = 32


class HsmSFTTrainer(HsmTrainerMixin, SFTTrainer):
    """``SFTTrainer`` that logs per-sample events and trains on hsm's plan-driven schedule."""

    def __init__(self, *args, mining: MiningConfig, dataset_name: str = "train", id_column: str = "id",
                 hsm_dir: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        rows = self.train_dataset
        ids = list(rows[id_column]) if id_column in rows.column_names else [f"{dataset_name}:{i}" for i in range(len(rows))]
        slots = SlotDataset(rows, dataset_name, [str(i) for i in ids])
        self.train_dataset = slots
        self.data_collator = MetaCollator(self.data_collator)
        fusion = single_target_fusion(dataset_name)
        hsm_dir = Path(hsm_dir) if hsm_dir is not None else Path(self.args.output_dir) / "hsm"
        sampler = HsmSampler(sizes=[len(slots)], ratios=[], target=slots.info, seed=mining.seed,
                             batch_size=self.args.per_device_train_batch_size, hsm_dir=hsm_dir)
        if self.is_world_process_zero():
            hsm_dir.mkdir(parents=True, exist_ok=True)
            write_dataset_info(hsm_dir, _DatasetSizes(slots))
        self.setup_hsm(mining=mining, fusion=fusion, hsm_dir=hsm_dir, sampler=sampler,
                       num_train_epochs=self.args.num_train_epochs, attempt=resume_attempt(hsm_dir),
                       run_id=Path(self.args.output_dir).name)
        # TRL's own loss stays: the statistics come from its fused pass, not from hsm's compute_loss_func.
        self.compute_loss_func = None

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "hsm_meta" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "hsm_meta"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # hsm's _prepare_inputs has already taken the batch's metadata out of the model inputs.
        meta = self.take_hsm_meta(inputs)
        if meta is None or not self.model.training:
            return SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        fused = []

        def keep_fused_outputs(module, args, kwargs, output):
            if kwargs.get("fused_lm_head"):
                fused.append(output)

        handle = model.register_forward_hook(keep_fused_outputs, with_kwargs=True)
        try:
            result = SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if len(fused) != 1:
            raise RuntimeError(f"hsm expected one fused LM-head forward per step from SFTTrainer, saw {len(fused)}")
        out = fused[0]
        mask = out.label_mask.bool()
        stats = per_sample_stats(-out.log_probs, mask, out.is_top1.bool() & mask)
        n = mask.shape[0]
        self._hsm_pending.append((meta, stats, self.state.global_step, self._position_offset(n)))
        if len(self._hsm_pending) >= _FLUSH_EVERY_STEPS:
            self.hsm_drain()
        return result


class _DatasetSizes:
    """The two attributes :func:`hsm.train.trainer.write_dataset_info` reads, for a single-target dataset."""

    def __init__(self, slots: SlotDataset):
        self.names = [slots.name]
        self.sizes = [len(slots)]
        self.target_info = slots.info


def detection_dataset(jsonl: str | Path, *, system: str, user: str, coord_format: str = "rel1000"):
    """hsm detection JSONL -> a TRL VLM dataset: ``id``, ``images`` (one image) and ``messages``
    (system, user with the image, assistant answer in hsm's answer format)."""
    import datasets

    from hsm.data.encoding import format_answer
    from hsm.data.records import read_jsonl

    rows: dict[str, list[Any]] = {"id": [], "images": [], "messages": []}
    for i, record in enumerate(read_jsonl(jsonl)):
        answer = format_answer([o.bbox for o in record.objects], [o.label for o in record.objects],
                               record.width, record.height, coord_format)
        rows["id"].append(record.id if record.id is not None else f"{Path(jsonl).stem}:{i}")
        rows["images"].append([str(record.image)])
        rows["messages"].append([
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ])
    return datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))
