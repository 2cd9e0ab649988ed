"""``hsm train`` as a function: config in, finished training run out.

Start-up checks first and writes last. Before the model loads, rank 0 takes the run's
lock (held until training ends, so a second training on the folder is refused at
once), refuses a fresh run into a folder that already holds an hsm run (naming what is
there; ``training.overwrite_output_dir: true`` removes its ``hsm/`` first, and only
``training.resume_from_checkpoint`` continues it), resolves the checkpoint to resume
from (:func:`hsm.train.checkpoints.resolve_resume`) and checks every file of the run
(:func:`hsm.mining.checks.check_run_files`). ``hsm/config.yaml`` and
``hsm/dataset.json`` are written, atomically with their sha256 records, only when
everything before the first step has succeeded.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import yaml

from hsm.config import ConfigError, HsmConfig, small_target_warning
from hsm.config_load import OVERWRITE_KEY
from hsm.layout import RunPaths
from hsm.train.startup import RunExists

__all__ = ["OVERWRITE_KEY", "RunExists", "check_training_values", "training_arguments", "train"]


_DEFAULTS = {"remove_unused_columns": False, "report_to": ["tensorboard"]}


def check_training_values(training: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    """Type-check every ``training.*`` value against ``TrainingArguments``; returns the coerced values.

    Every problem is reported at once with its dotted key, before anything is written
    (``training.learning_rate=fast`` would otherwise fail deep inside the optimizer);
    :func:`hsm.config_load.training_problems` holds the rules.
    """
    from hsm.config_load import training_problems

    values, problems = training_problems(training)
    if problems:
        raise ConfigError(source, problems)
    return values


def training_arguments(cfg: HsmConfig):
    """``cfg.training`` as ``TrainingArguments``; unknown keys and bad values are rejected with their path."""
    from transformers import TrainingArguments

    values = check_training_values(cfg.training, cfg.source)
    values.pop(OVERWRITE_KEY, None)  # hsm's, not the Trainer's
    kwargs: dict[str, Any] = {**_DEFAULTS, **values}
    if cfg.deepspeed is not None:
        kwargs["deepspeed"] = cfg.deepspeed
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(cfg.source, [f"training: {e}"]) from e


def train(cfg: HsmConfig, *, base_trainer=None) -> dict[str, Any]:
    """Build model, data and Trainer from ``cfg`` and train. Returns a summary.

    Args:
        cfg: the validated config (:func:`hsm.config_load.load_config`).
        base_trainer: the ``transformers.Trainer`` subclass to build on (default ``Trainer``).

    Returns:
        ``{"trainer", "global_step", "train_loss", "output_dir", "hsm_dir", "mining"}``.

    Raises:
        ConfigError, RunExists, RunLocked, RunFileError: at start-up, before anything is written
            (see the module docstring).
    """
    if cfg.custom.fusion_config is None:
        raise ConfigError(cfg.source, ["custom.fusion_config: required by hsm train (the datasets to train on)"])
    args = training_arguments(cfg)
    output_dir = Path(args.output_dir)
    hsm_dir = RunPaths.of(output_dir).root
    created = not hsm_dir.exists()
    with contextlib.ExitStack() as held:  # rank 0 holds the run's lock until training ends
        _start_run(held, cfg, args, hsm_dir)
        try:
            return _train(cfg, args, output_dir, hsm_dir, base_trainer)
        except BaseException:
            _remove_if_only_locked(hsm_dir, created)
            raise


def _remove_if_only_locked(hsm_dir: Path, created: bool) -> None:
    """A start that failed before anything was written (a bad image, a record too long) leaves no ``hsm/`` behind
    that holds only the lock file this start created."""
    import shutil

    from hsm.train import distributed

    lock = RunPaths.at(hsm_dir).lock
    if created and distributed.on_main(distributed.current_world()) and hsm_dir.is_dir():
        if [p for p in hsm_dir.iterdir() if p != lock] == []:
            shutil.rmtree(hsm_dir, ignore_errors=True)


def _start_run(held: contextlib.ExitStack, cfg: HsmConfig, args, hsm_dir: Path) -> None:
    """Everything checked before the model loads (:func:`hsm.train.startup.claim_run`); rank 0's verdict is every
    rank's. Writes nothing but the lock (and, with ``overwrite_output_dir``, the removal of the old run)."""
    from hsm.train.startup import StartRequest, claim_run

    _ = args.device  # joins the launcher's process group, so the verdict reaches every rank
    args.resume_from_checkpoint = claim_run(held, StartRequest(
        RunPaths.at(hsm_dir), resume=args.resume_from_checkpoint, overwrite=bool(cfg.training.get(OVERWRITE_KEY, False)),
        check_files=cfg.mining is not None, source=cfg.source))


def _train(cfg: HsmConfig, args, output_dir: Path, hsm_dir: Path, base_trainer) -> dict[str, Any]:
    from transformers import Trainer

    from hsm.data.fusion import DetectionCollator, EvalDataset, FusionDataset
    from hsm.data.images import check_record_images
    from hsm.data.lengths import check_record_lengths, model_max_length
    from hsm.train.model import load_model_and_processor, model_callbacks
    from hsm.data.sampler import HsmSampler
    from hsm.train.run_files import write_dataset_info
    from hsm.train.session import MiningSession
    from hsm.train.trainer import make_trainer_class

    mining = cfg.mining
    fusion = cfg.custom.fusion_config
    checkpointing = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    model, processor = load_model_and_processor(cfg.model, seed=args.seed, gradient_checkpointing=checkpointing)
    dataset = FusionDataset(fusion, processor, cfg.model, mining=mining, num_train_epochs=args.num_train_epochs)
    check_record_lengths(dataset, model_max_length(model.config))  # before step 0, not at the step that OOMs
    if mining is not None:
        note = small_target_warning(mining.mode, mining.hard_sample_size, mining.regular_sample_size,
                                    dataset.target_info.size)
        if note:
            warnings.warn(f"hsm: {note}", stacklevel=2)
    eval_dataset = EvalDataset(dataset)
    check_record_images([*dataset.records, *eval_dataset.records.values()], fusion.max_image_side)  # before step 0
    collator = DetectionCollator(processor.tokenizer.pad_token_id)
    trainer_class = make_trainer_class(base_trainer or Trainer, mining=mining is not None)
    try:
        trainer = trainer_class(
            model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset if len(eval_dataset) else None,
            data_collator=collator, processing_class=processor.tokenizer,
        )
    except ValueError as e:  # e.g. report_to naming an integration that is not installed
        raise ConfigError(cfg.source, [f"training: {e}"]) from e
    for callback in model_callbacks(cfg.model, processor):
        trainer.add_callback(callback)
    # The schedule seed is the fusion's: switching mining on must not reshuffle epoch 0.
    target_epoch_size = mining.target_epoch_size if mining is not None and mining.mode == "fixed_set" else None
    sampler = HsmSampler(
        sizes=dataset.sizes, ratios=dataset.ratios, target=dataset.target_info, seed=fusion.seed,
        batch_size=args.per_device_train_batch_size, hsm_dir=hsm_dir if mining is not None else None,
        target_epoch_size=target_epoch_size,
    )
    if trainer.is_world_process_zero() and not args.dataloader_drop_last:
        sampler.warn_uneven_ranks(args.world_size)

    def prepare() -> None:  # written last, when training starts: every check and every load above succeeded
        if trainer.is_world_process_zero():
            from hsm.io import write_recorded

            write_recorded(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False,
                                          allow_unicode=True).encode("utf-8"), RunPaths.at(hsm_dir).config)
            write_dataset_info(hsm_dir, dataset)

    # The run is claimed (train() above); the session writes the run's files and opens its log when training starts.
    trainer.use_session(MiningSession(sampler=sampler, fusion=fusion, mining=mining, paths=RunPaths.at(hsm_dir),
                                      run_id=_agreed_run_id(output_dir.name), prepare=prepare))
    if mining is not None and mining.metric == "det_f1":
        _add_det_f1(trainer, cfg, processor)
    if cfg.custom.detection_eval is not None and cfg.custom.detection_eval.enabled:
        from hsm.eval.callback import DetectionEvalCallback

        trainer.add_callback(DetectionEvalCallback(trainer, cfg.custom.detection_eval, fusion, processor, cfg.model.coord_format))
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    from hsm.train import distributed

    distributed.barrier()
    return {"output_dir": str(output_dir), "hsm_dir": str(hsm_dir), "train_loss": result.training_loss,
            "global_step": result.global_step, "mining": mining is not None, "trainer": trainer}


def _add_det_f1(trainer, cfg: HsmConfig, processor) -> None:
    """The callback that logs ``det_f1``: before the session's, whose epoch end plans from its events."""
    from hsm.eval.train_quality import DetF1Callback
    from hsm.train.session import SessionCallback

    callbacks = trainer.callback_handler.callbacks
    at = next(i for i, c in enumerate(callbacks) if isinstance(c, SessionCallback))
    callbacks.insert(at, DetF1Callback(trainer, cfg.custom.det_f1, processor, cfg.model.coord_format))


def _agreed_run_id(local: str) -> str:
    """Rank 0's run id on every rank (output directories may differ across nodes)."""
    from hsm.train import distributed

    return distributed.broadcast_bytes(local.encode()).decode()
