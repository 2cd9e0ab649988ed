"""Generate answers on validation sets and score them: what ``hsm eval run`` and the
training callback share.

Ranks split each dataset by ``index % world_size``; rank 0 gathers the answers
(by broadcast, no shared file system needed), scores and writes. Generation runs
on the unwrapped model with no collective inside, so ZeRO-3 (partitioned
parameters) is not supported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hsm.train import distributed
from hsm.config import FusionConfig
from hsm.data.encoding import resolve_prompts
from hsm.eval.generation import generate_answers
from hsm.eval.scoring import record_keys, score_records_file, write_answers, write_dataset, write_metrics
from hsm.data.records import read_jsonl

__all__ = ["EvalSplit", "default_eval_dir", "select_datasets", "shard", "merge_shards", "evaluate_model", "scalar_logs"]


def default_eval_dir(checkpoint: str | Path) -> Path:
    """Where ``hsm eval run`` writes without ``--out``: ``<checkpoint's parent>/eval/<checkpoint name>``.

    Beside the checkpoint, not inside it: checkpoint rotation (``save_total_limit``)
    deletes whole checkpoint folders. Under a run's ``OUTPUT_DIR`` this is
    ``OUTPUT_DIR/eval/checkpoint-N/``, beside the callback's ``eval/step=S/``, where
    ``hsm report`` finds it.

    Args:
        checkpoint: the saved model directory.
    """
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent / "eval" / checkpoint.name


@dataclass(frozen=True)
class EvalSplit:
    """A dataset to evaluate: its fusion name and its ``val_jsonl``."""

    name: str
    val_jsonl: Path


def select_datasets(fusion: FusionConfig, selection: list[str]) -> list[EvalSplit]:
    """Resolve ``target`` / ``all`` / dataset names to datasets with a ``val_jsonl``, in fusion order.

    ``all`` means the target and every source that has a ``val_jsonl``; a dataset
    named explicitly (``target`` included) must have one.
    """
    specs = [fusion.target, *fusion.sources]
    keys = {fusion.target.name: "custom.fusion_config.target"}
    keys.update({s.name: f"custom.fusion_config.sources.{i}" for i, s in enumerate(fusion.sources)})
    selection = list(selection) or ["target"]
    unknown = [n for n in selection if n not in ("target", "all", *keys)]
    if unknown:
        raise ValueError(f"datasets {unknown}: not in the fusion (accepted: target, all, {', '.join(keys)})")
    wanted = {fusion.target.name if n == "target" else n for n in selection if n != "all"}
    chosen = []
    for spec in specs:
        if spec.name in wanted and spec.val_jsonl is None:
            raise ValueError(f"{keys[spec.name]}.val_jsonl: not set; dataset '{spec.name}' has no evaluation split")
        if spec.name in wanted or ("all" in selection and spec.val_jsonl is not None):
            chosen.append(EvalSplit(spec.name, Path(spec.val_jsonl)))
    return chosen


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's share: ``items[rank::world_size]``."""
    return items[rank::world_size]


def merge_shards(shards: list[list]) -> list:
    """Undo :func:`shard`: item ``i`` is ``shards[i % world_size][i // world_size]``."""
    world_size = len(shards)
    merged: list = [None] * sum(len(s) for s in shards)
    for rank, values in enumerate(shards):
        merged[rank::world_size] = values
    return merged


def evaluate_model(model, processor, fusion: FusionConfig, datasets: list[EvalSplit], out_dir: str | Path,
                   coord_format: str, *, max_new_tokens: int, batch_size: int, max_samples: int | None = None,
                   on_batch: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """Generate on each dataset's val split, score, and write ``out_dir/<dataset>/...`` (rank 0).

    ``on_batch(dataset, done, total)`` reports progress. Returns ``{dataset: metrics}``
    on rank 0 and ``{}`` on the other ranks.

    Raises:
        RuntimeError: a launcher's environment names several ranks but no process group exists
            (each rank would score only its shard); :func:`hsm.train.distributed.init_from_launcher`.
    """
    world = distributed.current_world()
    if world.world_size > 1 and not distributed.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE={world.world_size} in the environment (a launcher such as torchrun) but no torch.distributed "
            "process group: every rank would score only its own shard of the val set; call "
            "hsm.train.distributed.init_from_launcher() first (hsm eval run does)")
    out_dir = Path(out_dir)
    results: dict[str, dict] = {}
    for dataset in datasets:
        records = read_jsonl(dataset.val_jsonl)
        if max_samples is not None:
            records = records[:max_samples]
        mine = shard(records, world.rank, world.world_size)
        done = 0

        def progress(n: int, name: str = dataset.name, total: int = len(mine)) -> None:
            nonlocal done
            done += n
            if on_batch is not None:
                on_batch(name, done, total)

        answers = generate_answers(model, processor, mine, resolve_prompts(fusion, dataset.name),
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   max_image_side=fusion.max_image_side, on_batch=progress)
        # Every rank's answers on every rank, as JSON bytes (no pickle).
        shards = [json.loads(b) for b in distributed.all_gather_bytes(json.dumps(answers).encode("utf-8"))]
        if not distributed.on_main(world):
            continue
        ordered = merge_shards(shards)
        directory = out_dir / dataset.name
        write_answers(directory / "answers.jsonl", record_keys(records), ordered)
        score = score_records_file(dataset.val_jsonl, ordered, coord_format, processor=processor, records=records)
        write_dataset(score, directory, dataset.name)
        results[dataset.name] = score.metrics
    if distributed.on_main(world) and results:
        write_metrics(results, out_dir / "metrics.json")
    return results


def scalar_logs(results: dict[str, dict], prefix: str = "eval/") -> dict[str, float]:
    """Flat ``eval/<dataset>/<metric>`` scalars for the Trainer's log (undefined values left out)."""
    logs = {}
    for name, metrics in results.items():
        for key in ("mAP", "AP50", "AP75", "AR100", "mean_best_iou", "precision50", "recall50", "duplicate_rate",
                    "parse_failures", "truncated", "unknown_labels"):
            value = metrics.get(key)
            if value is not None:
                logs[f"{prefix}{name}/{key}"] = float(value)
        for label, value in metrics.get("per_class", {}).items():
            if value is not None:
                logs[f"{prefix}{name}/AP/{label}"] = float(value)
    return logs
