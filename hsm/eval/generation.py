"""Greedy, batched answers from a model: the prompt is the training template's, no answer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hsm.config import ModelConfig
from hsm.data.encoding import Prompts, Template
from hsm.data.records import Record

__all__ = ["load_checkpoint", "load_image", "generate_answers"]


def load_checkpoint(model_cfg: ModelConfig, checkpoint: str | Path):
    """``(model, processor)`` for a saved checkpoint (a local directory).

    The model comes from the checkpoint; the processor too when it holds one
    (``preprocessor_config.json``), else from ``model_cfg``: the tiny model's is built
    in code, a real model's is read from ``model.name_or_path``.

    Args:
        model_cfg: the model config (the base for a LoRA checkpoint; the tiny processor).
        checkpoint: a ``checkpoint-N`` folder: full weights (``config.json``) or a peft
            adapter folder (``adapter_config.json``), from ``hsm train``, TRL or ms-swift.

    Raises:
        FileNotFoundError: the folder holds neither.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint = Path(checkpoint)
    is_adapter = (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "config.json").is_file()
    if not (checkpoint / "config.json").is_file() and not is_adapter:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no config.json; not a saved model directory")
    if is_adapter:  # a LoRA checkpoint: the base from model.name_or_path, adapters merged in
        from hsm.train.model import load_adapter_checkpoint

        model = load_adapter_checkpoint(model_cfg, checkpoint)
    else:
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True)
    if model_cfg.name_or_path == "tiny-qwen3-vl":
        from hsm.train.model import build_processor

        processor = build_processor(model_cfg)
    else:
        source = checkpoint if (checkpoint / "preprocessor_config.json").is_file() else Path(model_cfg.name_or_path)
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    return model, processor


def load_image(record: Record, max_image_side: int):
    """The record's image as an RGB PIL image, checked against the record's size and decoded with
    the bound of :func:`hsm.data.images.load_rgb` (no resizing here).

    Raises:
        RecordError: the image is missing, unreadable or not what the record says (names ``file:line``).
    """
    from PIL import Image

    from hsm.data.images import load_rgb

    return Image.fromarray(load_rgb(record, max_image_side))


def generate_answers(model, processor, records: list[Record], prompts: Prompts, *, max_new_tokens: int,
                     batch_size: int, max_image_side: int, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """One greedy answer per record, in record order (``on_batch(n)`` after each batch of ``n``).

    Prompts are left-padded so every row continues from its own last token; the
    answer is the decoded new tokens without special tokens. The model is put in
    eval mode for the call and restored.

    Args:
        model: the model (any ``generate``-capable VLM).
        processor: its processor.
        records: what to answer, one image each.
        prompts: system and user prompt.
        max_new_tokens: generation limit per answer.
        batch_size: rows per ``generate`` call.
        max_image_side: images larger than this are refused (as in training).
        on_batch: called with the number of rows after each batch.
    """
    import torch

    template = Template(processor)
    tokenizer = processor.tokenizer
    text = template.prompt(prompts.user, prompts.system)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            images = [load_image(r, max_image_side) for r in batch]
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"
            try:
                inputs = processor(images=images, text=[text] * len(batch), padding=True, return_tensors="pt")
            finally:
                tokenizer.padding_side = side
            inputs = inputs.to(model.device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=end_id)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        if was_training:
            model.train()
    return answers
