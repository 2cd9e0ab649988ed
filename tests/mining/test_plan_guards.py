"""``hsm plan`` guards: a different target or config, empty epochs, unwritable output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app

runner = CliRunner()


def _config(path, **mining):
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 3}, **mining},
                         "fusion_config": {"target": {"name": TARGET}}}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def run_dir(tmp_path):
    rows = random_rows(np.random.default_rng(2), n_target=12, n_epochs=4, n_ranks=1, max_obs=2)
    write_rows(tmp_path / "hsm", rows)
    _config(tmp_path / "hsm" / "config.yaml")
    (tmp_path / "hsm" / "dataset.json").write_text(json.dumps({"target": {"name": TARGET, "size": 12, "fingerprint": None}}))
    return tmp_path


def _plan(run_dir, *args):
    return runner.invoke(app, ["plan", "--run-dir", str(run_dir), *args])


def test_config_naming_another_target_is_refused(run_dir, tmp_path):
    assert _plan(run_dir, "--epoch", "2").exit_code == 0
    plan_file = run_dir / "hsm" / "plans" / "epoch=2" / "plan.parquet"
    before = plan_file.read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 3}},
                                                "fusion_config": {"target": {"name": "trees"}}}}))
    result = _plan(run_dir, "--epoch", "2", "--config", str(other))
    assert result.exit_code == 2, result.output
    assert "'trees'" in result.output and f"'{TARGET}'" in result.output and "--force" in result.output
    assert plan_file.read_bytes() == before
    assert _plan(run_dir, "--epoch", "2", "--config", str(other), "--force").exit_code == 0


@pytest.mark.parametrize("change,named", [({"metric": "token_acc"}, "metric"), ({"mode": "dynamic"}, "mode"),
                                          ({"selector": {"k": 5}}, "selector"), ({"hard_weight": 5.0}, "other mining settings")])
def test_overwriting_a_plan_built_differently_is_refused(run_dir, tmp_path, change, named):
    assert _plan(run_dir, "--epoch", "3").exit_code == 0
    manifest = run_dir / "hsm" / "plans" / "epoch=3" / "manifest.json"
    before = manifest.read_text()
    shutil.rmtree(run_dir / "hsm" / "state")  # a different metric would otherwise trip the state check first
    changed = _config(tmp_path / "changed.yaml", **change)
    result = _plan(run_dir, "--epoch", "3", "--config", str(changed))
    assert result.exit_code == 2, result.output
    assert named in result.output and "--force" in result.output
    assert manifest.read_text() == before
    assert _plan(run_dir, "--epoch", "3").exit_code == 0  # the same settings may re-plan
    shutil.rmtree(run_dir / "hsm" / "state")
    assert _plan(run_dir, "--epoch", "3", "--config", str(changed), "--force").exit_code == 0
    assert manifest.read_text() != before


def test_a_different_selector_is_named_by_the_setting_its_mode_uses(run_dir, tmp_path):
    assert _plan(run_dir, "--epoch", "3").exit_code == 0
    shutil.rmtree(run_dir / "hsm" / "state")
    changed = _config(tmp_path / "changed.yaml", selector={"mode": "percentile", "value": 0.25, "k": 500})
    result = _plan(run_dir, "--epoch", "3", "--config", str(changed))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "selector: existing plan 'top_k 3', asked 'percentile 0.25'" in text
    assert "{'mode'" not in text and "500" not in text


def test_planning_past_the_logged_epochs_is_refused(run_dir):
    result = _plan(run_dir, "--epoch", "7")
    assert result.exit_code == 2, result.output
    assert "epochs 4-6" in result.output and "--allow-empty" in result.output
    assert not (run_dir / "hsm" / "plans").exists() and not (run_dir / "hsm" / "state").exists()
    result = _plan(run_dir, "--epoch", "7", "--allow-empty")
    assert result.exit_code == 0 and "4, 5, 6" in result.output  # still warned


@pytest.mark.parametrize("blocked", ["plans", "state"])
def test_unwritable_output_is_a_clear_error(run_dir, blocked):
    (run_dir / "hsm" / blocked).write_text("a file where a directory must go")  # root ignores chmod; this cannot be written
    result = _plan(run_dir, "--epoch", "2")
    assert result.exit_code == 2, result.output
    assert f"hsm/{blocked}" in result.output and "cannot write" in result.output
    assert "Traceback" not in result.output
