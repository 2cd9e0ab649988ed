"""The one validated configuration tree, loaded from YAML plus ``KEY=VALUE`` overrides.

Everything lives under ``custom`` as in the seeds: ``custom.hard_sample_mining``
(docs/design.md §2) and ``custom.fusion_config`` (docs/design.md §3). ``model`` and
``training`` belong to ``hsm train``. Every model forbids unknown keys, and
:func:`hsm.config_load.load_config` reports every problem at once with its dotted
key path, the bad value and what is accepted.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from hsm.metrics import METRIC_NAMES, METRICS

__all__ = [
    "ConfigError",
    "SelectorConfig",
    "describe_selector",
    "MiningConfig",
    "PromptConfig",
    "AugmentationConfig",
    "TargetConfig",
    "SourceConfig",
    "FusionConfig",
    "DetectionEvalConfig",
    "DetF1Config",
    "CustomConfig",
    "LoraConfig",
    "ModelConfig",
    "HsmConfig",
    "mining_config_hash",
    "small_target_warning",
    "decimal_fraction",
]


def decimal_fraction(value: float) -> Fraction:
    """``value`` as the decimal the user wrote: ``Fraction(str(0.07))`` is exactly 7/100.

    ``str`` of a float is its shortest round-tripping decimal, which is what YAML
    (or a ``KEY=VALUE`` override) held.
    """
    return Fraction(str(value))


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` holds one line per bad key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid configuration ({len(problems)} problem(s)):\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SelectorConfig(_Strict):
    """How the hard set is chosen in ``reweight`` mode (docs/design.md §4)."""

    mode: Literal["top_k", "percentile", "threshold"] = Field(
        "top_k", description="top_k: the k hardest; percentile: the hardest ceil(value*N); "
        "threshold: every sample with score >= threshold."
    )
    k: int = Field(500, ge=1, description="Number of hard samples for mode top_k.")
    value: float = Field(0.1, gt=0.0, le=1.0, description="Fraction of eligible samples for mode percentile.")
    threshold: float | None = Field(None, description="Absolute score cut for mode threshold.")

    @model_validator(mode="after")
    def _threshold_needs_value(self) -> "SelectorConfig":
        if self.mode == "threshold" and self.threshold is None:
            raise ValueError("threshold: selector.mode 'threshold' needs selector.threshold (a number)")
        return self


# The one setting each selector mode reads; the others keep their defaults and mean nothing to it.
_SELECTOR_SETTING = {"top_k": "k", "percentile": "value", "threshold": "threshold"}


def describe_selector(selector: dict | None) -> str | None:
    """A selector (as in a manifest) for people: its mode and the one setting that mode uses.

    ``{"mode": "percentile", "k": 500, "value": 0.2, "threshold": None}`` -> ``"percentile 0.2"``
    (``k`` is not shown: percentile mode ignores it). None for no selector (modes other than reweight).
    """
    if not selector:
        return None
    mode = selector.get("mode")
    key = _SELECTOR_SETTING.get(mode)
    return f"{mode} {selector.get(key)}" if key else str(mode)


# Keys that only one mode reads; setting one under another mode is warned about.
_MODE_KEYS = {
    "selector": "reweight", "hard_weight": "reweight",
    "hard_sample_size": "fixed_set", "regular_sample_size": "fixed_set", "target_epoch_size": "fixed_set",
    "hard_pool_frac": "dynamic", "hard_pool_k": "dynamic",
}


class MiningConfig(_Strict):
    """``custom.hard_sample_mining``: all three mining strategies as modes of one system."""

    enabled: bool = Field(False, description="Master switch; false means no hsm object at all.")
    mode: Literal["reweight", "fixed_set", "dynamic"] = Field(
        "reweight", description="reweight (loss-weighted epoch), fixed_set (a fixed hard + regular set), dynamic (per-batch hard share); docs/design.md §2."
    )
    metric: Literal[METRIC_NAMES] | None = Field(  # one row of hsm.metrics.METRICS per name
        None, description="Difficulty signal (hsm.metrics): " + "; ".join(f"{m.name}: {m.doc}" for m in METRICS.values())
        + ". Events where a nullable metric is null are not observations; det_f1 is measured every custom.det_f1.every "
        "epochs. Default: token_acc for dynamic, else loss."
    )
    aggregate: Literal["ema", "mean", "epoch_ema", "last"] = Field(
        "ema", description="Score: ema (per observation, after 3 observations; else mean), mean, epoch_ema "
        "(mean per epoch, then a bias-corrected EMA across the epochs the sample was seen in, decay "
        "ema_decay per epoch) or last (the mean of the latest epoch the sample was seen in)."
    )
    ema_decay: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="ema = decay * ema + (1 - decay) * x; per observation for ema, per epoch for epoch_ema.",
    )
    start_epoch: int = Field(1, ge=0, description="First epoch (0-based) that may use a plan.")
    plateau_delta: float | None = Field(
        None, ge=0.0, description="Also wait until the epoch mean train loss improves by less than this fraction."
    )
    activate_after_pct: float = Field(
        0.0, ge=0.0, le=1.0, description="Plans apply only from epoch >= activate_after_pct * num_train_epochs."
    )
    selector: SelectorConfig = Field(default_factory=SelectorConfig, description="Hard-set selector (reweight).")
    hard_weight: float = Field(3.0, gt=0.0, description="reweight: weight of a hard sample (others 1).")
    hard_sample_size: int = Field(500, ge=0, description="fixed_set: number of hardest samples kept.")
    regular_sample_size: int = Field(150, ge=0, description="fixed_set: number of other samples drawn.")
    target_epoch_size: int | None = Field(
        None, ge=1, description="fixed_set: draws of the target per epoch (default: the base target size)."
    )
    hard_pool_frac: float = Field(0.30, gt=0.0, le=1.0, description="dynamic: hard pool = ceil(frac * N) and per-batch hard share.")
    hard_pool_k: int | None = Field(None, ge=1, description="dynamic: fixed hard pool size, overrides hard_pool_frac for the pool.")
    mine_clean: bool = Field(False, description="Show samples drawn as hard without augmentation.")
    dump: bool = Field(False, description="Also write output_dir/hard_samples_epoch_{n}.json.")
    log_prefix: str = Field("hsm/", description="Prefix of every logged scalar.")
    stale_after: int | None = Field(
        None, ge=1, description="Samples not seen in the last stale_after epochs are stale (see stale_policy); "
        "null: scores never go stale."
    )
    stale_policy: Literal["decay", "flag"] = Field(
        "decay", description="decay: a stale score moves toward the mean target score by a factor ema_decay per "
        "epoch from the stale_after-th unseen epoch on; flag: stale samples are never hard."
    )
    engine: Literal["polars", "duckdb", "numpy"] = Field(
        "polars", description="Planner engine: Polars, DuckDB SQL, or the hand-written numpy fold (the fastest "
        "measured); all give identical plans.")
    seed: int = Field(42, ge=0, description="Seed of every plan-time and schedule-time random draw.")
    exclude_suspects: bool = Field(
        False, description="Keep label-noise suspects (>= 3 epochs, top 10% by mean per-epoch metric, "
        "variability <= median; see hsm.mining.suspects) out of the hard set: weight 1, never upweighted; listed in the manifest."
    )

    @model_validator(mode="after")
    def _resolve_metric(self) -> "MiningConfig":
        # Only keys changed from their default: a resolved config (hsm/config.yaml) holds every key.
        ignored = sorted(k for k in self.model_fields_set if _MODE_KEYS.get(k, self.mode) != self.mode
                         and getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True))
        if ignored and self.enabled:
            warnings.warn(
                f"custom.hard_sample_mining: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to "
                f"mode '{self.mode}' and {'is' if len(ignored) == 1 else 'are'} ignored ({'; '.join(f'{k} is for {_MODE_KEYS[k]}' for k in ignored)})",
                UserWarning, stacklevel=2,
            )
        if self.metric is None:
            self.metric = "token_acc" if self.mode == "dynamic" else "loss"
        if self.mode == "fixed_set" and self.hard_sample_size + self.regular_sample_size == 0:
            raise ValueError("hard_sample_size: fixed_set needs hard_sample_size + regular_sample_size >= 1")
        return self


class PromptConfig(_Strict):
    """A system and a user prompt; either may be left to a lower priority level."""

    system: str | None = Field(None, description="System prompt.")
    user: str | None = Field(None, description="User prompt (the instruction shown with the image).")


class AugmentationConfig(_Strict):
    """Box-aware augmentation; strength may follow a curriculum over training progress."""

    enabled: bool = Field(True, description="Run augmentation ops.")
    hflip_p: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip.")
    scale: tuple[float, float] = Field((0.8, 1.0), description="Random resized crop scale range (area fraction).")
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="Brightness/contrast jitter strength.")
    curriculum: bool = Field(False, description="Scale strength linearly from curriculum_start to 1 over training.")
    curriculum_start: float = Field(0.25, ge=0.0, le=1.0, description="Strength at progress 0 when curriculum is on.")


class _DatasetBase(_Strict):
    name: str = Field(..., min_length=1, description="Dataset name, used in events and plans.")
    train_jsonl: Path | None = Field(None, description="Detection JSONL (needed by hsm train, not by hsm plan).")
    val_jsonl: Path | None = Field(None, description="Optional evaluation split, never shuffled.")
    prompts: PromptConfig = Field(default_factory=PromptConfig, description="Dataset-specific prompts (highest priority).")
    max_objects_per_image: int | None = Field(None, ge=1, description="Seeded cap on objects per image before encoding.")


class TargetConfig(_DatasetBase):
    """The fusion target: the only dataset that mining touches."""

    augmentation: AugmentationConfig | None = Field(None, description="Override; default inherits the global policy.")
    domain: str = Field("target", description="Prompt domain of the target.")


class SourceConfig(_DatasetBase):
    """An auxiliary source: drawn with replacement round(ratio * N_target) times per epoch."""

    ratio: float = Field(..., ge=0.0, description="Draws per epoch as a fraction of the base target size.")
    augmentation: AugmentationConfig | None = Field(None, description="Sources are clean unless this enables it.")
    domain: str = Field("source", description="Prompt domain of this source.")


class FusionConfig(_Strict):
    """``custom.fusion_config``: the unified fusion loader (docs/design.md §3)."""

    target: TargetConfig = Field(..., description="The target dataset.")
    sources: list[SourceConfig] = Field(default_factory=list, description="Auxiliary datasets.")
    domain_prompts: dict[str, PromptConfig] = Field(
        default_factory=dict, description="Prompts per domain (e.g. target, source): middle priority."
    )
    default_prompts: PromptConfig = Field(default_factory=PromptConfig, description="Lowest-priority prompts.")
    augmentation: AugmentationConfig = Field(
        default_factory=lambda: AugmentationConfig(enabled=False), description="Global policy, inherited by the target."
    )
    max_image_side: int = Field(1024, ge=16, description="Largest accepted image side; larger raises (no smart-resize).")
    eval_sources: bool = Field(False, description="Also evaluate on sources that have a val_jsonl.")
    seed: int = Field(0, ge=0, description="Seed of source draws, shuffles, caps and augmentation.")

    @model_validator(mode="after")
    def _unique_names(self) -> "FusionConfig":
        names = [self.target.name] + [s.name for s in self.sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"sources: dataset names must be unique, repeated: {duplicated}")
        return self


class DetectionEvalConfig(_Strict):
    """``custom.detection_eval``: ``hsm eval`` during training (greedy answers, COCO metrics)."""

    enabled: bool = Field(False, description="Run detection evaluation during training.")
    every: Literal["epoch"] | int = Field("epoch", description="'epoch': after every epoch; N: every N optimizer steps.")
    datasets: list[str] = Field(
        default_factory=lambda: ["target"],
        description="'target', 'all' (the target and every source with a val_jsonl) or dataset names; "
        "each is evaluated on its val_jsonl.",
    )
    max_new_tokens: int = Field(512, ge=1, description="Generation length limit per answer.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate the first N records of each val_jsonl (None: all).")
    batch_size: int = Field(8, ge=1, description="Generation batch size per rank.")

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, value: Any) -> Any:
        if value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be 'epoch' or a number of optimizer steps >= 1, got {value!r}")


class DetF1Config(_Strict):
    """``custom.det_f1``: how the ``det_f1`` metric is measured (read only when mining on ``det_f1``)."""

    every: int = Field(1, ge=1, description="Measure at the end of epochs 0, every, 2*every, ... (not after the last).")
    batch_size: int = Field(32, ge=1, description="Generation batch size per rank.")
    max_new_tokens: int = Field(512, ge=1, description="Generation length limit per answer.")


class CustomConfig(_Strict):
    """``custom``: hsm's own sections."""

    hard_sample_mining: MiningConfig | None = Field(None, description="Hard-sample mining (absent = disabled).")
    fusion_config: FusionConfig | None = Field(None, description="The unified fusion loader.")
    detection_eval: DetectionEvalConfig | None = Field(None, description="Detection metrics during training (absent = off).")
    det_f1: DetF1Config = Field(default_factory=DetF1Config, description="Measuring the det_f1 mining metric.")

    @model_validator(mode="after")
    def _detection_eval_datasets(self) -> "CustomConfig":
        evaluation, fusion = self.detection_eval, self.fusion_config
        if evaluation is None or not evaluation.enabled or fusion is None:
            return self
        names = [fusion.target.name] + [s.name for s in fusion.sources]
        unknown = [n for n in evaluation.datasets if n not in ("target", "all", *names)]
        if unknown:
            raise ValueError(f"detection_eval.datasets: {unknown} not in the fusion (accepted: target, all, {', '.join(names)})")
        return self


class LoraConfig(_Strict):
    """``model.lora``: train low-rank adapters (peft) instead of the full weights."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0.0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (suffixes) that get adapters, or 'all-linear' (every linear layer "
        "of the language model; the vision tower and merger only when not frozen)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved beside the adapter (e.g. lm_head)."
    )
    merge_on_save: bool = Field(
        False, description="At the end of training also write output_dir/merged: the base with adapters merged in."
    )


class ModelConfig(_Strict):
    """The model: the embedded tiny Qwen3-VL or a local directory."""

    name_or_path: str = Field("tiny-qwen3-vl", description="'tiny-qwen3-vl' (built in code) or a local directory.")
    coord_format: Literal["rel1000", "abs"] = Field(
        "rel1000", description="Box coordinates in answers: 0-1000 relative (Qwen2/3-VL) or absolute pixels (Qwen2.5-VL)."
    )
    image_min_pixels: int = Field(32 * 32, ge=1, description="Processor min_pixels.")
    image_max_pixels: int = Field(128 * 128, ge=1, description="Processor max_pixels.")
    hidden_size: int = Field(64, ge=8, description="Tiny model only: text hidden size.")
    num_layers: int = Field(2, ge=1, description="Tiny model only: text layers.")
    vision_depth: int = Field(1, ge=1, description="Tiny model only: vision blocks.")
    vision_hidden_size: int = Field(32, ge=8, description="Tiny model only: vision hidden size (MLP twice that).")
    patch_size: int = Field(16, ge=2, description="Tiny model only: vision patch side in pixels (merge 2: one "
                            "visual token per 2 * patch_size square).")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight dtype on load; auto keeps the checkpoint's (float32 for the built-in tiny model)."
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = Field(
        None, description="Attention kernel; null lets transformers choose (sdpa where available)."
    )
    freeze_vision: bool = Field(False, description="Freeze the vision tower (patch embedding and blocks).")
    freeze_aligner: bool = Field(False, description="Freeze the aligner (Qwen's patch merger, deepstack mergers included).")
    freeze_llm: bool = Field(False, description="Freeze the language model (embeddings, decoder layers, lm_head).")
    lora: LoraConfig | None = Field(None, description="LoRA adapters via peft (absent = train the unfrozen weights).")


class HsmConfig(_Strict):
    """The whole file given to ``hsm train`` (or ``hsm plan``)."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model.")
    training: dict[str, Any] = Field(default_factory=dict, description="transformers.TrainingArguments fields.")
    deepspeed: str | dict[str, Any] | None = Field(None, description="DeepSpeed config (path or mapping).")
    custom: CustomConfig = Field(default_factory=CustomConfig, description="hsm sections.")
    _source: str = PrivateAttr("<config>")

    @property
    def source(self) -> str:
        """The file this config was read from (for error messages)."""
        return self._source

    @property
    def mining(self) -> MiningConfig | None:
        """The mining config when enabled, else None (the caller branches on this)."""
        mining = self.custom.hard_sample_mining
        return mining if mining is not None and mining.enabled else None

    @property
    def target_name(self) -> str | None:
        fusion = self.custom.fusion_config
        return fusion.target.name if fusion is not None else None


def mining_config_hash(mining: MiningConfig, target_name: str | None) -> str:
    """sha256 over what changes a plan: the mining config less its cosmetic keys, plus the target name."""
    payload = mining.model_dump(mode="json", exclude={"dump", "log_prefix", "engine"})
    payload["target"] = target_name
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def small_target_warning(mode: str, n_hard: int, n_regular: int, n_target: int) -> str | None:
    """What fixed_set does when ``n_hard + n_regular`` cover a target of ``n_target`` samples, else None.

    With the defaults (500 + 150) every sample of a target smaller than 650 is drawn once per
    epoch: mining changes nothing.
    """
    if mode != "fixed_set" or n_target <= 0 or n_hard + n_regular < n_target:
        return None
    if n_hard >= n_target:
        what = f"hard_sample_size={n_hard} >= the {n_target} target samples: every sample is hard (weight 1)"
    else:
        what = (f"hard_sample_size + regular_sample_size = {n_hard} + {n_regular} >= the {n_target} target "
                f"samples: every sample is drawn once per epoch")
    example = f" (e.g. {n_target // 5} + {n_target // 10})" if n_target >= 10 else ""
    return (f"fixed_set: {what}, so mining changes nothing; set hard_sample_size and regular_sample_size "
            f"so that they add up to less than {n_target}{example}")
