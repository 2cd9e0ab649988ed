"""``hsm eval``: detection metrics of VLM answers (``score``) and of a checkpoint (``run``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hsm.cli.common import console, fail

__all__ = ["eval_app"]

eval_app = typer.Typer(help="Detection metrics (COCO mAP/AR, parse failures, duplicates) of VLM answers.",
                       no_args_is_help=True)


def _processor(spec: str):
    """The processor behind ``--processor``: a training config's model, the tiny one, or a local directory."""
    from hsm.config import ModelConfig
    from hsm.config_load import load_config

    if spec.endswith((".yaml", ".yml")):
        model_cfg = load_config(spec).model
    else:
        model_cfg = ModelConfig(name_or_path=spec)
    if model_cfg.name_or_path == "tiny-qwen3-vl":
        from hsm.train.model import build_processor

        return build_processor(model_cfg)
    from transformers import AutoProcessor

    if not Path(model_cfg.name_or_path).is_dir():
        raise FileNotFoundError(f"--processor {spec}: {model_cfg.name_or_path} is not a local directory (no downloads at run time)")
    return AutoProcessor.from_pretrained(model_cfg.name_or_path, local_files_only=True)


@eval_app.command("score")
def score(
    records: Path = typer.Option(..., "--records", help="Validation JSONL (hsm records)."),
    answers: Path = typer.Option(..., "--answers", help='JSONL of {"id": <record id>, "answer": "<raw text>"}.'),
    coord_format: str = typer.Option("rel1000", "--coord-format", help="rel1000 (0-1000 relative) or abs (resized pixels)."),
    processor: Optional[str] = typer.Option(
        None, "--processor",
        help="For abs, the processor whose resize gave the answer's pixels: a training config YAML (its model), "
        "a local processor directory, or tiny-qwen3-vl.",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name in the outputs (default: the records file's stem)."),
    out: Path = typer.Option(Path("eval_out"), "--out", help="Output folder (one subfolder per dataset)."),
) -> None:
    """Score answers produced by any engine against the records."""
    from hsm.data.answer import COORD_FORMATS, needs_resized
    from hsm.config import ConfigError
    from hsm.eval.scoring import AnswerError, read_answers, record_keys, score_records_file, summary_table, write_dataset, write_metrics
    from hsm.data.records import RecordError, read_jsonl

    if coord_format not in COORD_FORMATS:
        raise fail("eval score", f"--coord-format must be one of {', '.join(COORD_FORMATS)}, got {coord_format!r}")
    if needs_resized(coord_format) and processor is None:
        raise fail("eval score", f"--coord-format {coord_format} needs --processor (the resize that produced the answer's pixels)")
    name = name or records.stem
    try:
        rows = read_jsonl(records, check_images=False)
        aligned = read_answers(answers, record_keys(rows))
        result = score_records_file(records, aligned, coord_format, records=rows,
                                    processor=_processor(processor) if processor else None)
    except (RecordError, AnswerError, ConfigError, FileNotFoundError) as e:
        raise fail("eval score", str(e)) from e
    write_dataset(result, out / name, name)
    write_metrics({name: result.metrics}, out / "metrics.json")
    console.print(summary_table({name: result.metrics}))
    console.print(f"wrote {out / name}/(gt.json, detections.json, per_sample.parquet, metrics.json)")


@eval_app.command("run")
def run(
    config: Path = typer.Argument(..., help="The training config YAML (datasets, prompts, model)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Saved model directory (e.g. OUTPUT_DIR/checkpoint-N)."),
    datasets: Optional[List[str]] = typer.Option(
        None, "--datasets", help="target (default), all, or dataset names (repeat the option or separate with commas)."
    ),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Generation length limit per answer."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Generation batch size."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Only the first N records per dataset."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: CHECKPOINT/../eval/CHECKPOINT_NAME, beside the checkpoint: "
        "checkpoint rotation deletes checkpoint folders)."),
) -> None:
    """Generate greedily with a checkpoint on each dataset's val_jsonl, then score the answers."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hsm.config import ConfigError

    from hsm.config_load import load_config
    from hsm.data.records import RecordError

    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise fail("eval run", str(e)) from e
    if cfg.custom.fusion_config is None:
        raise fail("eval run", f"{config}: custom.fusion_config is missing (the datasets to evaluate)")
    from hsm.eval.evaluate import default_eval_dir, evaluate_model, select_datasets
    from hsm.eval.generation import load_checkpoint
    from hsm.eval.scoring import summary_table

    from hsm.train import distributed

    # Under torchrun each rank generates on its shard of every val set; rank 0 gathers, scores and writes.
    distributed.init_from_launcher()
    main = distributed.on_main(distributed.current_world())
    try:
        names = [n for item in datasets or ["target"] for n in item.split(",") if n]
        chosen = select_datasets(cfg.custom.fusion_config, names)
        model, processor = load_checkpoint(cfg.model, checkpoint)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise fail("eval run", str(e)) from e
    model.to(distributed.local_device())
    out = out or default_eval_dir(checkpoint)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not main) as progress:
        tasks: dict[str, int] = {}

        def on_batch(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(f"generating {name}", total=total)
            progress.update(tasks[name], completed=done)

        try:
            results = evaluate_model(model, processor, cfg.custom.fusion_config, chosen, out, cfg.model.coord_format,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, max_samples=max_samples,
                                     on_batch=on_batch)
        except (RecordError, FileNotFoundError) as e:
            raise fail("eval run", str(e)) from e
    distributed.destroy_process_group()
    if main:
        console.print(summary_table(results))
        console.print(f"wrote {out}/<dataset>/(answers.jsonl, gt.json, detections.json, per_sample.parquet, metrics.json)")
