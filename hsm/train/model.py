"""The model: the embedded tiny Qwen3-VL built in code, or a real checkpoint from a local
directory (or the local HF cache), made ready to train as users train one: dtype,
attention kernel, frozen towers, LoRA adapters (peft), pixel limits on the processor.

The tokenizer is a small byte-level BPE trained with ``tokenizers`` on hsm's own
prompt/answer vocabulary, with Qwen's special tokens and chat template.
:func:`build_checkpoint` writes tiny real-architecture Qwen2.5-VL / Qwen3-VL
checkpoints with their real processor classes (``save_pretrained``; no download).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from hsm.config import ModelConfig

__all__ = [
    "SPECIAL_TOKENS", "CHAT_TEMPLATE", "ARCHITECTURES", "build_tokenizer", "build_processor", "build_model",
    "build_checkpoint", "load_model_and_processor", "prepare_model", "component_of", "set_pixel_limits",
    "merged_state_dict", "model_callbacks", "load_adapter_checkpoint",
]

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
    from hsm.data.synth import CLASS_NAMES, DEFAULT_PROMPTS

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
        patch_size=cfg.patch_size, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
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
            "depth": cfg.vision_depth, "hidden_size": cfg.vision_hidden_size,
            "intermediate_size": 2 * cfg.vision_hidden_size, "num_heads": 2, "patch_size": cfg.patch_size,
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


ARCHITECTURES = ("qwen2_5_vl", "qwen3_vl")


def _mrope_section(head_dim: int) -> list[int]:
    quarter = head_dim // 2 // 4
    return [head_dim // 2 - 2 * quarter, quarter, quarter]


def _real_processor(arch: str, tokenizer, min_pixels: int, max_pixels: int):
    """The architecture's real processor class around the tiny tokenizer, configured small."""
    from transformers import Qwen2VLImageProcessor

    patch_size = 14 if arch == "qwen2_5_vl" else 16
    common = {"patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2}
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, **common)
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(size=size, **common)
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                   chat_template=CHAT_TEMPLATE)
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    video = Qwen3VLVideoProcessor(size=size, **common)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def _real_config(arch: str, tokenizer, hidden_size: int, num_layers: int, vision_depth: int):
    heads = max(2, hidden_size // 16)
    head_dim = hidden_size // heads
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = {
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 4096, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "bos_token_id": None,
    }
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
        vision = {"depth": vision_depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": hidden_size, "window_size": 56,
                  "fullatt_block_indexes": [vision_depth - 1]}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    from transformers import Qwen3VLConfig

    text["head_dim"] = head_dim
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim),
                               "mrope_interleaved": True}
    vision = {"depth": vision_depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": hidden_size,
              "num_position_embeddings": 256, "deepstack_visual_indexes": [0]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def build_checkpoint(out_dir, arch: str = "qwen3_vl", *, hidden_size: int = 64, num_layers: int = 2,
                     vision_depth: int = 1, min_pixels: int = 32 * 32, max_pixels: int = 128 * 128, seed: int = 0):
    """Write a tiny, randomly initialised real-architecture checkpoint (model + real processor) to ``out_dir``.

    ``arch`` is ``qwen2_5_vl`` (``Qwen2_5_VLForConditionalGeneration``, patch 14, resize factor 28) or
    ``qwen3_vl`` (``Qwen3VLForConditionalGeneration``, patch 16, factor 32). The directory loads with
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` like a downloaded one. Returns the directory.

    Args:
        out_dir: the directory to write (created).
        arch: ``qwen3_vl`` or ``qwen2_5_vl``.
        hidden_size: the text model's hidden size.
        num_layers: text decoder layers.
        vision_depth: vision transformer blocks.
        min_pixels: the processor's minimum image pixels.
        max_pixels: the processor's maximum image pixels.
        seed: seed of the random weights.
    """
    from pathlib import Path

    import torch
    from transformers import AutoModelForImageTextToText

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    processor = _real_processor(arch, tokenizer, min_pixels, max_pixels)
    config = _real_config(arch, tokenizer, hidden_size, num_layers, vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


_TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, _TORCH_DTYPES[name])


def component_of(name: str) -> str:
    """The part of a Qwen-VL model a parameter or module name belongs to: ``vision``, ``aligner`` or ``llm``.

    The aligner is Qwen's patch merger (``visual.merger``, plus ``visual.deepstack_merger_list`` in Qwen3-VL);
    everything else under ``visual`` is the vision tower; the rest (embeddings, decoder, lm_head) is the LLM.
    Peft prefixes (``base_model.model.``) are ignored.
    """
    parts = name.split(".")
    if "visual" not in parts:
        return "llm"
    after = parts[parts.index("visual") + 1:]
    return "aligner" if after and after[0] in ("merger", "deepstack_merger_list") else "vision"


def _frozen_components(cfg: ModelConfig) -> set[str]:
    return {c for c, frozen in (("vision", cfg.freeze_vision), ("aligner", cfg.freeze_aligner), ("llm", cfg.freeze_llm))
            if frozen}


def _lora_targets(model, cfg: ModelConfig) -> list[str]:
    """Full names of the linear layers that get adapters: the requested ones outside frozen components."""
    import torch

    frozen = _frozen_components(cfg)
    wanted = cfg.lora.target_modules
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or component_of(name) in frozen or name.split(".")[-1] == "lm_head":
            continue
        if wanted == "all-linear" or any(name == t or name.endswith(f".{t}") for t in wanted):
            names.append(name)
    if not names:
        raise ValueError(f"model.lora.target_modules: {wanted!r} matches no linear layer outside the frozen parts "
                         f"({', '.join(sorted(frozen)) or 'none frozen'})")
    return names


def prepare_model(model, cfg: ModelConfig, *, gradient_checkpointing: bool = False):
    """Freeze components, add LoRA adapters, and keep gradients flowing under activation checkpointing.

    Without LoRA, parameters of frozen components get ``requires_grad=False``. With LoRA, peft freezes every base
    weight; adapters go on the targeted linear layers of unfrozen components, and ``modules_to_save`` are
    trained in full. When checkpointing with frozen input embeddings, the embedding output is made to require
    grad (``enable_input_require_grads``): with reentrant checkpointing, a checkpointed block whose inputs need
    no grad would otherwise give its adapters no gradient.
    """
    frozen = _frozen_components(cfg)
    for name, param in model.named_parameters():
        if component_of(name) in frozen:
            param.requires_grad_(False)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=_lora_targets(model, cfg),
            modules_to_save=list(lora.modules_to_save) or None, bias="none",
        )
        model = get_peft_model(model, peft_config)
    if gradient_checkpointing and not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()
    return model


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> None:
    """Make the processor resize every image into ``[min_pixels, max_pixels]`` (what ``from_pretrained`` ignores)."""
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for attribute, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, attribute):
            setattr(image_processor, attribute, value)


def _load_pretrained(cfg: ModelConfig):
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(cfg.name_or_path)
    source = str(path) if path.is_dir() else cfg.name_or_path
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            f"model.name_or_path: {cfg.name_or_path} is neither a local directory nor a model in the local HF cache "
            "(no downloads at run time; download it first, e.g. `hf download <repo>`)"
        ) from e
    kwargs = {"dtype": _torch_dtype(cfg.torch_dtype), "local_files_only": True}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    return model, processor


def load_model_and_processor(cfg: ModelConfig, seed: int = 0, *, gradient_checkpointing: bool = False) -> tuple[Any, Any]:
    """The tiny built-in model, or ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a local directory or
    the local HF cache; then dtype, pixel limits, freezing and LoRA from ``cfg`` (:func:`prepare_model`)."""
    if cfg.name_or_path == "tiny-qwen3-vl":
        processor = build_processor(cfg)
        model = build_model(cfg, processor.tokenizer, seed)
        if cfg.torch_dtype != "auto":
            model = model.to(_torch_dtype(cfg.torch_dtype))
        if cfg.attn_implementation is not None:
            model.set_attn_implementation(cfg.attn_implementation)
    else:
        model, processor = _load_pretrained(cfg)
        set_pixel_limits(processor, cfg.image_min_pixels, cfg.image_max_pixels)
    return prepare_model(model, cfg, gradient_checkpointing=gradient_checkpointing), processor


def merged_state_dict(peft_model) -> dict:
    """The base model's state dict with LoRA merged, computed out of place.

    ``x.base_layer.weight`` -> ``x.weight = base + delta`` (peft's ``get_delta_weight``, i.e.
    ``(alpha / r) * B @ A``); ``x.modules_to_save.default.w`` -> ``x.w``; adapter and ``original_module``
    tensors dropped. Naive equivalent: ``copy.deepcopy(peft_model).merge_and_unload().state_dict()``.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    delta = module.get_delta_weight(adapter)
                    deltas[f"{name}.base_layer.weight"] = deltas.get(f"{name}.base_layer.weight", 0) + delta
        state = {}
        for name, tensor in base.state_dict().items():
            if ".lora_" in name or ".original_module." in name:
                continue
            if name in deltas:
                tensor = (tensor + deltas[name].to(tensor.dtype)).contiguous()
            state[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = tensor
    return state


def model_callbacks(cfg: ModelConfig, processor) -> list:
    """Trainer callbacks the model config asks for: merge LoRA into the base at the end of training."""
    if cfg.lora is None or not cfg.lora.merge_on_save:
        return []
    from transformers import TrainerCallback

    class MergeLoraCallback(TrainerCallback):
        """Train end: ``output_dir/merged`` = base with adapters merged (rank 0), loadable without peft."""

        def on_train_end(self, args, state, control, model=None, **kwargs):
            from pathlib import Path

            if not state.is_world_process_zero or model is None:
                return
            out = Path(args.output_dir) / "merged"
            # Out of place: the trainer's model keeps its adapters and its base weights bit for bit
            # (merge_and_unload strips the adapters; merge/unmerge rounds the base weights).
            model.get_base_model().save_pretrained(out, state_dict=merged_state_dict(model))
            processor.save_pretrained(out)

    return [MergeLoraCallback()]


def load_adapter_checkpoint(cfg: ModelConfig, checkpoint):
    """A LoRA checkpoint (``adapter_config.json``, no ``config.json``) as a plain model: the base from
    ``cfg.name_or_path`` with the adapters (and ``modules_to_save``) merged in.

    Args:
        cfg: the model config; ``name_or_path`` is the base the adapters were trained on.
        checkpoint: the adapter folder (``hsm train``, TRL or ms-swift).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(cfg.name_or_path, dtype=_torch_dtype(cfg.torch_dtype),
                                                       local_files_only=True)
    return PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
