"""Loading the configuration: YAML, ``KEY=VALUE`` overrides, relative paths, every problem at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hsm.config import ConfigError, HsmConfig
from hsm.utf8 import NotUtf8Error, read_utf8

__all__ = ["OVERWRITE_KEY", "LEGACY_LOADER_NAMES", "load_config", "parse_config", "apply_overrides", "resolve_paths", "training_problems"]

LEGACY_LOADER_NAMES = ("MultiSourceFusionDataset", "multi_source_fusion", "multi_source")
_LEGACY_MESSAGE = (
    "the legacy multi-source loader ({name}) was removed; custom.fusion_config always "
    "uses the unified fusion loader (hsm.data.fusion.FusionDataset): delete this key"
)


def _describe_error(error: dict[str, Any], model: type[BaseModel]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(model, error["loc"][:-1])
        accepted = ", ".join(sorted(parent.model_fields)) if parent is not None else "?"
        return f"{path}: unknown key (accepted here: {accepted})"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
        # A model validator names its own key as "key: text".
        key, sep, rest = message.partition(": ")
        if sep and " " not in key:
            path = f"{path}.{key}" if path else key
            message = rest
    message = _CLASS_REPR.sub(r"\1", message)  # "<class 'pathlib.Path'>" -> "Path"
    return f"{path}: {message} (got {_as_written(error.get('input'))})" if kind != "value_error" else f"{path}: {message}"


_CLASS_REPR = re.compile(r"<class '(?:[\w]+\.)*(\w+)'>")


def _as_written(value: Any) -> str:
    """A config value as YAML writes it inline (``{x: 1}``, ``[a, b]``), not as a Python repr; strings quoted."""
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 20, allow_unicode=True).strip()
    return repr(value)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _legacy_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    custom = raw.get("custom") if isinstance(raw.get("custom"), dict) else {}
    for key in LEGACY_LOADER_NAMES:
        if key in custom:
            problems.append(f"custom.{key}: " + _LEGACY_MESSAGE.format(name=key))
    fusion = custom.get("fusion_config")
    if isinstance(fusion, dict):
        for key in ("loader", "dataset_class", "legacy", "use_legacy_loader"):
            if key in fusion:
                problems.append(
                    f"custom.fusion_config.{key}: " + _LEGACY_MESSAGE.format(name=f"{key}={fusion[key]!r}")
                )
    return problems


def parse_config(raw: Any, source: str = "<config>", *, for_training: bool = False) -> HsmConfig:
    """Validate a mapping into :class:`HsmConfig`, raising :class:`ConfigError` with all problems.

    Args:
        raw: the mapping (YAML already read).
        source: where it came from, for the error messages.
        for_training: also check every ``training.*`` value (:func:`training_problems`), so a
            bad ``training`` key is reported together with the ``custom.*`` ones, not after them.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"<root>: expected a mapping, got {type(raw).__name__}"])
    problems = _legacy_problems(raw)
    if for_training:
        training = raw.get("training", {})
        problems += training_problems(training)[1] if isinstance(training, dict) else []
    try:
        config = HsmConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_describe_error(err, HsmConfig) for err in e.errors()] + problems
        raise ConfigError(source, problems) from e
    if problems:
        raise ConfigError(source, problems)
    return config


# (key, bound, strictly greater): values TrainingArguments accepts but training cannot run with.
# ``training.overwrite_output_dir: true`` replaces the hsm run already in ``output_dir`` (hsm's key, not the Trainer's).
OVERWRITE_KEY = "overwrite_output_dir"

_TRAINING_RANGES = (
    ("per_device_train_batch_size", 1, False), ("per_device_eval_batch_size", 1, False),
    ("gradient_accumulation_steps", 1, False), ("learning_rate", 0, False), ("num_train_epochs", 0, True),
    ("logging_steps", 0, True), ("save_steps", 0, True), ("warmup_ratio", 0, False), ("weight_decay", 0, False),
)


def _accepts_bool(annotation: Any) -> bool:
    import typing

    return annotation is bool or bool in typing.get_args(annotation)


def training_problems(training: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Type-check every ``training.*`` value against ``TrainingArguments``: ``(coerced values, problems)``.

    One line per problem with its dotted key: unknown fields, a missing ``output_dir``, values
    of the wrong type, and values ``TrainingArguments`` accepts but training cannot run with
    (a batch size of 0). Imports transformers: called only for training.
    """
    import dataclasses
    import typing

    from pydantic import TypeAdapter
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    training = dict(training)
    overwrite = training.pop(OVERWRITE_KEY, False)  # hsm's own key (TrainingArguments 5.x has none)
    problems = [f"training.{k}: unknown TrainingArguments field" for k in sorted(set(training) - known)]
    if not isinstance(overwrite, bool):
        problems.append(f"training.{OVERWRITE_KEY}: {overwrite!r} is not a boolean (true replaces the hsm run "
                        "already in output_dir)")
    if "output_dir" not in training:
        problems.append("training.output_dir: required key is missing")
    values = dict(training)
    for key in sorted(set(training) & known):
        value = training[key]
        if isinstance(value, bool) and not _accepts_bool(hints[key]):
            value = "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` (save_strategy: no) as false
        try:
            values[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as e:
            accepted = getattr(hints[key], "__name__", None) or str(hints[key])
            problems.append(f"training.{key}: {training[key]!r} is not a valid {accepted} ({e.errors()[0]['msg']})")
    for key, low, strict in _TRAINING_RANGES:
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value <= low if strict else value < low):
            problems.append(f"training.{key}: {value!r} must be {'>' if strict else '>='} {low}")
    return values, problems


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=VALUE`` overrides (VALUE parsed as YAML) to a nested mapping, in place.

    A numeric path part indexes a list (``custom.fusion_config.sources.0.ratio=0.5``).

    Args:
        raw: the mapping to change.
        overrides: ``KEY=VALUE`` strings with dotted keys.

    Raises:
        ConfigError: an override without ``=``, or a path through a non-mapping.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError("<overrides>", [f"{item!r}: expected KEY=VALUE with a dotted KEY"])
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("<overrides>", [f"{key}: value {text!r} is not valid YAML ({e})"]) from e
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, parts[: depth + 1])]
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                where = ".".join(parts[: depth + 1])
                raise ConfigError("<overrides>", [f"{key}: {where} is a value ({child!r}), not a mapping"])
            node = child
        if isinstance(node, list):
            node[_list_index(node, parts[-1], parts)] = value
        else:
            node[parts[-1]] = value
    return raw


def _list_index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError("<overrides>", [f"{'.'.join(parts)}: no list element {part!r} (length {len(node)})"])
    return int(part)


_TRAINING_PATH_KEYS = ("output_dir", "logging_dir", "resume_from_checkpoint")


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str((base / value).resolve())
    return value


def resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make every relative path in a raw config absolute against ``base``, in place.

    The paths: ``training.output_dir``, ``training.logging_dir``,
    ``training.resume_from_checkpoint`` (when a string other than ``last``), ``deepspeed`` (when a string),
    ``model.name_or_path`` (only when ``base / value`` exists: it may be a hub id),
    and every dataset's ``train_jsonl`` and ``val_jsonl``. Other values are left
    for validation to judge.
    """
    training = raw.get("training")
    if isinstance(training, dict):
        for key in _TRAINING_PATH_KEYS:
            if key in training and not (key == "resume_from_checkpoint" and training[key] == "last"):
                training[key] = _absolute(training[key], base)  # `last`: the newest complete checkpoint, not a path
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = _absolute(raw["deepspeed"], base)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        name = model["name_or_path"]
        if name and not Path(name).is_absolute() and (base / name).exists():
            model["name_or_path"] = str((base / name).resolve())
    custom = raw.get("custom")
    fusion = custom.get("fusion_config") if isinstance(custom, dict) else None
    if isinstance(fusion, dict):
        sources = fusion.get("sources")
        for dataset in [fusion.get("target"), *(sources if isinstance(sources, list) else [])]:
            if isinstance(dataset, dict):
                for key in ("train_jsonl", "val_jsonl"):
                    if key in dataset:
                        dataset[key] = _absolute(dataset[key], base)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, *, for_training: bool = False) -> HsmConfig:
    """Read a YAML file, apply overrides, validate.

    Relative paths written in the file resolve against the file's directory;
    relative paths given as ``KEY=VALUE`` overrides resolve against the working
    directory (where the command was typed). See :func:`resolve_paths` for the keys.

    Args:
        path: the YAML file.
        overrides: ``KEY=VALUE`` strings with dotted keys (``training.num_train_epochs=3``).
        for_training: also check the ``training`` section (:func:`parse_config`).

    Raises:
        ConfigError: every problem at once, each with its dotted key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(read_utf8(path))
    except FileNotFoundError as e:
        raise ConfigError(str(path), ["file not found"]) from e
    except NotUtf8Error as e:
        raise ConfigError(str(path), [str(e)]) from e
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from e
    raw = raw if isinstance(raw, dict) else ({} if raw is None else raw)
    if isinstance(raw, dict):
        resolve_paths(raw, path.resolve().parent)
    raw = apply_overrides(raw, overrides or [])
    if isinstance(raw, dict):
        resolve_paths(raw, Path.cwd())
    config = parse_config(raw, str(path), for_training=for_training)
    config._source = str(path)
    return config
