"""The embedded default model: a tiny, randomly initialised Qwen3-VL with a processor
built in code (no download), or a real model from a local directory.

The tokenizer is a small byte-level BPE trained with ``tokenizers`` on hsm's own
prompt/answer vocabulary, with Qwen's special tokens and chat template.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from hsm.config import ModelConfig

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer", "build_processor", "build_model", "load_model_and_processor"]

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _training_corpus() -> list[str]:
    """Text the tiny tokenizer learns from: prompts, roles and detection answers."""
    from hsm.synth import CLASS_NAMES, DEFAULT_PROMPTS

    lines = ["system", "user", "assistant", "Detect all objects in the image.", "You are a helpful assistant."]
    lines += [p for pair in DEFAULT_PROMPTS.values() for p in pair]
    for i, label in enumerate(CLASS_NAMES):
        for n in range(0, 1001, 7):
            lines.append(json.dumps([{"bbox_2d": [n, (n * 3 + i) % 1001, (n + 13) % 1001, 1000 - n], "label": label}]))
    lines += [json.dumps(list(range(k, k + 40))) for k in range(0, 1001, 40)]
    return lines


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer():
    """A fast tokenizer with Qwen's special tokens and chat template (deterministic)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.padding_side = "right"
    return tokenizer


def _processor_class():
    from transformers import Qwen3VLProcessor

    class TinyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without a video processor (the stock one needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

        def check_argument_for_proper_class(self, argument_name, argument):  # video_processor is None on purpose
            if argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return TinyQwen3VLProcessor


def build_processor(cfg: ModelConfig):
    """The tiny processor: our tokenizer plus ``Qwen2VLImageProcessorPil`` from parameters."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": cfg.image_min_pixels, "longest_edge": cfg.image_max_pixels},
    )
    return _processor_class()(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    """A randomly initialised Qwen3-VL sized by ``cfg`` (hidden_size, num_layers, vision_depth)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    hidden = cfg.hidden_size
    heads = max(2, hidden // 16)
    head_dim = hidden // heads
    quarter = head_dim // 2 // 4
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": hidden * 2,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
            "head_dim": head_dim, "max_position_embeddings": 4096, "pad_token_id": tokenizer.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter], "mrope_interleaved": True},
        },
        vision_config={
            "depth": cfg.vision_depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": hidden,
            "num_position_embeddings": 256, "deepstack_visual_indexes": [0],
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config)


def load_model_and_processor(cfg: ModelConfig, seed: int = 0) -> tuple[Any, Any]:
    """The tiny built-in model, or ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a local directory."""
    if cfg.name_or_path == "tiny-qwen3-vl":
        processor = build_processor(cfg)
        return build_model(cfg, processor.tokenizer, seed), processor
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(cfg.name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.name_or_path: {path} is not a local directory (no downloads at run time)")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    return model, processor
