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
