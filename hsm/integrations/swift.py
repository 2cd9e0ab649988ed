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
- leaves ms-swift's loss untouched and computes per-sample loss, token accuracy, ``coord_loss``, ``label_loss``
  and ``loss_sum`` from the logits of the same forward pass (the cross-entropy recomputed per token without
  gradient, one chunk of float32 logits at a time; from the last hidden states under ``--use_liger_kernel``;
  no second forward), token roles from the decoded assistant turns (JSON ``bbox_2d`` answers and the
  ``<|object_ref_start|>``/``<|box_start|>`` tags ms-swift renders ``objects`` rows into);
- supports ``--padding_free true``: ms-swift's collator concatenates a batch's samples into one row (positions
  restarting at 0 for each, ``text_position_ids`` / ``cu_seq_lens_q``) while every sample stays one dataset row,
  so each sample's identity still rides in the batch in order, and the statistics are split by the sequence
  boundaries into one event per sample, equal to a padded run's;
- refuses ``--packing true`` at start-up: ms-swift's ``PackingDataset`` bins rows into fixed packs before training,
  and a pack is what a loader draws, so hsm's schedule could no longer draw or re-weight one sample at a time
  (use ``--padding_free true`` for the same padding-free batches);
- plans at epoch end with hsm's mining callback.

- refuses ``--streaming true`` (an ``IterableDataset`` has no rows to draw) and ``metric: det_f1`` (it needs
  ``hsm train``'s generation pass), and validates ``hsm.yaml`` when ms-swift imports the plugin, before the model
  and the data load.

With mining disabled in ``hsm.yaml`` the trainer only trains on hsm's schedule (the reference for
"hsm does not change the loss"). Sample ids are ``<name>:<row>`` over ms-swift's final train dataset (after
its own loading, mixing and splitting), so they are stable only while those flags and files are; the dataset
fingerprint covers what each id names (image paths, answer, ``objects``), so a plan is refused when another
shuffle or file puts other rows at those positions. The run's ``hsm/`` (under ms-swift's
``OUTPUT_DIR/vN-<timestamp>/``) holds ``config.yaml`` (``hsm.yaml`` resolved) and ``samples.parquet`` (each
``base_idx``'s image and answer: the mapping from ms-swift's positions to the records), so ``hsm plan``,
``hsm sql`` and ``hsm report`` work on it with no flags.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["register", "plugin_path", "provenance", "write_grounding_jsonl", "refuse_arguments", "HsmSwiftTrainer",
           "ScheduleBatchSampler"]

CONFIG_ENV = "HSM_CONFIG"


def plugin_path() -> Path:
    """The file to pass to ``--external_plugins``."""
    return Path(__file__).parent / "plugins" / "hsm_swift_plugin.py"


def register() -> None:
    """Make ``swift sft`` (task ``causal_lm``) build :class:`HsmSwiftTrainer`: ms-swift's own trainer registry.

    ms-swift imports the plugin while it parses its arguments, before it loads the model and the data: the hsm
    config (``HSM_CONFIG``) is validated here, so a mistake in it fails in seconds, and the ``swift sft`` flags
    hsm cannot follow (``--packing``, ``--streaming``) are refused in the argument check that runs right after the
    plugins load (before ms-swift's own flash-attention check for ``--packing``).
    """
    from swift.arguments.sft_args import SftArguments
    from swift.trainers import TrainerFactory

    from hsm.integrations.common import refuse_unsupported

    cfg = _load_hsm_config()
    refuse_unsupported(cfg.mining, "ms-swift", cfg.source)
    TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{__name__}.HsmSwiftTrainer"
    check_padding_free = SftArguments._check_padding_free
    if getattr(check_padding_free, "hsm_checked", False):  # the plugin is imported again in dataloader workers
        return

    def refuse_then_check(args) -> None:
        refuse_arguments(args.packing, args.streaming)
        check_padding_free(args)

    refuse_then_check.hsm_checked = True
    SftArguments._check_padding_free = refuse_then_check


def refuse_arguments(packing: bool, streaming: bool) -> None:
    """Refuse the ``swift sft`` flags whose datasets hsm's schedule cannot draw one row at a time.

    Args:
        packing: ``--packing``: ms-swift bins rows into fixed packs, and its loader draws packs.
        streaming: ``--streaming``: an ``IterableDataset``, with no length and no row to index.
    """
    if packing:
        raise ValueError("swift sft --packing true: ms-swift bins rows into fixed packs before training and its loader "
                         "draws packs, so hsm's schedule could no longer draw or re-weight one sample at a time; "
                         "drop --packing (use --padding_free true for padding-free batches) when training with the "
                         "hsm plugin")
    if streaming:
        raise ValueError("swift sft --streaming true: ms-swift then reads the dataset as an IterableDataset, with no "
                         "length and no row hsm's schedule could draw or re-weight; drop --streaming when training "
                         "with the hsm plugin")


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
    from hsm.config import ConfigError
    from hsm.config_load import load_config

    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(CONFIG_ENV, [f"{CONFIG_ENV}: not set; point it at a YAML with custom.hard_sample_mining"])
    return load_config(path)


def _refuse_packing(trainer) -> None:
    # A pack is one dataset item of several rows: hsm's schedule, which draws rows, could not hold.
    # (--padding_free alone keeps one row per sample and is split by its sequence boundaries.)
    template = trainer.template
    packed = type(trainer.train_dataset).__name__ in ("PackingDataset", "IterablePackingDataset")
    refuse_arguments(packed or template.packing, not hasattr(trainer.train_dataset, "__len__"))
    if template.sequence_parallel_size > 1:
        raise NotImplementedError("hsm's schedule is not wired into ms-swift's sequence-parallel loader")


def _like_labels(values: torch.Tensor, full_labels: torch.Tensor, inputs: dict, fill: int = 0) -> torch.Tensor:
    """Trim per-token ``values`` (roles, owning samples) as ms-swift's ``prepare_logits_to_keep`` trimmed the labels
    (suffix, or the supervised positions of a one-row batch, after one ``fill``), so they stay aligned with the kept
    logits."""
    keep = inputs.get("logits_to_keep")
    if keep is None:
        return values
    if isinstance(keep, torch.Tensor):
        selected = (full_labels != -100)[0].cpu()
        return torch.nn.functional.pad(values[:, selected], (1, 0), value=fill)
    return values[:, -int(keep):]


def _token_stats(trainer, model, inputs: dict, labels: torch.Tensor, outputs, hidden: list):
    """``(losses, mask, correct)`` of ms-swift's forward without gradient: from its logits, one float32 chunk at a time
    beside ms-swift's own, or (under liger, which never builds the logits) from the decoder's kept last hidden
    states."""
    from hsm.train.stats import chunked_token_stats, hidden_token_stats

    if getattr(outputs, "logits", None) is not None:
        return chunked_token_stats(outputs.logits, labels)
    if hidden:
        lm_head = trainer.accelerator.unwrap_model(model).get_output_embeddings()
        keep = inputs.get("logits_to_keep")
        last = hidden[-1][:, keep] if isinstance(keep, torch.Tensor) else hidden[-1][:, -labels.shape[1]:]
        return hidden_token_stats(last, lm_head, labels)
    raise RuntimeError("hsm: ms-swift's forward returned neither logits nor (under liger) hidden states")


def _entry_name(tag: str) -> str:
    # A path entry (`--dataset data/coco.jsonl`) is named by its file stem, a hub entry by its id.
    return Path(tag).stem if ("/" in tag or "." in tag) and Path(tag).suffix else tag


def write_grounding_jsonl(records_jsonl: str | Path, out: str | Path, *,
                          formats: tuple[str, ...] = ("bbox_2d", "objects"), prompt: str = "Detect all objects.") -> int:
    """hsm detection JSONL -> ms-swift's grounding JSONL (``messages``, ``images``, ``objects``); the rows written.

    Row ``i`` takes ``formats[i % len(formats)]``: ``bbox_2d``, the answer as Qwen's JSON text (0-1000
    coordinates), or ``objects``, ms-swift's ``<ref-object><bbox>`` placeholders that its template fills from
    the ``objects`` column. Image paths are written absolute.

    Args:
        records_jsonl: hsm records (:func:`hsm.data.records.read_jsonl`).
        out: the ms-swift JSONL to write.
        formats: the answer formats, cycled over the rows.
        prompt: the user turn after ``<image>``.
    """
    import json

    from hsm.data.encoding import format_answer
    from hsm.data.records import read_jsonl

    from hsm.io import write_bytes_atomic

    records = read_jsonl(records_jsonl)
    lines = []
    for i, record in enumerate(records):
        boxes, labels = [o.bbox for o in record.objects], [o.label for o in record.objects]
        if formats[i % len(formats)] == "bbox_2d":
            answer = format_answer(boxes, labels, record.width, record.height, "rel1000")
            objects = {"ref": [], "bbox": []}
        else:
            answer = "<ref-object><bbox>" * len(boxes)
            objects = {"ref": labels, "bbox": [[round(v) for v in b] for b in boxes]}
        row = {"messages": [{"role": "user", "content": f"<image>{prompt}"}, {"role": "assistant", "content": answer}],
               "images": [str(Path(record.image).resolve())], "objects": objects}
        lines.append(json.dumps(row) + "\n")
    write_bytes_atomic("".join(lines).encode("utf-8"), out)  # all rows or none
    return len(records)


def provenance(raw, target: str):
    """``(target_rows, sources)`` of ms-swift's train set from the ``dataset`` column ms-swift 4.6 tags every row
    with (its ``--dataset`` entry, before sampling, splitting and shuffling), or None without that column.

    The entry whose tag, file name or file stem is ``target`` is the target; every other entry is a source
    (:class:`hsm.integrations.common.Part` named by its file stem or hub id). ``base_idx`` is a row's position
    among its entry's rows in ms-swift's train set (stable while the flags, ``--data_seed`` and files are).

    Args:
        raw: ms-swift's train rows before encoding (``LazyLLMDataset.dataset``).
        target: ``fusion_config.target.name`` of ``hsm.yaml``.
    """
    from hsm.config import ConfigError
    from hsm.integrations.common import Part

    if "dataset" not in getattr(raw, "column_names", ()):
        return None
    rows_of: dict[str, list[int]] = {}
    for i, tag in enumerate(raw["dataset"]):
        rows_of.setdefault(tag, []).append(i)
    matches = [tag for tag in rows_of if target in (tag, Path(tag).name, _entry_name(tag))]
    if len(rows_of) == 1 and not matches:
        return list(range(len(raw))), []  # one entry: it is the target, whatever its name
    if len(matches) != 1:
        raise ConfigError(os.environ.get(CONFIG_ENV, CONFIG_ENV), [
            f"custom.fusion_config.target.name: '{target}' must name exactly one --dataset entry (its path, file "
            f"name or stem); the entries are {sorted(rows_of)}"])
    sources = [Part(_entry_name(tag), rows, [f"{_entry_name(tag)}:{k}" for k in range(len(rows))])
               for tag, rows in rows_of.items() if tag != matches[0]]
    return rows_of[matches[0]], sources


def _trainer_class():
    from swift.trainers import Seq2SeqTrainer

    from hsm.config import MiningConfig
    from hsm.integrations.common import attach, sample_stats
    from hsm.train import distributed
    from hsm.train.trainer import HsmTrainerMixin

    class HsmSwiftTrainer(HsmTrainerMixin, Seq2SeqTrainer):
        """ms-swift's ``Seq2SeqTrainer`` on hsm's schedule, logging hsm's per-sample events."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _refuse_packing(self)
            cfg = _load_hsm_config()
            name = cfg.target_name or "train"
            self.hsm_is_mining = cfg.mining is not None
            # The same schedule seed with mining on or off, so switching it on does not reshuffle epoch 0.
            seed = (cfg.custom.hard_sample_mining or MiningConfig()).seed
            # ms-swift's loader is not accelerate-prepared (its BatchSamplerShard shards by rank itself), so the
            # sampler deals this rank's batches of the global schedule itself. No answers getter: ms-swift labels
            # only the assistant turns, so the roles come from the decoded supervised runs (as its template
            # rendered them, ``objects`` rows included).
            tokenizer = self.template.tokenizer if self.hsm_is_mining else None
            found = provenance(getattr(self.train_dataset, "dataset", None), name)
            target_rows, sources = found if found is not None else (None, [])
            attach(self, self.train_dataset, name, mining=cfg.mining, seed=seed, tokenizer=tokenizer,
                   world=distributed.current_world(), target_rows=target_rows, sources=sources,
                   raw=getattr(self.train_dataset, "dataset", None), config=cfg, stack="ms-swift")

        def get_train_dataloader(self, skip_batches=0):
            from swift.dataloader import DataLoaderShard

            args = self.args
            batch_sampler = ScheduleBatchSampler(self.hsm_sampler, self._train_batch_size)
            if skip_batches > 0:
                from accelerate.data_loader import SkipBatchSampler

                batch_sampler = SkipBatchSampler(batch_sampler, skip_batches=skip_batches)
            return DataLoaderShard(self.train_dataset, device=self.accelerator.device, batch_sampler=batch_sampler,
                                   collate_fn=self.data_collator, num_workers=args.dataloader_num_workers,
                                   pin_memory=args.dataloader_pin_memory)

        def _prepare_inputs(self, inputs):
            full_labels = inputs.get("labels") if isinstance(inputs, dict) else None
            inputs = super()._prepare_inputs(inputs)
            meta = self._hsm_meta
            if meta is not None and full_labels is not None:
                for key, fill in (("token_roles", 0), ("token_sample", -1), ("answer_mask", 0)):
                    if meta.get(key) is not None:
                        meta[key] = _like_labels(meta[key], full_labels, inputs, fill)
            return inputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            meta = self.take_hsm_meta(inputs)
            if not self.hsm_is_mining or meta is None or not self.model.training:
                return Seq2SeqTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]  # already trimmed to the kept logits when ms-swift uses logits_to_keep
            hidden = []
            handle = None
            if self.args.use_liger_kernel:
                # Liger's fused linear cross-entropy never builds the logits: keep the decoder's last hidden states.
                norm = self.template.get_base_model(model).get_decoder().norm
                handle = norm.register_forward_hook(lambda module, args, output: hidden.append(output))
            try:
                loss, outputs = Seq2SeqTrainer.compute_loss(self, model, inputs, True, num_items_in_batch)
            finally:
                if handle is not None:
                    handle.remove()
            stats = sample_stats(*_token_stats(self, model, inputs, labels, outputs, hidden), meta)
            self.record_stats(meta, stats, self.state.global_step)
            return (loss, outputs) if return_outputs else loss

    return HsmSwiftTrainer


def __getattr__(name: str):
    # ms-swift imports the trainer by dotted name; build the class lazily so importing hsm needs no ms-swift.
    if name == "HsmSwiftTrainer":
        cls = _trainer_class()
        globals()["HsmSwiftTrainer"] = cls
        return cls
    raise AttributeError(name)


if __name__ == "__main__":
    print(plugin_path())
