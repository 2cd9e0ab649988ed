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
- computes the training loss through ms-swift's own loss hook (``--loss_type hsm``, registered in ``loss_map`` and
  selected by the plugin when mining is on): the loss plain ms-swift computes, op for op (bit-identical loss and
  gradients), with per-sample loss, token accuracy, ``coord_loss``, ``label_loss`` and ``loss_sum`` from the same
  ``log_softmax`` and from the one argmax ms-swift's token accuracy takes (no second pass over the logits). Under
  ``--use_liger_kernel`` (no logits), another ``--loss_type`` or a model whose loss is not transformers' causal-LM
  loss, the loss is left alone and the statistics are recomputed without gradient (from the logits one chunk at a
  time, or from the last hidden states under liger), as a start-up warning says; token roles come from the decoded
  assistant turns (JSON ``bbox_2d`` answers and the ``<|object_ref_start|>``/``<|box_start|>`` tags ms-swift
  renders ``objects`` rows into);
- supports ``--padding_free true``: ms-swift's collator concatenates a batch's samples into one row (positions
  restarting at 0 for each, ``text_position_ids`` / ``cu_seq_lens_q``) while every sample stays one dataset row,
  so each sample's identity still rides in the batch in order, and the statistics are split by the sequence
  boundaries into one event per sample, equal to a padded run's;
- refuses ``--packing true`` at start-up: ms-swift's ``PackingDataset`` bins rows into fixed packs before training,
  and a pack is what a loader draws, so hsm's schedule could no longer draw or re-weight one sample at a time
  (use ``--padding_free true`` for the same padding-free batches); ``--sequence_parallel_size`` above 1 is refused
  too (hsm's schedule is not wired into ms-swift's sequence-parallel loader, which splits each row across ranks);
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
           "ScheduleBatchSampler", "LOSS_TYPE"]

CONFIG_ENV = "HSM_CONFIG"
# hsm's loss in ms-swift's loss registry (``--loss_type hsm``); the plugin selects it itself when mining is on.
LOSS_TYPE = "hsm"
# The ms-swift release whose Seq2SeqTrainer.compute_loss and _compute_acc the bit-identity tests ran on.
_TESTED_SWIFT = "4.6"


def plugin_path() -> Path:
    """The file to pass to ``--external_plugins``."""
    return Path(__file__).parent / "plugins" / "hsm_swift_plugin.py"


def register() -> None:
    """Make ``swift sft`` (task ``causal_lm``) build :class:`HsmSwiftTrainer` (ms-swift's own trainer registry) and
    register hsm's loss as ``--loss_type hsm`` (ms-swift's ``loss_map``, its hook for third-party losses).

    ms-swift imports the plugin while it parses its arguments, before it loads the model and the data: the hsm
    config (``HSM_CONFIG``) is validated here, so a mistake in it fails in seconds, and the ``swift sft`` flags
    hsm cannot follow (``--packing``, ``--streaming``) are refused in the argument check that runs right after the
    plugins load (before ms-swift's own flash-attention check for ``--packing``).
    """
    from swift.arguments.sft_args import SftArguments
    from swift.loss import loss_map
    from swift.trainers import TrainerFactory

    from hsm.integrations.common import refuse_unsupported

    cfg = _load_hsm_config()
    refuse_unsupported(cfg.mining, "ms-swift", cfg.source)
    TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{__name__}.HsmSwiftTrainer"
    loss_map[LOSS_TYPE] = _loss_class()
    check_padding_free = SftArguments._check_padding_free
    if getattr(check_padding_free, "hsm_checked", False):  # the plugin is imported again in dataloader workers
        return

    def refuse_then_check(args) -> None:
        refuse_arguments(args.packing, args.streaming)
        _probe_output_dir(args)
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


def _start_request(output_dir: str, cfg, resume: str | None = None):
    """The start-up request of a ``swift sft`` run into ``output_dir`` (its ``hsm/`` folder), with ms-swift's hints."""
    from hsm.config_load import OVERWRITE_KEY
    from hsm.layout import RunPaths
    from hsm.train.startup import StartRequest

    return StartRequest(RunPaths.of(output_dir), resume=resume, overwrite=bool(cfg.training.get(OVERWRITE_KEY, False)),
                        check_files=cfg.mining is not None, source=cfg.source,
                        how_to_resume="swift sft --resume_from_checkpoint CHECKPOINT",
                        how_to_overwrite=f"training.{OVERWRITE_KEY}: true in {CONFIG_ENV}")


def _probe_output_dir(args) -> None:
    """With ``--add_version false`` the output folder is final when ms-swift checks its arguments: rank 0 refuses a
    run another process holds, or a fresh run into a folder holding an hsm run
    (:func:`hsm.train.startup.probe_run`), before the model and the data load and before ms-swift writes its own
    files there. (With versions on, every run gets a new ``vN-<timestamp>`` folder.)"""
    from hsm.train.startup import probe_run

    if getattr(args, "add_version", True) or os.environ.get("RANK", "0") != "0":
        return
    probe_run(_start_request(args.output_dir, _load_hsm_config(), resume=args.resume_from_checkpoint))


def _loss_class():
    from swift.loss import BaseLoss

    class HsmSwiftLoss(BaseLoss):
        """``--loss_type hsm``: the loss plain ms-swift computes, op for op, with hsm's per-token statistics taken
        from the same pass (:meth:`HsmSwiftTrainer.mining_loss`)."""

        def __call__(self, outputs, labels, *, num_items_in_batch=None, loss_scale=None, **kwargs):
            return self.trainer.mining_loss(outputs, labels, num_items_in_batch, loss_scale)

    return HsmSwiftLoss


def _loss_plan(args, model) -> tuple[bool, str | None]:
    """``(owns_loss, note)``: whether hsm's loss hook computes the training loss (and the statistics from its
    pass), and what to tell the user at start-up when it does not.

    Args:
        args: ms-swift's training arguments (``loss_type``, ``use_liger_kernel``).
        model: the unwrapped model (its ``loss_function`` must be transformers' causal-LM loss to be mirrored).
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    if args.use_liger_kernel and args.loss_type != LOSS_TYPE:
        return False, ("--use_liger_kernel: liger's fused linear cross-entropy never builds the logits, so hsm leaves "
                       "the loss to it and computes the statistics without gradient from the last hidden states, one "
                       "chunk of positions at a time (a second LM-head pass over the supervised tokens)")
    if args.loss_type not in (None, LOSS_TYPE):
        return False, (f"--loss_type {args.loss_type}: hsm keeps that loss and computes the statistics with a second, "
                       f"no-grad cross-entropy over the logits; pass --loss_type {LOSS_TYPE} (or none) for statistics "
                       "from the loss's own pass")
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return False, ("the model's loss is not transformers' ForCausalLMLoss, which hsm's loss mirrors op for op; hsm "
                       "keeps the model's loss and computes the statistics with a second, no-grad cross-entropy")
    return True, None


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
    (:class:`hsm.integrations.slots.Part` named by its file stem or hub id). ``base_idx`` is a row's position
    among its entry's rows in ms-swift's train set (stable while the flags, ``--data_seed`` and files are).

    Args:
        raw: ms-swift's train rows before encoding (``LazyLLMDataset.dataset``).
        target: ``fusion_config.target.name`` of ``hsm.yaml``.
    """
    from hsm.config import ConfigError
    from hsm.integrations.slots import Part

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


def _row_names(raw) -> list[str] | None:
    """What names each train row in an error: its ``--dataset`` entry and its position among that entry's rows as
    ms-swift loaded them (the file's line order unless ms-swift shuffled or sampled it), or None without the
    ``dataset`` column ms-swift tags rows with."""
    if "dataset" not in getattr(raw, "column_names", ()):
        return None
    seen: dict[str, int] = {}
    names = []
    for tag in raw["dataset"]:
        k = seen.get(tag, 0)
        seen[tag] = k + 1
        names.append(f"ms-swift --dataset {tag} row {k}")
    return names


def _trainer_class():
    from swift.trainers import Seq2SeqTrainer

    from hsm.config import MiningConfig
    from hsm.integrations.common import attach
    from hsm.train import distributed
    from hsm.train.trainer import HsmTrainerMixin

    class HsmSwiftTrainer(HsmTrainerMixin, Seq2SeqTrainer):
        """ms-swift's ``Seq2SeqTrainer`` on hsm's schedule, logging hsm's per-sample events."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _refuse_packing(self)
            cfg = _load_hsm_config()
            name = cfg.target_name or "train"
            is_mining = cfg.mining is not None
            # The same schedule seed with mining on or off, so switching it on does not reshuffle epoch 0.
            seed = (cfg.custom.hard_sample_mining or MiningConfig()).seed
            # ms-swift's loader is not accelerate-prepared (its BatchSamplerShard shards by rank itself), so the
            # sampler deals this rank's batches of the global schedule itself. No answers getter: ms-swift labels
            # only the assistant turns, so the roles come from the decoded supervised runs (as its template
            # rendered them, ``objects`` rows included).
            tokenizer = self.template.tokenizer if is_mining else None
            found = provenance(getattr(self.train_dataset, "dataset", None), name)
            target_rows, sources = found if found is not None else (None, [])
            start = _start_request(self.args.output_dir, cfg)
            raw = getattr(self.train_dataset, "dataset", None)
            attach(self, self.train_dataset, name, mining=cfg.mining, seed=seed, start=start, tokenizer=tokenizer,
                   world=distributed.current_world(), target_rows=target_rows, sources=sources, raw=raw, config=cfg,
                   stack="ms-swift", where=_row_names(raw))
            self._predictions = None  # the argmax the loss took, for _compute_acc
            self._owns_loss = False
            if is_mining:
                self._plan_loss()

        def _plan_loss(self) -> None:
            import warnings

            import swift
            from packaging.version import Version
            from swift.loss import loss_map

            swift_version = Version(swift.__version__)
            if f"{swift_version.major}.{swift_version.minor}" != _TESTED_SWIFT:
                warnings.warn(f"hsm: ms-swift {swift.__version__} is not the release hsm's loss hook was tested on "
                              f"({_TESTED_SWIFT}.x)", stacklevel=2)
            self._owns_loss, note = _loss_plan(self.args, self.accelerator.unwrap_model(self.model))
            if note is not None:
                warnings.warn(f"hsm: {note}", stacklevel=2)
            if self._owns_loss and self.compute_loss_func is None:
                self.compute_loss_func = loss_map[LOSS_TYPE](self.args, self)  # as ms-swift builds --loss_type

        def mining_loss(self, outputs, labels, num_items_in_batch=None, loss_scale=None):
            """The loss plain ``swift sft`` computes for this batch, op for op, and hsm's per-sample statistics from
            the same pass.

            Plain ms-swift leaves the loss to the model (transformers' ``ForCausalLMLoss``: the micro-batch's token
            mean, times ``n_tokens / num_items_in_batch`` when counted) unless it built per-token losses itself
            (``--loss_scale``, channel loss, DFT: ``outputs.loss``), which it sums over ``num_items_in_batch``.
            Both are reproduced here; the per-token losses come from the same ``log_softmax`` (or are
            ``outputs.loss`` itself) and the correctness flags from the one argmax ms-swift's token accuracy
            takes (kept for :meth:`_compute_acc`).
            """
            from hsm.train.stats import causal_lm_loss, chunked_token_stats

            meta = self.mining.take_loss_meta()
            logits = outputs.logits
            with torch.no_grad():
                self._predictions = logits.argmax(dim=-1)  # the argmax ms-swift's _compute_acc takes, taken once
            if outputs.loss is None:
                loss, losses, mask, correct = causal_lm_loss(logits, labels, predictions=self._predictions)
                loss = loss.to(labels.device)
                if num_items_in_batch is not None:
                    loss = loss * ((labels[:, 1:] != -100).sum() / num_items_in_batch)
            else:
                if num_items_in_batch is None:
                    num_items_in_batch = (labels != -100).sum()
                loss = outputs.loss.sum() / num_items_in_batch
                if loss_scale is None and not self.args.enable_dft_loss:  # outputs.loss is the plain per-token CE
                    shifted = labels[:, 1:]
                    mask = shifted != -100
                    losses = torch.where(mask, outputs.loss.detach().view(labels.shape)[:, :-1], 0.0)
                    correct = (self._predictions[:, :-1] == shifted) & mask
                else:  # weighted per-token losses: the statistics need the plain cross-entropy
                    losses, mask, correct = chunked_token_stats(logits, labels)
            # What training_step infers for plain ms-swift (no compute_loss_func): scaled when the model took the count.
            self.loss_is_scaled_for_ga = bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            if self.model.training and meta is not None:
                self.mining.record(meta, losses, mask, correct)
            return loss

        def _compute_acc(self, outputs, labels, cu_seqlens=None) -> None:
            preds, self._predictions = self._predictions, None
            if preds is None:
                return super()._compute_acc(outputs, labels, cu_seqlens=cu_seqlens)
            # ms-swift 4.6's causal_lm branch (sequence parallel is refused at start-up) on the argmax hsm's loss took.
            from swift.metrics import compute_acc

            metrics = compute_acc(preds, labels, acc_strategy=self.args.acc_strategy,
                                  is_encoder_decoder=self.template.is_encoder_decoder, cu_seqlens=cu_seqlens)
            mode = "train" if self.model.training else "eval"
            for key, value in (metrics or {}).items():
                self.custom_metrics[mode][key].update(value)

        def get_train_dataloader(self, skip_batches=0):
            from swift.dataloader import DataLoaderShard

            args = self.args
            batch_sampler = ScheduleBatchSampler(self.mining.sampler, self._train_batch_size)
            if skip_batches > 0:
                from accelerate.data_loader import SkipBatchSampler

                batch_sampler = SkipBatchSampler(batch_sampler, skip_batches=skip_batches)
            return DataLoaderShard(self.train_dataset, device=self.accelerator.device, batch_sampler=batch_sampler,
                                   collate_fn=self.data_collator, num_workers=args.dataloader_num_workers,
                                   pin_memory=args.dataloader_pin_memory)

        def _prepare_inputs(self, inputs):
            full_labels = inputs.get("labels") if isinstance(inputs, dict) else None
            inputs = super()._prepare_inputs(inputs)
            meta = self.mining.held
            if meta is not None and full_labels is not None:
                self.mining.held = meta.with_tokens(**{
                    key: _like_labels(getattr(meta, key), full_labels, inputs, fill)
                    for key, fill in (("token_roles", 0), ("token_sample", -1), ("answer_mask", 0))
                    if getattr(meta, key) is not None})
            return inputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            meta = self.mining.take(inputs)
            if self._owns_loss:
                # Plain ms-swift counts num_items_in_batch only for a model that accepts loss kwargs; the Trainer
                # counts it for any compute_loss_func: hand the loss what plain ms-swift would have.
                if not self.model_accepts_loss_kwargs:
                    num_items_in_batch = None
                self.mining.loss_meta = meta if self.model.training else None
                return Seq2SeqTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if not self.mining.is_mining or meta is None or not self.model.training:
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
            self.mining.record(meta, *_token_stats(self, model, inputs, labels, outputs, hidden))
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
