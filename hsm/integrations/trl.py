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
row's identity and its answer-token roles ride in the batch, trains on the plan-driven schedule (the hsm sampler)
and plans at epoch end (hsm's mining callback). The loss is TRL's own, unchanged: per-sample loss, token accuracy,
``coord_loss``, ``label_loss`` and ``loss_sum`` come from the same fused LM-head pass (``outputs.log_probs``,
``label_mask``, ``is_top1``) that TRL computes its loss from, over the assistant answers' tokens only (TRL also
trains on the prompt unless told otherwise). ``mining=None`` trains on hsm's schedule only. The run's ``hsm/``
holds what ``hsm plan`` and ``hsm report`` need (``config.yaml``, ``samples.parquet``), so both work on it with no
flags. ``metric: det_f1`` is refused: it needs ``hsm train``'s own generation pass.

``SFTConfig.packing`` and ``SFTConfig.padding_free`` are refused at start-up, before TRL builds anything: TRL 1.16
refuses both for vision datasets itself, and packing bins rows into fixed packed rows that hsm's schedule could not
draw one sample at a time. (The statistics themselves split padding-free batches: ms-swift's ``--padding_free true``
is supported, see :mod:`hsm.integrations.swift`.)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import trl
from packaging.version import Version
from trl import SFTConfig, SFTTrainer

from hsm.config import MiningConfig
from hsm.data.meta import META_KEY
from hsm.integrations.common import attach, refuse_unsupported
from hsm.integrations.slots import assistant_texts
from hsm.layout import RunPaths
from hsm.train.startup import StartRequest
from hsm.train.trainer import HsmTrainerMixin

__all__ = ["HsmSFTTrainer", "detection_dataset", "WHERE_COLUMN"]

# detection_dataset's column naming each row's record (file:line), for start-up image errors.
WHERE_COLUMN = "where"

# The per-sample statistics are read from SFTTrainer's fused LM-head outputs (log_probs, label_mask, is_top1).
_MIN_TRL = "1.16"
# The TRL releases whose SFTTrainer.compute_loss the bit-identity tests ran (tests/integrations/test_trl.py).
_TESTED_TRL = ("1.16",)
if Version(trl.__version__) < Version(_MIN_TRL):
    raise ImportError(f"hsm.integrations.trl needs trl>={_MIN_TRL} (SFTTrainer's fused LM head); found {trl.__version__}")
if f"{Version(trl.__version__).major}.{Version(trl.__version__).minor}" not in _TESTED_TRL:
    warnings.warn(f"hsm: TRL {trl.__version__} is not one of the releases hsm's statistics were tested on "
                  f"({', '.join(_TESTED_TRL)}.x); hsm still checks at every step that SFTTrainer made exactly one fused "
                  "LM-head pass and reads its per-token outputs from it", stacklevel=2)


def _refuse_packing(args: SFTConfig | None) -> None:
    """Refuse, before TRL builds anything, the SFTConfig flags hsm cannot follow samples through."""
    if args is None:
        return
    if args.packing:
        raise ValueError("SFTConfig.packing=True: TRL packs rows into fixed packed rows before training, so hsm's "
                         "schedule could no longer draw or re-weight one sample at a time (and TRL 1.16 refuses "
                         "packing for vision datasets); set packing=False")
    if args.padding_free:
        raise ValueError("SFTConfig.padding_free=True: TRL 1.16's SFTTrainer refuses padding-free training for vision "
                         "datasets, and hsm's TRL integration is its vision-language path; set padding_free=False "
                         "(ms-swift's --padding_free true works with hsm)")


class HsmSFTTrainer(HsmTrainerMixin, SFTTrainer):
    """``SFTTrainer`` that logs per-sample events and trains on hsm's plan-driven schedule.

    Args (besides SFTTrainer's):
        mining: the mining configuration, or None: hsm's schedule only.
        dataset_name: the target's name in events and plans.
        id_column: the column of stable sample ids (else ``<dataset_name>:<row>``).
        hsm_dir: the run's hsm folder; default ``<output_dir>/hsm``.
        overwrite_output_dir: replace an hsm run already in ``hsm_dir`` (removed when ``train()`` starts); without
            it a fresh run there is refused, and only ``train(resume_from_checkpoint=...)`` continues one.
    """

    def __init__(self, *args, mining: MiningConfig | None, dataset_name: str = "train", id_column: str = "id",
                 hsm_dir: str | Path | None = None, overwrite_output_dir: bool = False, **kwargs):
        _refuse_packing(kwargs.get("args", args[1] if len(args) > 1 else None))
        refuse_unsupported(mining, "TRL")  # before TRL builds anything
        super().__init__(*args, **kwargs)
        rows = self.train_dataset
        ids = list(rows[id_column]) if id_column in rows.column_names else None
        where = list(rows[WHERE_COLUMN]) if WHERE_COLUMN in rows.column_names else None
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        paths = RunPaths.at(hsm_dir) if hsm_dir is not None else RunPaths.of(self.args.output_dir)
        start = StartRequest(paths, overwrite=overwrite_output_dir, check_files=mining is not None,
                             source="HsmSFTTrainer", how_to_resume="trainer.train(resume_from_checkpoint=True)",
                             how_to_overwrite="HsmSFTTrainer(..., overwrite_output_dir=True)")
        # The same schedule seed with mining on or off, so switching it on does not reshuffle epoch 0.
        seed = (mining or MiningConfig()).seed
        attach(self, rows, dataset_name, mining=mining, seed=seed, start=start, sample_ids=ids, where=where,
               tokenizer=tokenizer if mining is not None else None, answers=assistant_texts, stack="TRL")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if META_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, META_KEY]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # hsm's _prepare_inputs has already taken the batch's metadata out of the model inputs.
        meta = self.mining.take(inputs)
        if meta is None or not self.model.training or not self.mining.is_mining:
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
        # TRL's fused head scores labels[:, 1:] without building the logits: the statistics cost no extra memory.
        mask = out.label_mask.bool()
        self.mining.record(meta, -out.log_probs, mask, out.is_top1.bool() & mask)
        return result


def detection_dataset(jsonl: str | Path, *, system: str, user: str, coord_format: str = "rel1000"):
    """hsm detection JSONL -> a TRL VLM dataset: ``id``, ``where`` (the record's ``file:line``, named when its
    image fails the start-up check), ``images`` (one image) and ``messages`` (system, user with the image,
    assistant answer in hsm's answer format).

    Args:
        jsonl: hsm detection records (``hsm data validate`` checks them).
        system: the system prompt.
        user: the user prompt, after the image.
        coord_format: ``rel1000`` (Qwen2-VL, Qwen3-VL) or ``abs``.
    """
    import datasets

    from hsm.data.encoding import format_answer
    from hsm.data.records import read_jsonl

    rows: dict[str, list[Any]] = {"id": [], WHERE_COLUMN: [], "images": [], "messages": []}
    for i, record in enumerate(read_jsonl(jsonl)):
        answer = format_answer([o.bbox for o in record.objects], [o.label for o in record.objects],
                               record.width, record.height, coord_format)
        rows["id"].append(record.id if record.id is not None else f"{Path(jsonl).stem}:{i}")
        rows[WHERE_COLUMN].append(record.where)
        rows["images"].append([str(record.image)])
        rows["messages"].append([
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ])
    return datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))
