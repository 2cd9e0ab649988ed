"""Image + prompt -> the model's chat format, with labels only on the answer.

One :class:`Template` instance is shared by every dataset of a fusion (seed 004):
prompts resolve by priority default < domain < dataset-specific, and the
template's system prompt is restored after every encode, so no sample's system
prompt leaks into the next.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from hsm.answer import format_answer  # re-exported: the answer text lives in hsm.answer
from hsm.config import FusionConfig, PromptConfig

__all__ = ["IGNORE_INDEX", "Prompts", "resolve_prompts", "format_answer", "Template"]

IGNORE_INDEX = -100
_FALLBACK = PromptConfig(system="You are a helpful assistant.", user="Detect all objects in the image.")


@dataclass(frozen=True)
class Prompts:
    system: str
    user: str


def resolve_prompts(fusion: FusionConfig, dataset_name: str) -> Prompts:
    """Priority per field: dataset-specific > domain > default (> built-in fallback)."""
    datasets = {fusion.target.name: fusion.target, **{s.name: s for s in fusion.sources}}
    dataset = datasets[dataset_name]
    levels = [dataset.prompts, fusion.domain_prompts.get(dataset.domain, PromptConfig()), fusion.default_prompts, _FALLBACK]
    system = next(level.system for level in levels if level.system is not None)
    user = next(level.user for level in levels if level.user is not None)
    return Prompts(system, user)


class Template:
    """The single shared encoder: chat template + processor + label masking."""

    def __init__(self, processor, default_system: str = _FALLBACK.system):
        self.processor = processor
        self.system = default_system
        tokenizer = processor.tokenizer
        self._im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self._assistant_header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    @contextmanager
    def system_prompt(self, system: str):
        """Use ``system`` for one encode; the previous system prompt is always restored."""
        previous = self.system
        self.system = system
        try:
            yield
        finally:
            self.system = previous

    def prompt(self, user: str, system: str | None = None) -> str:
        """The chat text up to the assistant's answer (what generation continues from)."""
        with self.system_prompt(system if system is not None else self.system):
            messages = [
                {"role": "system", "content": self.system},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
            ]
            return self.processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, image, user: str, answer: str, system: str | None = None) -> dict:
        """Tokenise one sample; ``labels`` are -100 everywhere except the answer and its ``<|im_end|>``."""
        prompt = self.prompt(user, system)
        text = prompt + answer + "<|im_end|>\n"
        batch = self.processor(images=[image], text=[text], return_tensors="np")
        input_ids = batch["input_ids"][0]
        starts = np.flatnonzero(input_ids == self._im_start)
        answer_start = int(starts[-1]) + 1 + len(self._assistant_header)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[answer_start:-1] = input_ids[answer_start:-1]  # the trailing "\n" after <|im_end|> is not trained
        return {
            "input_ids": input_ids,
            "attention_mask": batch["attention_mask"][0],
            "mm_token_type_ids": batch["mm_token_type_ids"][0],
            "labels": labels,
            "pixel_values": batch["pixel_values"],
            "image_grid_thw": batch["image_grid_thw"],
        }
