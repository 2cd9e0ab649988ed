"""hsm: hard-sample mining for fine-tuning vision-language detection models.

What users import comes from here, and only from here::

    from hsm import MiningConfig, PlanRequest, plan_epoch, connect

Every name is resolved on first use (PEP 562 ``__getattr__``), so ``import hsm`` and the
planning and SQL entry points never import torch; the training names import it when
they are first touched. Everything not listed in ``__all__`` is private: its module may
change without notice.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # configuration
    "HsmConfig": "hsm.config",
    "MiningConfig": "hsm.config",
    "SelectorConfig": "hsm.config",
    "FusionConfig": "hsm.config",
    "ConfigError": "hsm.config",
    "load_config": "hsm.config_load",
    "parse_config": "hsm.config_load",
    # planning and SQL (no torch)
    "plan_epoch": "hsm.mining.planner",
    "PlanRequest": "hsm.mining.planner",
    "PlanResult": "hsm.mining.planner",
    "connect": "hsm.mining.queries",
    "run_query": "hsm.mining.queries",
    "shipped_queries": "hsm.mining.queries",
    "QueryRefused": "hsm.mining.queries",
    # training (imports torch and transformers on first use); `hsm train CONFIG` is the command-line trainer
    "MiningSession": "hsm.train.session",
    "HsmMeta": "hsm.data.meta",
    "StartRequest": "hsm.train.startup",
    "RunPaths": "hsm.layout",
    "HsmTrainerMixin": "hsm.train.trainer",
    "per_sample_stats": "hsm.train.stats",
    "chunked_token_stats": "hsm.train.stats",
    "attach": "hsm.integrations.common",
    "HsmSFTTrainer": "hsm.integrations.trl",
    "detection_dataset": "hsm.integrations.trl",
    "write_grounding_jsonl": "hsm.integrations.swift",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve lazily below
    from hsm.config import ConfigError, FusionConfig, HsmConfig, MiningConfig, SelectorConfig
    from hsm.config_load import load_config, parse_config
    from hsm.integrations.common import attach
    from hsm.integrations.swift import write_grounding_jsonl
    from hsm.integrations.trl import HsmSFTTrainer, detection_dataset
    from hsm.mining.planner import PlanRequest, PlanResult, plan_epoch
    from hsm.mining.queries import QueryRefused, connect, run_query, shipped_queries
    from hsm.train.stats import chunked_token_stats, per_sample_stats
    from hsm.data.meta import HsmMeta
    from hsm.layout import RunPaths
    from hsm.train.startup import StartRequest
    from hsm.train.session import MiningSession
    from hsm.train.trainer import HsmTrainerMixin


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hsm' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
