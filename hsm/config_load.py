"""Loading the configuration: YAML, ``KEY=VALUE`` overrides, relative paths, every problem at once.

OmegaConf reads the YAML and applies the overrides (its dotlist, ``${...}`` interpolations);
transformers' ``HfArgumentParser`` judges the ``training`` section; hsm's pydantic models
judge the rest. Every problem is reported with the file and the dotted key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hsm.config import ConfigError, HsmConfig, ModelConfig
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


def training_problems(training: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Check every ``training.*`` value with transformers' own parser: ``(converted values, problems)``.

    A key must be a field ``HfArgumentParser(TrainingArguments).parse_dict`` accepts, and each
    value goes through the conversion ``HfArgumentParser`` gives its field on the command line
    (``--learning_rate fast``: "invalid float value"; ``--save_strategy sometimes``: "invalid
    choice"), so the types are transformers' own. A list is checked item by item where the
    field takes a list, a mapping is passed on where it takes one (``lr_scheduler_kwargs``).
    hsm adds: a missing ``output_dir``, hsm's own ``overwrite_output_dir``, and values
    ``TrainingArguments`` accepts but training cannot run with (a batch size of 0). One line per
    problem with its dotted key. Imports transformers: called only for training.
    """
    import dataclasses
    import typing

    from transformers import HfArgumentParser, TrainingArguments

    # exit_on_error=False: a bad value raises ArgumentError instead of ending the process;
    # allow_abbrev=False: `--learning_rat` is not taken for `--learning_rate`.
    parser = HfArgumentParser(TrainingArguments, exit_on_error=False, allow_abbrev=False)
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}  # what parse_dict accepts
    hints = typing.get_type_hints(TrainingArguments)
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
        try:
            values[key] = _parsed(parser, key, training[key], hints[key])
        except ValueError as e:
            problems.append(f"training.{key}: {_as_written(training[key])} is not a valid value ({e})")
    for key, low, strict in _TRAINING_RANGES:
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value <= low if strict else value < low):
            problems.append(f"training.{key}: {value!r} must be {'>' if strict else '>='} {low}")
    return values, problems


def _parsed(parser: Any, key: str, value: Any, hint: Any) -> Any:
    """``value`` as ``parser`` converts ``--key=value``; ValueError with the parser's message."""
    import types
    import typing

    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = {typing.get_origin(m) or m for m in members}
    if value is None:
        if type(None) in kinds:
            return None
        raise ValueError("the field does not take null")
    if isinstance(value, dict):
        if dict in kinds:
            return value  # TrainingArguments checks the mapping itself
        raise ValueError("the field does not take a mapping")
    if isinstance(value, list):
        if list not in kinds:
            raise ValueError("the field takes one value, not a list")
        items = [_parsed_text(parser, key, item) for item in value]
        return [item[0] if isinstance(item, list) else item for item in items]  # a list field parses as [item]
    return _parsed_text(parser, key, value)


def _parsed_text(parser: Any, key: str, value: Any) -> Any:
    import argparse

    # A bool as the command line spells it: YAML 1.1 reads a bare `no` (save_strategy: no) as false.
    text = ("yes" if value else "no") if isinstance(value, bool) else str(value)
    try:
        namespace, _ = parser.parse_known_args([f"--{key}={text}"])
    except argparse.ArgumentError as e:
        raise ValueError(e.message) from e
    return getattr(namespace, key)


def _first_line(error: BaseException) -> str:
    """An OmegaConf or YAML error's own first line (OmegaConf appends ``full_key:`` / ``object_type=`` lines)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _to_mapping(tree: Any, source: str, resolve: bool = True) -> dict[str, Any]:
    """An OmegaConf tree as plain dicts and lists, ``${...}`` interpolations resolved (or, without ``resolve``,
    kept as the literal text).

    Raises:
        ConfigError: an interpolation that does not resolve, naming its key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(tree, resolve=resolve)
    except OmegaConfBaseException as e:
        raise ConfigError(source, [f"{e.full_key or '<root>'}: {_first_line(e)}"]) from e


def _keys_set_by(overrides: list[str]) -> frozenset[str]:
    """The dotted keys whose values the overrides wrote: each KEY, or every key inside a mapping or list VALUE.

    ``sources[0].ratio`` counts as ``sources.0.ratio``; a mapping VALUE merges, so the keys it
    does not name keep the file's values (and the file's folder for a relative path).
    """
    def leaves(key: str, value: Any) -> list[str]:
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        return [leaf for k, v in children for leaf in leaves(f"{key}.{k}", v)] or [key]

    keys: list[str] = []
    for item in overrides:
        key, _, text = item.partition("=")
        keys += leaves(re.sub(r"\[(\d+)\]", r".\1", key), yaml.safe_load(text))
    return frozenset(keys)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with ``a.b.c=VALUE`` overrides applied (OmegaConf's dotlist, VALUE read as YAML); a new mapping.

    A key the mapping lacks is created with its parents; a numeric part indexes a list
    (``custom.fusion_config.sources.0.ratio=0.5`` or ``sources[0].ratio``); a mapping VALUE
    merges into the mapping already there, any other VALUE replaces what was there;
    ``a.b\\.c=1`` sets the key ``b.c`` of ``a``; ``${training.output_dir}`` in a VALUE is an
    OmegaConf interpolation.

    Args:
        raw: the mapping to start from (left unchanged).
        overrides: ``KEY=VALUE`` strings with dotted keys.

    Raises:
        ConfigError: an override without ``=``, a VALUE that is not YAML, a list index out of
            range, an interpolation that does not resolve; each names its key.
    """
    from omegaconf import OmegaConf

    tree = OmegaConf.create(raw)
    _merge_overrides(tree, overrides)
    return _to_mapping(tree, "<overrides>")


def _merge_overrides(tree: Any, overrides: list[str]) -> None:
    """Apply ``KEY=VALUE`` overrides to an OmegaConf tree in place, one at a time so an error names its key."""
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:  # OmegaConf reads a bare KEY as KEY=null: a typo would pass unseen
            raise ConfigError("<overrides>", [f"{item!r}: expected KEY=VALUE with a dotted KEY"])
        try:
            tree.merge_with_dotlist([item])
        except yaml.YAMLError as e:
            raise ConfigError("<overrides>", [f"{key}: value {text!r} is not valid YAML ({e})"]) from e
        except (OmegaConfBaseException, IndexError, KeyError, TypeError, ValueError) as e:  # a list index out of range
            raise ConfigError("<overrides>", [f"{key}: {_first_line(e)}"]) from e


_TRAINING_PATH_KEYS = ("output_dir", "logging_dir", "resume_from_checkpoint")
_BUILT_IN_MODEL = ModelConfig.model_fields["name_or_path"].default  # "tiny-qwen3-vl", built in code


def resolve_paths(raw: dict[str, Any], base: Path, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Make every relative path in a raw config absolute against ``base``, in place.

    The paths: ``training.output_dir``, ``training.logging_dir``,
    ``training.resume_from_checkpoint`` (when a string other than ``last``), ``deepspeed`` (when a string),
    ``model.name_or_path`` (only when ``base / value`` exists: it may be a hub id; the built-in
    ``tiny-qwen3-vl`` is never a path, so a folder of that name beside the config cannot replace it
    unseen: write ``./tiny-qwen3-vl`` for the folder),
    and every dataset's ``train_jsonl`` and ``val_jsonl``. Other values are left
    for validation to judge.

    Args:
        raw: the mapping.
        base: the folder relative paths are relative to.
        skip: dotted keys to leave as they are (those an override wrote: :func:`_keys_set_by`).
    """
    def fix(node: dict, key: str, dotted: str) -> None:
        value = node.get(key)
        if not (isinstance(value, str) and value) or dotted in skip:
            return
        if Path(value).expanduser().is_absolute():
            return
        if dotted == "model.name_or_path" and (value == _BUILT_IN_MODEL or not (base / value).exists()):
            return  # the built-in model's name, or a hub id: not a path
        node[key] = str((base / value).resolve())

    training = raw.get("training")
    if isinstance(training, dict):
        for key in _TRAINING_PATH_KEYS:
            if not (key == "resume_from_checkpoint" and training.get(key) == "last"):  # the newest complete checkpoint
                fix(training, key, f"training.{key}")
    fix(raw, "deepspeed", "deepspeed")
    if isinstance(raw.get("model"), dict):
        fix(raw["model"], "name_or_path", "model.name_or_path")
    custom = raw.get("custom")
    fusion = custom.get("fusion_config") if isinstance(custom, dict) else None
    if isinstance(fusion, dict):
        sources = fusion.get("sources")
        datasets = [("target", fusion.get("target"))]
        datasets += [(f"sources.{k}", source) for k, source in enumerate(sources if isinstance(sources, list) else [])]
        for where, dataset in datasets:
            if isinstance(dataset, dict):
                for key in ("train_jsonl", "val_jsonl"):
                    fix(dataset, key, f"custom.fusion_config.{where}.{key}")
    return raw


def _read_tree(path: Path) -> Any:
    """The YAML file as an OmegaConf tree (interpolations not yet resolved); problems name the file."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        text = read_utf8(path)
    except FileNotFoundError as e:
        raise ConfigError(str(path), ["file not found"]) from e
    except NotUtf8Error as e:
        raise ConfigError(str(path), [str(e)]) from e
    try:
        # OmegaConf reads a scalar document as a one-key mapping, or fails an assert on a number: see the root first.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null":
            root = None
        if root is not None and root.tag != "tag:yaml.org,2002:map":
            kind = {"seq": "list", "map": "mapping"}.get(root.tag.rsplit(":", 1)[-1], root.tag.rsplit(":", 1)[-1])
            raise ConfigError(str(path), [f"<root>: expected a mapping, got {kind}"])
        return OmegaConf.create(text)
    except yaml.YAMLError as e:  # duplicate keys included: OmegaConf's loader refuses them
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from e
    except OmegaConfBaseException as e:  # a value OmegaConf cannot hold (a !!set)
        raise ConfigError(str(path), [f"{e.full_key or '<root>'}: {_first_line(e)}"]) from e


def load_config(path: str | Path, overrides: list[str] | None = None, *, for_training: bool = False,
                interpolate: bool = True) -> HsmConfig:
    """Read a YAML file, apply overrides, validate.

    OmegaConf reads the file (a repeated key is an error; ``${a.b}`` refers to another value)
    and applies the overrides (:func:`apply_overrides`); interpolations resolve after the
    overrides, so an override also changes the values that refer to it. Relative paths written in the file resolve against the file's directory;
    relative paths given as ``KEY=VALUE`` overrides resolve against the working
    directory (where the command was typed). See :func:`resolve_paths` for the keys.

    Args:
        path: the YAML file.
        overrides: ``KEY=VALUE`` strings with dotted keys (``training.num_train_epochs=3``).
        for_training: also check the ``training`` section (:func:`parse_config`).
        interpolate: resolve ``${...}``; False for a run's recorded ``config.yaml``, whose values were
            resolved when training wrote it (a ``${`` left in one is the user's literal text).

    Raises:
        ConfigError: every problem at once, each with its dotted key.
    """
    path = Path(path)
    tree = _read_tree(path)
    _merge_overrides(tree, overrides or [])
    raw = _to_mapping(tree, str(path), resolve=interpolate)
    resolve_paths(raw, path.resolve().parent, skip=_keys_set_by(overrides or []))
    resolve_paths(raw, Path.cwd())  # what is still relative came from an override
    config = parse_config(raw, str(path), for_training=for_training)
    config._source = str(path)
    return config
