"""CLI polish: one test per item, through typer's CliRunner."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.config import small_target_warning
from hsm.config_load import load_config
from hsm.data.records import read_jsonl

runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path):
    rows = random_rows(np.random.default_rng(3), n_target=30, n_epochs=3, n_ranks=1, max_obs=2)
    for r in rows:
        # Long ids and many digits: what an 80-column table used to cut.
        r["sample_id"] = f"{r['dataset']}-a-rather-long-sample-identifier-{r['base_idx']:06d}"
        r["loss"] = r["loss"] + 1 / 3
    write_rows(tmp_path / "hsm", rows)
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 5}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (tmp_path / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner.invoke(app, ["plan", "--run-dir", str(tmp_path), "--epoch", "3"]).exit_code == 0
    return tmp_path


def test_piped_tables_print_full_values(run_dir):
    sql = "SELECT sample_id, score, score * 1000003 AS big FROM plans ORDER BY score DESC, sample_id LIMIT 3"
    table = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", sql])
    rows = json.loads(runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", sql, "--format", "json"]).output)
    assert table.exit_code == 0, table.output
    assert "…" not in table.output
    for row in rows:
        assert row["sample_id"] in table.output and str(row["score"]) in table.output and str(row["big"]) in table.output
    assert max(len(line) for line in table.output.splitlines()) > 80  # not cut to the 80-column default
    plan = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--dry-run"])
    assert plan.exit_code == 0 and "…" not in plan.output
    assert any(line.split()[:2] == ["hard", "5"] for line in plan.output.splitlines())


def test_csv_uses_newline_line_endings(run_dir):
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "plan_summary", "--format", "csv"])
    assert result.exit_code == 0
    assert "\r" not in result.output and result.output.count("\n") == 2  # header + one plan


def test_relative_paths_resolve_from_the_config_file(tmp_path, monkeypatch):
    configs = tmp_path / "repo" / "configs"
    configs.mkdir(parents=True)
    (configs / "c.yaml").write_text(yaml.safe_dump({
        "training": {"output_dir": "../runs/a", "logging_dir": "logs"},
        "deepspeed": "ds.json",
        "custom": {"fusion_config": {"target": {"name": "t", "train_jsonl": "../data/t.jsonl"},
                                     "sources": [{"name": "s", "train_jsonl": "s.jsonl", "ratio": 0.5}]}},
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(configs / "c.yaml")
    assert cfg.training["output_dir"] == str(tmp_path / "repo" / "runs" / "a")
    assert cfg.training["logging_dir"] == str(configs / "logs")
    assert cfg.deepspeed == str(configs / "ds.json")
    assert cfg.custom.fusion_config.target.train_jsonl == tmp_path / "repo" / "data" / "t.jsonl"
    assert cfg.custom.fusion_config.sources[0].train_jsonl == configs / "s.jsonl"
    # Overrides typed on the command line resolve from the working directory.
    cfg = load_config(configs / "c.yaml", ["training.output_dir=out", "custom.fusion_config.target.train_jsonl=x.jsonl"])
    assert cfg.training["output_dir"] == str(elsewhere / "out")
    assert cfg.custom.fusion_config.target.train_jsonl == elsewhere / "x.jsonl"


def test_demo_config_output_dir_is_inside_the_repository():
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "demo.yaml")
    assert Path(cfg.training["output_dir"]) == repo / "demo_run" / "run"


def _coco(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    images, annotations = [], []
    for i in range(1, 11):
        images.append({"id": i, "file_name": f"{i}.png", "width": 20, "height": 10})
        if i != 10:  # image 10 is missing on disk
            Image.new("RGB", (20, 10)).save(tmp_path / "img" / f"{i}.png")
        annotations.append({"image_id": i, "category_id": 1, "bbox": [1, 1, 4, 4]})
    annotations += [
        {"image_id": 1, "category_id": 1, "bbox": [15, 5, 10, 10]},  # clipped
        {"image_id": 2, "category_id": 1, "bbox": [18, 8, 5, 5]},  # clipped
        {"image_id": 3, "category_id": 1, "bbox": [3, 3, 0, 4]},  # zero area
        {"image_id": 4, "category_id": 1, "bbox": [0, 0, 3, 3], "iscrowd": 1},  # crowd
        {"image_id": 4, "category_id": 1, "bbox": [0, 0, 3, 3], "iscrowd": 1},  # crowd
    ]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cat"}]}))
    return path


def test_import_coco_split_prefix_and_warnings(tmp_path):
    coco = _coco(tmp_path)
    out = tmp_path / "out" / "pets.jsonl"
    args = ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"), "--out", str(out),
            "--val-fraction", "0.3", "--seed", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in ("dropped 2 crowd", "dropped 1 zero-area", "clipped 2 box", "skipped 1 image"):
        assert expected in text, text
    train, val = read_jsonl(out), read_jsonl(tmp_path / "out" / "pets_val.jsonl")
    assert len(train) == 6 and len(val) == 3  # 9 images on disk, round(0.3 * 9) = 3 for val
    ids = [r.id for r in train + val]
    assert sorted(ids) == sorted(f"pets-{i}" for i in range(1, 10))
    # The same seed gives the same split; another seed another one.
    again = tmp_path / "again" / "pets.jsonl"
    runner.invoke(app, args[:6] + [str(again)] + args[7:])
    assert [r.id for r in read_jsonl(again)] == [r.id for r in train]
    other = tmp_path / "other" / "pets.jsonl"
    runner.invoke(app, args[:6] + [str(other)] + args[7:-1] + ["2"])
    assert {r.id for r in read_jsonl(other.with_name("pets_val.jsonl"))} != {r.id for r in val}
    result = runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"),
                                 "--out", str(tmp_path / "x.jsonl"), "--id-prefix", "zoo"])
    assert result.exit_code == 0 and all(r.id.startswith("zoo-") for r in read_jsonl(tmp_path / "x.jsonl"))


def test_hardest_samples_value_by_epoch_is_in_the_plans_metric(run_dir):
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "hardest_samples", "--format", "json"])
    rows = json.loads(result.output)
    events = json.loads(runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e",
                                            "SELECT sample_id, epoch, loss, token_acc, loss_sum FROM events",
                                            "--format", "json"]).output)
    metric = json.loads(runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e",
                                            "SELECT metric FROM manifests ORDER BY epoch DESC LIMIT 1",
                                            "--format", "json"]).output)[0]["metric"]
    assert rows and all(row["metric"] == metric for row in rows)
    for row in rows[:5]:
        by_epoch = {}
        for e in events:
            if e["sample_id"] == row["sample_id"]:
                value = 1 - e["token_acc"] if metric == "token_acc" else e[metric]
                by_epoch.setdefault(str(e["epoch"]), []).append(value)
        assert set(row["value_by_epoch"]) == set(by_epoch)
        for epoch, values in by_epoch.items():
            assert row["value_by_epoch"][epoch] == pytest.approx(statistics.fmean(values), abs=1e-4)


def test_small_fixed_set_target_warns(run_dir, tmp_path):
    config = tmp_path / "fixed.yaml"
    config.write_text(yaml.safe_dump({"custom": {"hard_sample_mining": {"enabled": True, "mode": "fixed_set"},
                                                 "fusion_config": {"target": {"name": TARGET}}}}))
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "hard_sample_size=500 >= the" in text and "every sample is hard" in text and "mining changes nothing" in text
    assert small_target_warning("fixed_set", 500, 150, 650) is not None
    assert "every sample is drawn" in small_target_warning("fixed_set", 500, 150, 649)
    assert small_target_warning("fixed_set", 500, 150, 651) is None
    assert small_target_warning("reweight", 500, 150, 10) is None


def test_dry_run_never_advises_deleting_the_state(run_dir, tmp_path):
    config = tmp_path / "acc.yaml"
    config.write_text(yaml.safe_dump({"custom": {"hard_sample_mining": {"enabled": True, "metric": "token_acc"},
                                                 "fusion_config": {"target": {"name": TARGET}}}}))
    args = ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--config", str(config)]
    dry = runner.invoke(app, args + ["--dry-run"])
    assert dry.exit_code == 2
    assert "delete" not in dry.output and "--dry-run" in dry.output and "token_acc" in dry.output
    wet = runner.invoke(app, args)
    assert wet.exit_code == 2 and "--force" in wet.output  # the plan guard speaks first
    forced = runner.invoke(app, args + ["--force"])
    assert forced.exit_code == 2 and "delete" in forced.output  # outside a dry run the fix is still given


def test_help_shows_no_bool_metavar():
    for command in (["plan"], ["sql"], ["report"], ["train"], ["demo"], ["data", "import-coco"], ["data", "synth"],
                    ["eval", "run"], ["eval", "score"], []):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, command
        assert "<bool>" not in result.output, command
    assert "--dry-run " in runner.invoke(app, ["plan", "--help"]).output
