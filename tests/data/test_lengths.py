"""Record length vs the model: the counted length equals the encoded one; too-long records are named
by ``hsm data validate --config`` and stop ``hsm train`` before step 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from hsm.cli.app import app
from hsm.config import ModelConfig
from hsm.config_load import parse_config
from hsm.data.fusion import FusionDataset, Slot
from hsm.data.lengths import record_lengths
from hsm.data.synth import synthesize
from hsm.train.model import build_processor

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lengths")
    paths = synthesize(root / "corpus", n_target=10, n_source=5, n_val=2)
    # Odd sizes and many objects: the resize, the visual tokens and long answers all vary.
    rng = np.random.default_rng(0)
    lines = []
    for k, (width, height) in enumerate([(37, 201), (300, 90), (64, 64), (513, 257)]):
        Image.new("RGB", (width, height)).save(root / f"odd{k}.png")
        n = int(rng.integers(0, 40))
        x1, y1 = rng.uniform(0, width - 2, n), rng.uniform(0, height - 2, n)
        objects = [{"label": ["bolt", "nut", "wide washer"][j % 3],
                    "bbox": [float(a), float(b), float(a + rng.uniform(1, width - a)), float(b + rng.uniform(1, height - b))]}
                   for j, (a, b) in enumerate(zip(x1, y1))]
        lines.append({"id": f"odd{k}", "image": f"odd{k}.png", "width": width, "height": height, "objects": objects})
    (root / "odd.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root, paths


@pytest.mark.parametrize("coord_format, cap", [("rel1000", None), ("abs", 3)])
def test_counted_length_equals_the_encoded_length(corpus, coord_format, cap):
    root, paths = corpus
    model = ModelConfig(coord_format=coord_format)
    cfg = parse_config({"model": model.model_dump(), "custom": {"fusion_config": {
        "target": {"name": "odd", "train_jsonl": str(root / "odd.jsonl"), "max_objects_per_image": cap,
                   "prompts": {"system": "You find parts.", "user": "List every part with its box."}},
        "sources": [{"name": "lvis", "train_jsonl": str(paths["lvis"]), "ratio": 0.5},
                    {"name": "bbu", "train_jsonl": str(paths["bbu"]), "ratio": 0.5}]}}})
    dataset = FusionDataset(cfg.custom.fusion_config, build_processor(model), cfg.model)
    for code, records in enumerate(dataset.records):
        counted = record_lengths(dataset.template, dataset.prompts[code], records, coord_format=coord_format,
                                 cap=dataset.caps[code], seed=dataset.fusion.seed, code=code)
        encoded = [len(dataset.load(Slot(code, i, False, 0, 0), train=False)["input_ids"]) for i in range(len(records))]
        assert counted.tolist() == encoded, dataset.names[code]


def _long_corpus(root):
    """Three records on one image: 2 boxes, 1,000 boxes (too long for the tiny model's 4,096), 3 boxes."""
    Image.new("RGB", (640, 480)).save(root / "a.png")
    rng = np.random.default_rng(1)

    def record(k, n):
        x, y = rng.uniform(0, 600, n), rng.uniform(0, 440, n)
        return {"id": f"r{k}", "image": "a.png", "width": 640, "height": 480,
                "objects": [{"label": "bolt", "bbox": [float(a), float(b), float(a) + 30, float(b) + 30]} for a, b in zip(x, y)]}

    path = root / "long.jsonl"
    path.write_text("".join(json.dumps(record(k, n)) + "\n" for k, n in enumerate([2, 1000, 3])))
    return path


def test_data_validate_with_a_config_names_the_record_over_the_model_maximum(tmp_path):
    path = _long_corpus(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"custom": {"fusion_config": {"target": {"name": "t", "train_jsonl": str(path)}}}}))
    result = runner.invoke(app, ["data", "validate", str(path), "--config", str(config)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    processor = build_processor(ModelConfig())
    from hsm.data.encoding import Template, resolve_prompts
    from hsm.data.records import read_jsonl

    cfg = parse_config(yaml.safe_load(config.read_text()))
    lengths = record_lengths(Template(processor), resolve_prompts(cfg.custom.fusion_config, "t"), read_jsonl(path),
                             coord_format="rel1000")
    assert lengths[1] > 4096 >= max(lengths[0], lengths[2])
    assert f"long.jsonl:2: encodes to {lengths[1]} tokens, over the model's maximum of 4096" in text
    assert "set custom.fusion_config.target.max_objects_per_image to at most" in text
    assert "1 problem in 3 readable records" in text and "long.jsonl:1:" not in text
    assert runner.invoke(app, ["data", "validate", str(path)]).exit_code == 0  # without a model, nothing to compare


def test_the_suggested_cap_fits_and_train_refuses_before_step_0(tmp_path):
    path = _long_corpus(tmp_path)
    args = ["train", "configs/demo.yaml", f"custom.fusion_config.target.train_jsonl={path}",
            "custom.fusion_config.target.val_jsonl=null", "custom.fusion_config.sources=[]",
            f"training.output_dir={tmp_path / 'run'}", "training.report_to=[]", "training.num_train_epochs=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "1 record(s) encode longer than the model's maximum of 4096 tokens" in text and "long.jsonl:2:" in text
    assert not (tmp_path / "run" / "hsm" / "events").exists()  # nothing trained
    cap = int(text.split("max_objects_per_image to at most ")[1].split(",")[0])
    cfg = parse_config({"custom": {"fusion_config": {"target": {"name": "t", "train_jsonl": str(path),
                                                                "max_objects_per_image": cap}}}})
    dataset = FusionDataset(cfg.custom.fusion_config, build_processor(ModelConfig()), cfg.model)
    capped = len(dataset.load(Slot(0, 1, False, 0, 0), train=False)["input_ids"])
    assert capped <= 4096  # the cap the message offers makes the record fit
