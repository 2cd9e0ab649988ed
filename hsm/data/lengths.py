"""Each record's encoded length against the model's maximum, counted without running the processor.

One image with 10,000 boxes encodes to ~270,000 tokens; a model that takes 4,096 fails on it
mid-training, trying to allocate the attention of that sequence. The length is counted from
its parts, the way :meth:`hsm.data.encoding.Template.encode` builds the sequence:

    length = head + n_images * visual + tail

``head`` is the chat text before the assistant turn, tokenised once per dataset, with the
image placeholder counted ``n_images`` times; ``visual = (h / patch) * (w / patch) / merge**2``
of the image as the processor resizes it (:func:`hsm.data.answer.resized_size`); ``tail`` is
``<|im_start|>assistant\\n`` + answer + ``<|im_end|>\\n`` tokenised alone, which ``encode``
checks equals the end of the sequence. The answer is the record's own, after the dataset's
``max_objects_per_image``, without augmentation (which only drops boxes and keeps the size).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from hsm.data.answer import format_answer, needs_resized, resized_size
from hsm.data.encoding import Prompts, Template
from hsm.data.fusion import FusionDataset, cap_objects
from hsm.data.records import Record, RecordError

__all__ = ["model_max_length", "visual_token_count", "record_lengths", "length_problems", "check_record_lengths"]

_HEADER = "<|im_start|>assistant\n"
_END = "<|im_end|>\n"
_SHOWN = 50


def model_max_length(model_config) -> int | None:
    """The longest sequence the model takes: its text config's ``max_position_embeddings``
    (None when the config has none).

    Args:
        model_config: a transformers model config (``model.config``).
    """
    text_config = getattr(model_config, "text_config", None) or model_config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def visual_token_count(processor, width: int, height: int) -> int:
    """Tokens the processor gives an image of ``width x height``: ``(h / patch) * (w / patch) / merge**2``
    of its resized size (``image_grid_thw.prod() // merge_size**2``).

    Args:
        processor: a Qwen-VL processor (or its image processor).
        width: the image's width in pixels.
        height: the image's height in pixels.
    """
    image_processor = getattr(processor, "image_processor", processor)
    patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
    rw, rh = resized_size(processor, width, height)
    return (rh // patch) * (rw // patch) // (merge * merge)


def _head(template: Template, prompts: Prompts) -> tuple[int, int]:
    """``(text tokens, image placeholders)`` of the chat text before the assistant turn."""
    tokenizer = template.processor.tokenizer
    text = template.prompt(prompts.user, prompts.system)
    ids = tokenizer(text[:text.rindex("<|im_start|>")])["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(getattr(template.processor, "image_token", "<|image_pad|>"))
    n_images = ids.count(image_id)
    return len(ids) - n_images, n_images


def record_lengths(template: Template, prompts: Prompts, records: list[Record], *, coord_format: str,
                   cap: int | None = None, seed: int = 0, code: int = 0) -> np.ndarray:
    """Encoded length of every record, as :meth:`FusionDataset.load` (no augmentation) encodes it.

    Naive equivalent: ``[len(dataset.load(Slot(code, i, False, 0, 0), train=False)["input_ids"])
    for i in range(len(records))]``, which decodes every image and runs the processor.

    Args:
        template: the shared template (processor and chat format).
        prompts: the dataset's prompts.
        records: the records, in dataset order (the index is the cap's ``base_idx``).
        coord_format: ``model.coord_format``.
        cap: the dataset's ``max_objects_per_image``.
        seed: the fusion seed (the cap's draw).
        code: the dataset's index in the fusion (the cap's draw).
    """
    processor = template.processor
    head, n_images = _head(template, prompts)
    answers, visual = [], np.zeros(len(records), dtype=np.int64)
    for i, record in enumerate(records):
        boxes, labels, _ = cap_objects(record, cap, seed=seed, code=code, base_idx=i)
        resized = resized_size(processor, record.width, record.height) if needs_resized(coord_format) else None
        answers.append(_HEADER + format_answer(boxes, labels, record.width, record.height, coord_format, resized) + _END)
        visual[i] = visual_token_count(processor, record.width, record.height)
    tails = processor.tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
    return head + n_images * visual + np.array([len(t) for t in tails], dtype=np.int64)


def length_problems(template: Template, prompts: Prompts, records: list[Record], max_length: int, *,
                    coord_format: str, cap: int | None = None, seed: int = 0, code: int = 0,
                    config_key: str = "custom.fusion_config.target") -> list[str]:
    """One line per record whose encoded length exceeds ``max_length``: ``file:line``, its length,
    the maximum, and the ``max_objects_per_image`` that would fit it.

    Args:
        template: as for :func:`record_lengths` (so are ``coord_format``, ``cap``, ``seed``, ``code``).
        prompts: the dataset's prompts.
        records: the records.
        max_length: the model's maximum (:func:`model_max_length`).
        config_key: the dataset's config key, for the hint.
    """
    count = dict(coord_format=coord_format, cap=cap, seed=seed, code=code)
    lengths = record_lengths(template, prompts, records, **count)
    problems = []
    for i in np.flatnonzero(lengths > max_length):
        record = records[i]
        n_objects = len(cap_objects(record, cap, seed=seed, code=code, base_idx=int(i))[0])
        # Tokens per object from this record itself; the rest is the prompt and the image.
        alone = replace(record, objects=())
        empty = int(record_lengths(template, prompts, [alone], coord_format=coord_format)[0])
        per_object = (int(lengths[i]) - empty) / max(n_objects, 1)
        fits = int((max_length - empty) // per_object) if per_object > 0 and max_length > empty else 0
        hint = (f"; it has {n_objects} objects: set {config_key}.max_objects_per_image to at most {fits}" if fits > 0
                else "; the prompt and image alone are too long: lower model.image_max_pixels")
        problems.append(f"{record.where}: encodes to {int(lengths[i])} tokens, over the model's maximum of "
                        f"{max_length}{hint}, or drop the record")
    return problems


def check_record_lengths(dataset: FusionDataset, max_length: int | None) -> None:
    """Raise before training when any training record encodes longer than the model takes.

    Args:
        dataset: the fusion dataset about to be trained on.
        max_length: the model's maximum; None skips the check.

    Raises:
        RecordError: every record over the maximum (the first 50 listed, and the count).
    """
    if max_length is None:
        return
    problems = []
    for code, records in enumerate(dataset.records):
        key = "custom.fusion_config." + ("target" if code == 0 else f"sources.{code - 1}")
        problems += length_problems(dataset.template, dataset.prompts[code], records, max_length,
                                    coord_format=dataset.model_cfg.coord_format, cap=dataset.caps[code],
                                    seed=dataset.fusion.seed, code=code, config_key=key)
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise RecordError(f"{len(problems)} record(s) encode longer than the model's maximum of {max_length} tokens:"
                          f"\n{listed}{more}")
