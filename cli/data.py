"""``hsm data``: import COCO, generate the synthetic corpus, validate JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hsm.cli.common import console, fail, print_warning

__all__ = ["data_app"]

data_app = typer.Typer(help="Detection data: import, synthesize, validate.", no_args_is_help=True, rich_markup_mode=None)


@data_app.command("import-coco")
def import_coco(
    coco_json: Path = typer.Argument(..., help="COCO detection annotations (instances_*.json)."),
    images: Path = typer.Option(..., "--images", help="Folder holding the COCO images."),
    out: Path = typer.Option(..., "--out", help="JSONL to write (the train split when --val-fraction > 0)."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", min=0.0, max=0.99,
                                       help="Share of images written to OUT_STEM_val.jsonl as a val split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val draw."),
    id_prefix: Optional[str] = typer.Option(None, "--id-prefix", help="Record ids are PREFIX-IMAGE_ID (default: OUT's stem)."),
    allow_missing: bool = typer.Option(False, "--allow-missing",
                                       help="Write the (empty) JSONL even when no image is found (default: exit 2)."),
) -> None:
    """Convert COCO detection annotations to hsm's JSONL record format.

    Only boxes are imported (keypoints, segmentations and unused categories are ignored, and
    said so). A relative file_name is looked up under --images; an absolute one is used and written as it is.
    A repeated or non-integer image id is an error; annotations of unknown images are dropped and named.
    """
    from hsm.data.coco import import_coco as convert
    from hsm.data.records import RecordError

    try:
        result = convert(coco_json, images, out, id_prefix=id_prefix, val_fraction=val_fraction, seed=seed,
                         allow_missing=allow_missing)
    except RecordError as e:
        raise fail("data import-coco", str(e)) from e
    for line in result.warnings():
        print_warning(line)
    console.print(f"wrote {result.n_train} records to {result.train_path.resolve()}", soft_wrap=True)
    if result.val_path is not None:
        console.print(f"wrote {result.n_val} records to {result.val_path.resolve()}", soft_wrap=True)


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Folder for the corpus."),
    n_target: int = typer.Option(96, help="Target training images."),
    n_source: int = typer.Option(48, help="Training images per source."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Generate the synthetic demo corpus (target 'bbu', sources 'lvis' and 'coco')."""
    from hsm.data.synth import synthesize

    paths = synthesize(out, n_target=n_target, n_source=n_source, seed=seed)
    for name, path in paths.items():
        console.print(f"{name:<6} {path}")


@data_app.command("validate")
def validate(
    jsonl: Path = typer.Argument(..., help="JSONL to check, images included."),
    max_image_side: Optional[int] = typer.Option(
        None, "--max-image-side", min=1, help="Also report images whose longer side exceeds this (fusion_config.max_image_side)."
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="Training config YAML: also report every record that encodes longer than its model "
        "takes (with that config's processor, prompts and max_objects_per_image)."),
) -> None:
    """Check every record and every decoded image (existence, size); report every bad line."""
    from hsm.config import ConfigError
    from hsm.data.records import validate_jsonl

    count, problems = validate_jsonl(jsonl, max_side=max_image_side)
    if config is not None:
        try:
            problems += _length_problems(jsonl, config)
        except (ConfigError, FileNotFoundError) as e:
            raise fail("data validate", str(e)) from e
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:200])
        more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
        counts = f"{_count(len(problems), 'problem', 'problems')} in {_count(count, 'readable record', 'readable records')}"
        raise fail("data validate", f"{jsonl}: {counts}:\n{shown}{more}")
    console.print(f"{jsonl}: {_count(count, 'record', 'records')} OK")


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _processor_and_max_length(model_cfg):
    """The config's processor and its model's maximum sequence length, without loading weights."""
    from hsm.data.lengths import model_max_length

    if model_cfg.name_or_path == "tiny-qwen3-vl":
        import torch

        from hsm.train.model import build_model, build_processor

        processor = build_processor(model_cfg)
        with torch.device("meta"):  # only its config is read: no weights allocated or initialised
            model = build_model(model_cfg, processor.tokenizer)
        return processor, model_max_length(model.config)
    from transformers import AutoConfig, AutoProcessor

    from hsm.train.model import set_pixel_limits

    try:
        processor = AutoProcessor.from_pretrained(model_cfg.name_or_path, local_files_only=True)
        model_config = AutoConfig.from_pretrained(model_cfg.name_or_path, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"model.name_or_path: {model_cfg.name_or_path} is not a local model ({e})") from e
    set_pixel_limits(processor, model_cfg.image_min_pixels, model_cfg.image_max_pixels)
    return processor, model_max_length(model_config)


def _length_problems(jsonl: Path, config: Path) -> list[str]:
    """Records of ``jsonl`` longer than the model of ``config`` takes, with the dataset's prompts and cap
    (the dataset whose train_jsonl or val_jsonl is ``jsonl``; else the target's prompts and no cap)."""
    from hsm.config import ConfigError
    from hsm.config_load import load_config
    from hsm.data.encoding import Template, resolve_prompts
    from hsm.data.lengths import length_problems
    from hsm.data.records import readable_records

    cfg = load_config(config)
    fusion = cfg.custom.fusion_config
    if fusion is None:
        raise ConfigError(str(config), ["custom.fusion_config: missing (the datasets, their prompts and caps)"])
    specs = [fusion.target, *fusion.sources]
    matches = [k for k, spec in enumerate(specs) for path in (spec.train_jsonl, spec.val_jsonl)
               if path is not None and Path(path).resolve() == jsonl.resolve()]
    code = matches[0] if matches else 0
    if not matches:
        console.print(f"[yellow]note:[/] {jsonl} is no dataset of {config}: counted with the target's prompts and "
                      "no max_objects_per_image", soft_wrap=True)
    processor, max_length = _processor_and_max_length(cfg.model)
    if max_length is None:
        return []
    key = "custom.fusion_config." + ("target" if code == 0 else f"sources.{code - 1}")
    return length_problems(Template(processor), resolve_prompts(fusion, specs[code].name), readable_records(jsonl),
                           max_length, coord_format=cfg.model.coord_format,
                           cap=specs[code].max_objects_per_image if matches else None, seed=fusion.seed, code=code,
                           config_key=key)
