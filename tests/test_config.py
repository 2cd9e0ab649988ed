"""Config validation: every shipped config loads; every bad value names its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hsm.config import ConfigError

from hsm.config_load import apply_overrides, load_config, parse_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.target_name is not None


def test_the_packaged_demo_config_is_configs_demo_yaml():
    """``hsm demo`` reads the copy inside the package (it must run from a wheel); edit both together."""
    from hsm.cli.demo import packaged_demo_config

    assert packaged_demo_config().read_bytes() == (Path(__file__).parent.parent / "configs" / "demo.yaml").read_bytes()


def test_absent_or_disabled_mining_is_none():
    assert parse_config({}).mining is None
    assert parse_config({"custom": {"hard_sample_mining": {"enabled": False, "mode": "dynamic"}}}).mining is None
    assert parse_config({"custom": {"hard_sample_mining": {"enabled": True}}}).mining.metric == "loss"
    assert parse_config({"custom": {"hard_sample_mining": {"enabled": True, "mode": "dynamic"}}}).mining.metric == "token_acc"


BAD = [
    ({"mode": "topk"}, "custom.hard_sample_mining.mode"),
    ({"ema_decay": 1.5}, "custom.hard_sample_mining.ema_decay"),
    ({"selector": {"k": 0}}, "custom.hard_sample_mining.selector.k"),
    ({"selector": {"value": 2}}, "custom.hard_sample_mining.selector.value"),
    ({"selector": {"mode": "threshold"}}, "custom.hard_sample_mining.selector.threshold"),
    ({"hard_pool_frac": 0}, "custom.hard_sample_mining.hard_pool_frac"),
    ({"activate_after_pct": -0.1}, "custom.hard_sample_mining.activate_after_pct"),
    ({"engine": "spark"}, "custom.hard_sample_mining.engine"),
    ({"hard_weigth": 2}, "custom.hard_sample_mining.hard_weigth: unknown key"),
    ({"enabled": "maybe"}, "custom.hard_sample_mining.enabled"),
    ({"target_epoch_size": 0}, "custom.hard_sample_mining.target_epoch_size"),
]


@pytest.mark.parametrize("mining, path", BAD, ids=[b[1].rsplit(".", 1)[-1] for b in BAD])
def test_bad_value_names_its_key(mining, path):
    with pytest.raises(ConfigError) as info:
        parse_config({"custom": {"hard_sample_mining": {"enabled": True, **mining}}}, "x.yaml")
    assert path in str(info.value)
    assert str(info.value).startswith("x.yaml")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config({"custom": {"hard_sample_mining": {"mode": "x", "ema_decay": 7, "nope": 1},
                                 "fusion_config": {"target": {}, "sources": [{"name": "a"}]}}})
    text = str(info.value)
    for key in ("hard_sample_mining.mode", "hard_sample_mining.ema_decay", "hard_sample_mining.nope",
                "fusion_config.target.name", "fusion_config.sources.0.ratio"):
        assert key in text
    assert len(info.value.problems) == 5


def test_problems_show_values_as_yaml_not_python_reprs():
    with pytest.raises(ConfigError) as info:
        parse_config({"custom": {"fusion_config": {"target": {"name": "a", "train_jsonl": {"x": 1}},
                                                   "sources": {"name": "b"}}}})
    text = str(info.value)
    assert "train_jsonl: Input is not a valid path for Path (got {x: 1})" in text
    assert "sources: Input should be a valid list (got {name: b})" in text
    assert "{'" not in text and "<class" not in text


def test_training_problems_are_reported_with_the_others_only_for_training():
    raw = {"training": {"learning_rate": "fast"}, "custom": {"hard_sample_mining": {"ema_decay": 7}}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, for_training=True)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "custom.hard_sample_mining.ema_decay", "training.output_dir", "training.learning_rate"]
    with pytest.raises(ConfigError) as info:  # hsm plan and friends never judge the training section
        parse_config(raw)
    assert [p.split(":")[0] for p in info.value.problems] == ["custom.hard_sample_mining.ema_decay"]
    with pytest.raises(ConfigError, match="training.learning_rate"):  # alone, it is still found
        parse_config({"training": {"output_dir": "o", "learning_rate": "fast"}}, for_training=True)


@pytest.mark.parametrize(
    "fusion, key",
    [({"loader": "MultiSourceFusionDataset"}, "custom.fusion_config.loader"), ({"legacy": True}, "custom.fusion_config.legacy")],
)
def test_legacy_loader_is_rejected_with_the_replacement(fusion, key):
    with pytest.raises(ConfigError) as info:
        parse_config({"custom": {"fusion_config": {"target": {"name": "t"}, **fusion}}})
    assert key in str(info.value) and "unified fusion loader" in str(info.value)


def test_overrides_with_dotted_paths(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"custom": {"fusion_config": {"target": {"name": "t"}, "sources": [{"name": "s", "ratio": 0.5}]}}}))
    config = load_config(path, ["custom.hard_sample_mining.enabled=true", "custom.hard_sample_mining.selector.k=7",
                                "custom.fusion_config.sources.0.ratio=0.25"])
    assert config.mining.selector.k == 7
    assert config.custom.fusion_config.sources[0].ratio == 0.25
    with pytest.raises(ConfigError, match="sources.3"):
        apply_overrides({"a": {"sources": []}}, ["a.sources.3.ratio=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["no_equals_sign"])


def test_keys_of_another_mode_are_warned_about_once_by_name():
    with pytest.warns(UserWarning, match=r"target_epoch_size does not apply to mode 'reweight' and is ignored.*fixed_set"):
        parse_config({"custom": {"hard_sample_mining": {"enabled": True, "target_epoch_size": 650}}})
    with pytest.warns(UserWarning, match=r"hard_weight, selector do not apply to mode 'dynamic' and are ignored"):
        parse_config({"custom": {"hard_sample_mining": {"enabled": True, "mode": "dynamic", "hard_weight": 5,
                                                        "selector": {"k": 7}}}})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = parse_config({"custom": {"hard_sample_mining": {"enabled": True, "mode": "dynamic"}}})
        parse_config(resolved.model_dump(mode="json"))  # a resolved config holds every key at its default: no warning


# --- OmegaConf reads the file and applies the overrides: where it differs from a plain YAML load ---

def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_override_values_are_yaml_lists_numbers_bools_and_nulls():
    raw = apply_overrides({"a": {"keep": 1}}, ["a.list=[1, two]", "a.sci=1e-5", "a.off=no", "a.none=null", "a.empty=",
                                               "a.quoted='3'", "a.eq=x=y", "new.deep.key=4"])
    assert raw == {"a": {"keep": 1, "list": [1, "two"], "sci": 0.00001, "off": False, "none": None, "empty": None,
                         "quoted": "3", "eq": "x=y"}, "new": {"deep": {"key": 4}}}


def test_a_key_with_a_dot_inside_a_mapping_is_set_with_an_escaped_dot():
    raw = {"a": {"b.c": 0}}
    assert apply_overrides(raw, [r"a.b\.c=1"]) == {"a": {"b.c": 1}}
    assert apply_overrides(raw, ["a.b.c=2"]) == {"a": {"b.c": 0, "b": {"c": 2}}}  # a plain dot goes one level down
    assert raw == {"a": {"b.c": 0}}  # the input is left as it was


def test_override_errors_name_the_key():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"s": [{"r": 0}]}, ["s.x.r=1"])
    assert info.value.source == "<overrides>" and info.value.problems[0].startswith("s.x.r: ")
    with pytest.raises(ConfigError, match=r"a: value '\[1,' is not valid YAML"):
        apply_overrides({}, ["a=[1,"])
    with pytest.raises(ConfigError, match="'a.b': expected KEY=VALUE"):  # OmegaConf alone would set a.b to null
        apply_overrides({}, ["a.b"])


def test_an_unknown_or_misplaced_override_key_names_the_file_and_the_key(tmp_path):
    path = _write(tmp_path, "custom:\n  fusion_config:\n    target: {name: t}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["custom.hard_sample_mining.hard_weigth=2", "custom.hard_sample_mining.enabled.x=1"])
    text = str(info.value)
    assert text.startswith(str(path))
    assert "custom.hard_sample_mining.hard_weigth: unknown key" in text
    assert "custom.hard_sample_mining.enabled: Input should be a valid boolean (got {x: 1})" in text


def test_a_mapping_override_merges_into_the_mapping_the_file_has(tmp_path):
    path = _write(tmp_path, "custom:\n  fusion_config: {target: {name: t}}\n  hard_sample_mining:\n    enabled: true\n"
                            "    selector: {mode: percentile, value: 0.2}\n")
    selector = load_config(path, ["custom.hard_sample_mining.selector={value: 0.3}"]).mining.selector
    assert (selector.mode, selector.value) == ("percentile", 0.3)
    selector = load_config(path, ["custom.hard_sample_mining.selector.k=7"]).mining.selector
    assert (selector.mode, selector.value, selector.k) == ("percentile", 0.2, 7)


def test_file_paths_resolve_against_the_file_and_override_paths_against_the_working_directory(tmp_path, monkeypatch):
    path = _write(tmp_path, "custom:\n  fusion_config:\n    target: {name: t, train_jsonl: a.jsonl, val_jsonl: v.jsonl}\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    target = load_config(path, ["custom.fusion_config.target={train_jsonl: b.jsonl}"]).custom.fusion_config.target
    assert target.train_jsonl == work / "b.jsonl"  # written by the override
    assert target.val_jsonl == tmp_path / "v.jsonl"  # kept from the file by the merge


def test_the_file_is_read_by_omegaconf_scientific_floats_dates_and_repeated_keys(tmp_path):
    path = _write(tmp_path, "custom:\n  fusion_config: {target: {name: 2024-01-02}}\n  hard_sample_mining:\n"
                            "    enabled: true\n    mode: dynamic\n    ema_decay: 5e-1\n")
    config = load_config(path)
    assert config.mining.ema_decay == 0.5 and config.target_name == "2024-01-02"
    repeated = _write(tmp_path, "custom:\n  hard_sample_mining: {enabled: true}\n  hard_sample_mining: {enabled: false}\n")
    with pytest.raises(ConfigError, match="(?s)not valid YAML.*found duplicate key hard_sample_mining") as info:
        load_config(repeated)
    assert str(info.value).startswith(str(repeated))


def test_interpolations_resolve_after_the_overrides_and_a_broken_one_names_its_key(tmp_path):
    path = _write(tmp_path, "training:\n  output_dir: out/${custom.fusion_config.target.name}\n"
                            "custom:\n  fusion_config: {target: {name: r1}}\n")
    assert load_config(path).training["output_dir"] == str(tmp_path / "out" / "r1")
    config = load_config(path, ["custom.fusion_config.target.name=r2"])
    assert config.training["output_dir"] == str(tmp_path / "out" / "r2") and config.target_name == "r2"
    broken = _write(tmp_path, "training:\n  output_dir: ${nowhere}\n")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert str(info.value).startswith(str(broken)) and "training.output_dir: Interpolation key 'nowhere' not found" in str(info.value)


def test_a_recorded_config_keeps_a_literal_interpolation_as_text(tmp_path):
    # A user prompt written with an escaped \${ reaches the run's config.yaml as the literal ${...}; reading
    # that recorded file back (hsm plan) must take it as text, not as a reference to resolve.
    source = _write(tmp_path, "custom:\n  fusion_config:\n    target: {name: r1}\n"
                              "    domain_prompts: {target: {user: 'box every \\${label}'}}\n")
    prompt = load_config(source).custom.fusion_config.domain_prompts["target"].user
    assert prompt == "box every ${label}"
    recorded = _write(tmp_path, yaml.safe_dump(load_config(source).model_dump(mode="json")))
    with pytest.raises(ConfigError, match="Interpolation key 'label' not found"):
        load_config(recorded)
    assert load_config(recorded, interpolate=False).custom.fusion_config.domain_prompts["target"].user == prompt


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("5\n", "int"), ("hello\n", "str")])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    with pytest.raises(ConfigError, match=f"<root>: expected a mapping, got {kind}"):
        load_config(_write(tmp_path, text))
    assert load_config(_write(tmp_path, "# nothing here\n")).mining is None  # empty is an empty mapping


def test_training_values_go_through_transformers_own_parser():
    raw = {"training": {"output_dir": "o", "save_strategy": "sometimes", "learning_rat": 0.1, "max_steps": [1, 2],
                        "report_to": ["tensorboard"], "lr_scheduler_kwargs": {"power": 2}, "save_total_limit": None,
                        "logging_steps": "5", "eval_strategy": False}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, for_training=True)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["training.learning_rat", "training.max_steps", "training.save_strategy"]
    assert "learning_rat: unknown TrainingArguments field" in problems[0]  # no abbreviation of learning_rate
    assert "takes one value, not a list" in problems[1]
    assert "invalid choice: 'sometimes'" in problems[2]
    from hsm.config_load import training_problems

    values, problems = training_problems({"output_dir": "o", "logging_steps": "5", "eval_strategy": False,
                                          "report_to": ["tensorboard"], "lr_scheduler_kwargs": {"power": 2}})
    assert problems == []
    assert values == {"output_dir": "o", "logging_steps": 5.0, "eval_strategy": "no", "report_to": ["tensorboard"],
                      "lr_scheduler_kwargs": {"power": 2}}


def test_the_built_in_model_name_is_not_taken_for_a_folder_of_that_name(tmp_path, monkeypatch):
    # A checkpoint folder named like the built-in model, beside the config or in the working directory, must not
    # replace the built-in one unseen; `./tiny-qwen3-vl` names the folder.
    (tmp_path / "tiny-qwen3-vl").mkdir()
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, "model: {name_or_path: tiny-qwen3-vl}\n")
    assert load_config(path).model.name_or_path == "tiny-qwen3-vl"
    assert load_config(path, ["model.name_or_path=tiny-qwen3-vl"]).model.name_or_path == "tiny-qwen3-vl"
    folder = _write(tmp_path, "model: {name_or_path: ./tiny-qwen3-vl}\n")
    assert load_config(folder).model.name_or_path == str((tmp_path / "tiny-qwen3-vl").resolve())
