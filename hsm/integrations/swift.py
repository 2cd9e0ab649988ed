"""hsm inside ms-swift's ``swift sft`` (ms-swift 4.6), with no change to ms-swift's files.

The user keeps ``swift sft``, their dataset and flags, and adds::

    HSM_CONFIG=hsm.yaml swift sft ... --external_plugins "$(python -m hsm.integrations.swift)"

``hsm.yaml`` holds ``custom.hard_sample_mining`` (as for ``hsm train``) and optionally
``custom.fusion_config.target.name`` (the dataset name in events; default ``train``). The plugin
(:func:`register`) points ms-swift's ``causal_lm`` trainer at :class:`HsmSwiftTrainer`, a subclass of
ms-swift's ``Seq2SeqTrainer`` that:

- wraps ms-swift's train dataset so rows are read by hsm's schedule slots, and its collator
  (``template.data_collator``) so each row's ``(dataset, base_idx, sample_id)`` rides in the batch;
- replaces ms-swift's ``BatchSamplerShard`` in ``get_train_dataloader`` with batches of hsm's
  plan-driven schedule (``DataLoaderShard`` is kept, so ms-swift's device placement and ``set_epoch`` work);
- leaves ms-swift's loss untouched and computes per-sample loss / token accuracy from the logits of the same
  forward pass (the model's cross-entropy, recomputed per token without gradient; no second forward);
- plans at epoch end with hsm's mining callback.

With mining disabled in ``hsm.yaml`` the trainer only trains on hsm's schedule (the reference for
"hsm does not change the loss"). Sample ids are ``<name>:<row>`` over ms-swift's final train dataset (after
its own loading, mixing and splitting), so they are stable only while those flags and files are.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["register", "plugin_path", "HsmSwiftTrainer", "ScheduleBatchSampler"]

CONFIG_ENV = "HSM_CONFIG"


def plugin_path() -> Path:
    """The file to pass to ``--external_plugins``."""
    return Path(__file__).parent / "plugins" / "hsm_swift_plugin.py"


def register() -> None:
    """Make ``swift sft`` (task ``causal_lm``) build :class:`HsmSwiftTrainer`: ms-swift's own trainer registry."""
    from swift.trainers import TrainerFactory

    TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{__name__}.HsmSwiftTrainer"


class ScheduleBatchSampler:
    """Batches of hsm's schedule slots, in the shape ms-swift's ``DataLoaderShard`` expects of a batch sampler."""

    def __init__(self, sampler, batch_size: int):
        self.sampler = sampler
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        batch = []
        for slot in self.sampler:
            batch.append(slot)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


def _load_hsm_config():
    from hsm.config import ConfigError, load_config

    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(CONFIG_ENV, [f"{CONFIG_ENV}: not set; point it at a YAML with custom.hard_sample_mining"])
    return load_config(path)


def _trainer_class():
    from swift.trainers import Seq2SeqTrainer

    from hsm.train import distributed
    from hsm.config import MiningConfig
    from hsm.integrations.common import MetaCollator, SlotDataset, single_target_fusion
    from hsm.data.sampler import HsmSampler
    from hsm.train.stats import per_sample_stats, token_losses
    from hsm.train.trainer import HsmTrainerMixin, resume_attempt, write_dataset_info

    class HsmSwiftTrainer(HsmTrainerMixin, Seq2SeqTrainer):
        """ms-swift's ``Seq2SeqTrainer`` on hsm's schedule, logging hsm's per-sample events."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            cfg = _load_hsm_config()
            name = cfg.target_name or "train"
            rows = self.train_dataset
            self.train_dataset = slots = SlotDataset(rows, name, [f"{name}:{i}" for i in range(len(rows))])
            self.data_collator = MetaCollator(self.data_collator)
            mining = cfg.mining
            hsm_dir = Path(self.args.output_dir) / "hsm"
            # The same schedule seed with mining on or off, so switching it on does not reshuffle epoch 0.
            seed = (cfg.custom.hard_sample_mining or MiningConfig()).seed
            # ms-swift's loader is not accelerate-prepared (its BatchSamplerShard shards by rank itself), so the
            # sampler deals this rank's batches of the global schedule itself.
            sampler = HsmSampler(sizes=[len(slots)], ratios=[], target=slots.info, seed=seed,
                                 batch_size=self.args.per_device_train_batch_size,
                                 hsm_dir=hsm_dir if mining is not None else None, world=distributed.current_world())
            fusion = single_target_fusion(name)
            self.hsm_is_mining = mining is not None
            if self.is_world_process_zero():
                hsm_dir.mkdir(parents=True, exist_ok=True)
                write_dataset_info(hsm_dir, _Sizes(slots))
            if mining is None:
                self.use_sampler(sampler, fusion)
                return
            self.setup_hsm(mining=mining, fusion=fusion, hsm_dir=hsm_dir, sampler=sampler,
                           num_train_epochs=self.args.num_train_epochs, attempt=resume_attempt(hsm_dir),
                           run_id=Path(self.args.output_dir).name)
            # ms-swift keeps its own loss; hsm only reads the logits.
            self.compute_loss_func = None

        def get_train_dataloader(self, skip_batches=0):
            from swift.dataloader import DataLoaderShard

            if self.template.sequence_parallel_size > 1:
                raise NotImplementedError("hsm's schedule is not wired into ms-swift's sequence-parallel loader")
            args = self.args
            batch_sampler = ScheduleBatchSampler(self.hsm_sampler, self._train_batch_size)
            if skip_batches > 0:
                from accelerate.data_loader import SkipBatchSampler

                batch_sampler = SkipBatchSampler(batch_sampler, skip_batches=skip_batches)
            return DataLoaderShard(self.train_dataset, device=self.accelerator.device, batch_sampler=batch_sampler,
                                   collate_fn=self.data_collator, num_workers=args.dataloader_num_workers,
                                   pin_memory=args.dataloader_pin_memory)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            meta = self.take_hsm_meta(inputs)
            if not self.hsm_is_mining or meta is None or not self.model.training:
                return Seq2SeqTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]  # already trimmed to the kept logits when ms-swift uses logits_to_keep
            loss, outputs = Seq2SeqTrainer.compute_loss(self, model, inputs, True, num_items_in_batch)
            with torch.no_grad():
                stats = per_sample_stats(*token_losses(outputs.logits.detach(), labels))
            self._hsm_pending.append((meta, stats, self.state.global_step, self._position_offset(labels.shape[0])))
            if len(self._hsm_pending) >= 32:
                self.hsm_drain()
            return (loss, outputs) if return_outputs else loss

    return HsmSwiftTrainer


class _Sizes:
    def __init__(self, slots):
        self.names, self.sizes, self.target_info = [slots.name], [len(slots)], slots.info


def __getattr__(name: str):
    # ms-swift imports the trainer by dotted name; build the class lazily so importing hsm needs no ms-swift.
    if name == "HsmSwiftTrainer":
        cls = _trainer_class()
        globals()["HsmSwiftTrainer"] = cls
        return cls
    raise AttributeError(name)


if __name__ == "__main__":
    print(plugin_path())
