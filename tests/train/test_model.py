"""The real-model path of ``hsm train``: tiny real-architecture Qwen2.5-VL and Qwen3-VL checkpoints built in
code, loaded like downloaded ones, trained with LoRA / frozen towers / activation checkpointing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hsm.config import ModelConfig

from hsm.data.answer import format_answer, resize_factor, resized_size
from hsm.train.model import build_checkpoint, component_of, load_model_and_processor
from hsm.run import train

pytestmark = pytest.mark.slow

ARCHS = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(8, 4, 2)


@pytest.fixture
def run_config(demo_config):
    def load(corpus, checkpoint, out, *extra):
        return demo_config(corpus, out, f"model.name_or_path={checkpoint}", "training.num_train_epochs=1",
                           "training.learning_rate=0.05", "custom.fusion_config.augmentation.enabled=false", *extra)

    return load


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def logged_events(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "hsm").glob("events/epoch=*/rank=*/part-*.parquet"))])


def test_model_keys_are_validated_with_their_paths():
    from hsm.config import ConfigError
    from hsm.config_load import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"model": {"torch_dtype": "bf16", "attn_implementation": "flash3", "freeze_llm": "maybe",
                                "lora": {"r": 0, "alpha": 16, "rank": 4}}})
    text = str(e.value)
    for key in ("model.torch_dtype", "model.attn_implementation", "model.freeze_llm", "model.lora.r", "model.lora.rank"):
        assert key in text, key
    lora = parse_config({"model": {"lora": {"r": 4}}}).model.lora
    assert (lora.alpha, lora.target_modules, lora.modules_to_save, lora.merge_on_save) == (16.0, "all-linear", [], False)


def test_component_of_names_qwen_parts(checkpoints):
    from transformers import AutoModelForImageTextToText

    for arch in ARCHS:
        model = AutoModelForImageTextToText.from_pretrained(checkpoints[arch])
        parts = {component_of(name) for name, _ in model.named_parameters()}
        assert parts == {"vision", "aligner", "llm"}
        # The aligner is exactly the merger(s); the vision tower is the rest of model.visual.
        for name, _ in model.named_parameters():
            in_visual = name.startswith("model.visual.")
            is_merger = in_visual and name.split(".")[2] in ("merger", "deepstack_merger_list")
            assert component_of(name) == ("aligner" if is_merger else "vision" if in_visual else "llm"), name


@pytest.mark.parametrize("arch", ARCHS)
def test_abs_boxes_round_trip_through_the_real_processor(checkpoints, arch):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoints[arch])
    assert resize_factor(processor) == {"qwen2_5_vl": 28, "qwen3_vl": 32}[arch]
    patch = processor.image_processor.patch_size
    rng = np.random.default_rng(0)
    for width, height in [(64, 64), (100, 60), (150, 90), (37, 121)]:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        grid = processor.image_processor(images=[image], return_tensors="np")["image_grid_thw"][0]
        # The oracle is the size the processor really produced, read back from its patch grid.
        assert resized_size(processor, width, height) == (int(grid[2]) * patch, int(grid[1]) * patch)
        box = [float(rng.integers(0, width // 2)), float(rng.integers(0, height // 2)),
               float(rng.integers(width // 2, width)), float(rng.integers(height // 2, height))]
        answer = format_answer([box], ["cat"], width, height, "abs", resized_size(processor, width, height))
        rw, rh = resized_size(processor, width, height)
        coords = json.loads(answer)[0]["bbox_2d"]
        decoded = [coords[0] * width / rw, coords[1] * height / rh, coords[2] * width / rw, coords[3] * height / rh]
        assert np.abs(np.array(decoded) - np.array(box)).max() <= 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_pixel_limits_reach_the_loaded_processor(checkpoints, arch):
    image = Image.fromarray(np.zeros((200, 300, 3), dtype=np.uint8))
    n_tokens = {}
    for max_pixels in (128 * 128, 64 * 64):
        cfg = ModelConfig(name_or_path=str(checkpoints[arch]), image_min_pixels=16 * 16, image_max_pixels=max_pixels)
        _, processor = load_model_and_processor(cfg)
        grid = processor.image_processor(images=[image], return_tensors="np")["image_grid_thw"][0]
        patch = processor.image_processor.patch_size
        assert grid[1] * grid[2] * patch * patch <= max_pixels
        n_tokens[max_pixels] = int(grid.prod()) // processor.image_processor.merge_size ** 2
    assert n_tokens[64 * 64] < n_tokens[128 * 128]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_step_changes_only_adapters_under_reentrant_checkpointing(tmp_path, corpus, checkpoints, arch, run_config):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    cfg = run_config(corpus, checkpoints[arch], out, "model.lora={r: 4, alpha: 8, modules_to_save: [lm_head]}",
                     "model.freeze_vision=true", "model.lora.merge_on_save=true", "training.save_strategy=epoch",
                     "training.gradient_checkpointing=true", "training.gradient_checkpointing_kwargs={use_reentrant: true}")
    base = AutoModelForImageTextToText.from_pretrained(checkpoints[arch])
    before = {f"base_model.model.{k}": v for k, v in snapshot(base).items()}
    summary = train(cfg)
    model = summary["trainer"].model
    assert isinstance(model, PeftModel)
    after = snapshot(model)
    changed_adapters = [n for n in after if "lora_B" in n and not torch.equal(after[n], torch.zeros_like(after[n]))]
    adapters = [n for n in after if "lora_B" in n]
    # Every adapter trained (the language-model ones only get a gradient through the checkpointed blocks
    # because the frozen embedding output is made to require grad), none in the frozen vision tower.
    assert adapters and changed_adapters == adapters
    assert not [n for n in adapters if component_of(n) == "vision"]
    assert [n for n in adapters if component_of(n) == "aligner"]
    for name, value in after.items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        original = name.replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(value, before[original]), f"{name} changed"
    saved = [n for n in after if "modules_to_save" in n]
    assert saved and any(not torch.equal(after[n], before[n.replace(".modules_to_save.default", "")]) for n in saved)
    # Mining events were logged for every trained item.
    events = logged_events(out)
    assert events.num_rows == summary["global_step"] * 4 and set(events.column("dataset").to_pylist()) >= {"bbu"}
    # The LoRA checkpoint reloads onto the base, and the merged model loads without peft: same logits.
    checkpoint = next(out.glob("checkpoint-*"))
    assert (checkpoint / "adapter_config.json").is_file()
    batch = next(iter(summary["trainer"].get_train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "hsm_meta")}
    model.eval()
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(checkpoints[arch]), checkpoint)
        expected = reloaded.eval()(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,frozen", [("qwen2_5_vl", ("vision", "aligner")), ("qwen3_vl", ("vision", "llm"))])
def test_freezing_leaves_frozen_weights_bit_identical(tmp_path, corpus, checkpoints, arch, frozen, run_config):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    flags = [f"model.freeze_{part}=true" for part in frozen]
    summary = train(run_config(corpus, checkpoints[arch], out, *flags, "training.gradient_checkpointing=true"))
    before = snapshot(AutoModelForImageTextToText.from_pretrained(checkpoints[arch]))
    after = snapshot(summary["trainer"].model)
    for name, value in after.items():
        if component_of(name) in frozen:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    trained = [n for n in after if component_of(n) not in frozen]
    assert trained and all(not torch.equal(after[n], before[n]) for n in trained if "norm" not in n)
    assert logged_events(out).num_rows == summary["global_step"] * 4


def test_readme_hsm_train_command(tmp_path, corpus, checkpoints):
    """The README's `hsm train` line for a real checkpoint, with the corpus paths of this test."""
    from typer.testing import CliRunner

    from hsm.cli.app import app

    out = tmp_path / "lora"
    result = CliRunner().invoke(app, [
        "train", "configs/demo.yaml", f"model.name_or_path={checkpoints['qwen2_5_vl']}", "model.coord_format=abs",
        "model.lora={r: 16, alpha: 32, modules_to_save: [lm_head], merge_on_save: true}", "model.freeze_vision=true",
        "training.gradient_checkpointing=true", "training.num_train_epochs=2", f"training.output_dir={out}",
        f"custom.fusion_config.target.train_jsonl={corpus['bbu']}",
        f"custom.fusion_config.target.val_jsonl={corpus['bbu'].parent / 'val.jsonl'}",
        f"custom.fusion_config.sources.0.train_jsonl={corpus['lvis']}",
        f"custom.fusion_config.sources.1.train_jsonl={corpus['coco']}", "training.report_to=[]",
    ])
    assert result.exit_code == 0, result.output
    assert (out / "merged" / "model.safetensors").is_file()
    assert (out / "hsm" / "plans" / "epoch=1" / "manifest.json").is_file()
    adapter = next(out.glob("checkpoint-*"))
    assert (adapter / "adapter_config.json").is_file()
    # Both the LoRA checkpoint and the merged model run through `hsm eval run`, with the same answers.
    answers = {}
    for name, checkpoint in (("adapter", adapter), ("merged", out / "merged")):
        result = CliRunner().invoke(app, ["eval", "run", str(out / "hsm" / "config.yaml"), "--checkpoint", str(checkpoint),
                                          "--max-new-tokens", "8", "--max-samples", "2", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        answers[name] = (tmp_path / name / "bbu" / "answers.jsonl").read_text()
    assert answers["adapter"] == answers["merged"] and answers["adapter"].count("\n") == 2
