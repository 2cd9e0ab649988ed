"""The one call that plugs hsm into a foreign trainer (TRL, ms-swift): :func:`attach`.

:func:`attach` wraps a ``transformers.Trainer`` subclass mixed with :class:`hsm.train.trainer.HsmTrainerMixin`
that keeps its own loss: its train dataset becomes a :class:`~hsm.integrations.slots.SlotDataset` read by hsm's
schedule slots, its collator a :class:`~hsm.integrations.collator.MetaCollator` that carries each row's
identity and answer-token roles past it, and the trainer holds a :class:`~hsm.train.session.MiningSession`
(``trainer.mining``). The trainer's ``compute_loss`` then takes the batch's metadata
(``trainer.mining.take(inputs)``) and hands its own pass's per-token values to ``trainer.mining.record``.

When ``trainer.train()`` starts, the session gives the run the protections ``hsm train`` has: the run's
lock, the refusal of a fresh run into a folder that holds one (``overwrite`` replaces it; only a resume
continues it), the check of every file of the run and a bounded decode of every row's image. Only then does
it leave a whole hsm run under ``hsm/``, as ``hsm train`` does: ``config.yaml`` (the resolved mining and
fusion config, what ``hsm plan`` and ``hsm report`` read without flags), ``dataset.json`` and
``samples.parquet`` (each target row's ``base_idx``, sample id, image path and answer: what ``base_idx``
points to after the trainer's own loading and shuffling, so the report can show its images), each with its
sha256 record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from hsm.config import FusionConfig, HsmConfig, MiningConfig, SourceConfig, TargetConfig
from hsm.data.sampler import HsmSampler
from hsm.integrations.collator import MetaCollator
from hsm.integrations.slots import Part, SlotDataset, row_contents
from hsm.layout import RunPaths
from hsm.train.session import MiningSession
from hsm.train.startup import StartRequest

__all__ = ["attach", "refuse_unsupported", "write_run_files", "check_row_images"]


def refuse_unsupported(mining: MiningConfig | None, stack: str, source: str = "<config>") -> None:
    """Refuse, at start-up, mining settings the foreign-trainer integrations cannot follow.

    ``metric: det_f1`` needs hsm's own generation pass over the target (``hsm train``); under another stack no
    such pass runs, so every plan would be empty.

    Args:
        mining: the mining config (None: nothing to check).
        stack: the trainer's name in the message (``TRL``, ``ms-swift``).
        source: the config file, for the message.
    """
    from hsm.config import ConfigError

    if mining is not None and mining.metric == "det_f1":
        raise ConfigError(source, [
            f"custom.hard_sample_mining.metric: 'det_f1' is measured by hsm train's own generation pass, which "
            f"{stack} does not run (every plan would be empty); use loss, token_acc or a box-aware metric under "
            f"{stack}, or train with hsm train"])


def check_row_images(contents: Sequence[dict], where: Sequence[str]) -> None:
    """Decode every image file a row names (bounded, :func:`hsm.data.images.check_image_files`) before step 0, so a
    truncated or corrupt image fails now, named, not at the step that draws it.

    Only files that exist are read: a name that is no file here is an image the dataset library holds as bytes
    (a hub dataset keeps the original file name beside them, ``sha256:...`` when it has none), which it decodes
    itself.

    Args:
        contents: :func:`~hsm.integrations.slots.row_contents` of the rows.
        where: what names each row in a message (its record's ``file:line`` when known).
    """
    import os

    from hsm.data.images import check_image_files

    check_image_files((w, image) for w, c in zip(where, contents) for image in c["images"]
                      if image and os.path.isfile(image))


def write_run_files(paths: RunPaths, slots: SlotDataset, contents: Sequence[dict], mining: MiningConfig | None,
                    fusion: FusionConfig, config: HsmConfig | None = None) -> None:
    """Write what ``hsm plan`` and ``hsm report`` read from a run, as ``hsm train`` leaves it (rank 0 only).

    ``config.yaml``: ``config`` (or an empty one) with the mining config resolved (its defaults filled in;
    disabled when ``mining`` is None) and ``fusion`` (the datasets actually trained on). ``dataset.json``: the
    datasets and the target's fingerprint. ``samples.parquet``: one row per target ``base_idx``: ``sample_id``,
    ``image`` (the first image's path or digest), ``answer`` and ``objects`` (:func:`row_contents`). Each is
    written whole with its sha256 record (:func:`hsm.io.write_recorded`).

    Args:
        paths: the run's layout.
        slots: the trainer's :class:`SlotDataset`.
        contents: :func:`row_contents` of the target rows, in ``base_idx`` order.
        mining: the mining config in force, or None.
        fusion: the datasets as the sampler draws them.
        config: the user's hsm config (ms-swift's ``HSM_CONFIG``), or None.
    """
    import pyarrow as pa
    import yaml

    from hsm.io import parquet_bytes, write_recorded
    from hsm.train.run_files import write_dataset_info

    base = config if config is not None else HsmConfig()
    resolved = mining if mining is not None else (base.custom.hard_sample_mining or MiningConfig()).model_copy(
        update={"enabled": False})
    custom = base.custom.model_copy(update={"hard_sample_mining": resolved, "fusion_config": fusion})
    payload = {"model": {"coord_format": base.model.coord_format},
               "custom": custom.model_dump(mode="json")}
    paths.root.mkdir(parents=True, exist_ok=True)
    write_recorded(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True).encode("utf-8"), paths.config)
    write_dataset_info(paths.root, slots)
    target = slots.parts[0]
    table = pa.table({
        "base_idx": pa.array(range(len(target.rows)), pa.int64()),
        "sample_id": pa.array([str(i) for i in target.sample_ids], pa.string()),
        "image": pa.array([(c["images"] or [None])[0] for c in contents], pa.string()),
        "answer": pa.array([c["answer"] for c in contents], pa.string()),
        "objects": pa.array([c["objects"] for c in contents], pa.string()),
    })
    write_recorded(parquet_bytes(table), paths.samples)


def attach(trainer, rows, name: str, *, mining: MiningConfig | None, seed: int, start: StartRequest | None = None,
           sample_ids: Sequence[str] | None = None, tokenizer=None, answers: Callable[[dict], list[str]] | None = None,
           world=None, run_id: str | None = None, target_rows: Sequence[int] | None = None,
           sources: Sequence[Part] = (), raw=None, config: HsmConfig | None = None, stack: str = "this trainer",
           where: Sequence[str] | None = None) -> MiningSession:
    """Plug hsm into ``trainer``, a Trainer subclass mixed with ``HsmTrainerMixin`` that keeps its own loss.

    Replaces ``trainer.train_dataset`` with a :class:`SlotDataset` over ``rows`` and ``trainer.data_collator``
    with a :class:`MetaCollator` around it, and hands the trainer a :class:`MiningSession` (``trainer.mining``;
    with ``mining=None`` it only trains on hsm's schedule, no events). Nothing is written here: the session
    claims the run, checks every row's image and writes the run's files (:func:`write_run_files`) when
    ``trainer.train()`` starts.

    Args:
        trainer: the trainer, built with its own dataset and collator.
        rows: the target rows, indexable by row number (the trainer's train dataset).
        name: the target's name in events and plans.
        mining: the mining configuration, or None to train on hsm's schedule without mining.
        seed: the schedule seed (keep it when switching mining on, so epoch 0 is unchanged).
        start: the run's layout and the start-up options (overwrite, the stack's hints); default
            ``<output_dir>/hsm``, a fresh run or a resume, the run's files checked when mining.
        sample_ids: one stable id per row; default ``<name>:<row>``.
        tokenizer: a fast tokenizer for answer-token roles (``coord_loss`` / ``label_loss``); None: no roles.
        answers: ``item -> assistant texts`` for the roles; None: the decoded supervised runs.
        world: the sampler's world when the trainer's loader is not accelerate-prepared (it then deals
            each rank its batches itself); None otherwise.
        run_id: the run's name in events; default the output directory's name.
        target_rows: the target's rows of ``rows`` (default all of them), when ``rows`` also holds sources.
        sources: the other datasets of ``rows``: never mined, each drawn its own row count per epoch (with
            replacement, as ``hsm train`` draws a source of ratio ``len(source) / len(target)``).
        raw: the rows before the trainer's encoding, with ``messages`` (and ``images``, ``objects``), row for row
            with ``rows``; default ``rows``. What each id names (:func:`row_contents`) is read from them.
        config: the user's hsm config, written resolved to ``hsm/config.yaml``; None: the mining config alone.
        stack: the trainer's name in start-up errors.
        where: what names each row of ``rows`` in an image error (its record's ``file:line``); default
            ``<stack> train dataset row <i>``.

    Returns:
        The session, also ``trainer.mining``.
    """
    refuse_unsupported(mining, stack, config.source if config is not None else "<config>")
    ids = [str(i) for i in sample_ids] if sample_ids is not None else []
    n_target = len(target_rows) if target_rows is not None else len(rows)
    if sample_ids is None:
        ids = [f"{name}:{i}" for i in range(n_target)]
    every_row = row_contents(raw if raw is not None else rows)
    contents = [every_row[i] for i in target_rows] if target_rows is not None else every_row
    slots = SlotDataset(rows, name, ids, target_rows=target_rows, sources=sources, target_contents=contents)
    trainer.train_dataset = slots
    trainer.data_collator = MetaCollator(trainer.data_collator, tokenizer=tokenizer, answers=answers)
    ratios = [len(part.rows) / n_target for part in sources]  # source_quota gives back each source's row count
    if start is None:
        start = StartRequest(RunPaths.of(trainer.args.output_dir), check_files=mining is not None, source=stack,
                             how_to_resume="trainer.train(resume_from_checkpoint=True)",
                             how_to_overwrite="attach(..., start=StartRequest(paths, overwrite=True))")
    paths = start.paths
    sampler = HsmSampler(sizes=slots.sizes, ratios=ratios, target=slots.info, seed=seed,
                         batch_size=trainer.args.per_device_train_batch_size,
                         hsm_dir=paths.root if mining is not None else None, world=world)
    fusion = FusionConfig(target=TargetConfig(name=name),
                          sources=[SourceConfig(name=part.name, ratio=ratio) for part, ratio in zip(sources, ratios)])
    where = list(where) if where is not None else [f"{stack} train dataset row {i}" for i in range(len(every_row))]

    def prepare() -> None:  # the run is claimed: check every image, then write the run's files
        check_row_images(every_row, where)
        if trainer.is_world_process_zero():
            if not trainer.args.dataloader_drop_last:
                sampler.warn_uneven_ranks(trainer.args.world_size)
            write_run_files(paths, slots, contents, mining, fusion, config)

    session = MiningSession(sampler=sampler, fusion=fusion, mining=mining, paths=paths,
                            run_id=run_id or Path(trainer.args.output_dir).name, start=start, prepare=prepare)
    trainer.use_session(session, owns_loss=False)
    return session
