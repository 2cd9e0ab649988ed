"""Records, COCO import, encoding through the real tiny processor, augmentation, object caps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hsm.data.augment import augment, derive_aug_seed
from hsm.config import AugmentationConfig, ModelConfig
from hsm.config_load import parse_config
from hsm.data.encoding import IGNORE_INDEX, Template, format_answer, resolve_prompts
from hsm.data.fusion import FusionDataset, Slot
from hsm.train.model import build_processor
from hsm.data.coco import import_coco
from hsm.data.records import RecordError, read_jsonl


@pytest.fixture(scope="module")
def processor():
    return build_processor(ModelConfig())


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(12, 6, 3)


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"image": "a.png", "width": 10, "height": 8, "objects": [{"label": "x", "bbox": [1, 1, 5, 5]}]}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON"),
        ({**GOOD, "image": "missing.png"}, "missing.png not found"),
        ({**GOOD, "objects": [{"label": "x", "bbox": [1, 1, 11, 5]}]}, "outside the 10x8 image"),
        ({**GOOD, "objects": [{"label": "x", "bbox": [5, 1, 5, 5]}]}, "degenerate"),
        ({k: v for k, v in GOOD.items() if k != "width"}, "missing key 'width'"),
        ({**GOOD, "extra": 1}, "unknown keys"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, line, message):
    Image.new("RGB", (10, 8)).save(tmp_path / "a.png")
    path = write_lines(tmp_path / "d.jsonl", [GOOD, line])
    with pytest.raises(RecordError, match=rf"d\.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_image_size_disagreeing_with_record_and_oversize_raise(tmp_path, processor):
    Image.new("RGB", (10, 9)).save(tmp_path / "a.png")
    path = write_lines(tmp_path / "t.jsonl", [GOOD])
    cfg = parse_config({"custom": {"fusion_config": {"target": {"name": "t", "train_jsonl": str(path)}, "max_image_side": 16}}})
    dataset = FusionDataset(cfg.custom.fusion_config, processor, cfg.model)
    with pytest.raises(RecordError, match=r"t\.jsonl:1: .*10x9, the record says 10x8"):
        dataset[(0, 0, False, 0, 0)]
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    write_lines(path, [GOOD])  # declares 10x8, the file is 40x40: found when loaded
    dataset = FusionDataset(cfg.custom.fusion_config, processor, cfg.model)
    with pytest.raises(RecordError, match="over fusion_config.max_image_side=16"):
        dataset[(0, 0, False, 0, 0)]
    # Declared sizes over the limit are found at start-up, every line of them, before anything trains.
    write_lines(path, [{**GOOD, "width": 40, "height": 40}, GOOD, {**GOOD, "width": 30, "height": 20}])
    with pytest.raises(RecordError, match=r"2 record\(s\) over custom.fusion_config.max_image_side=16:\n.*t\.jsonl:1: .*40x40.*\n.*t\.jsonl:3: .*30x20"):
        FusionDataset(cfg.custom.fusion_config, processor, cfg.model)


def test_data_validate_reports_every_bad_line(tmp_path):
    from typer.testing import CliRunner

    from hsm.cli.app import app

    Image.new("RGB", (10, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    lines = [GOOD, {**GOOD, "image": "big.png"}, "{not json", {**GOOD, "image": "gone.png"},
             {**GOOD, "image": "big.png", "width": 40, "height": 40}]
    path = write_lines(tmp_path / "v.jsonl", lines)
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--max-image-side", "32"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "5 problems in 3 readable records" in out
    for where, what in ((2, "40x40, the record says 10x8"), (2, "max_image_side=32"), (3, "malformed JSON"),
                        (4, "not found"), (5, "max_image_side=32")):
        assert f"v.jsonl:{where}: " in out and what in out
    ok = CliRunner().invoke(app, ["data", "validate", str(write_lines(tmp_path / "ok.jsonl", [GOOD]))])
    assert ok.exit_code == 0 and "1 record OK" in " ".join(ok.output.split())


def test_coco_import(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "img" / "1.jpg")
    coco = {"images": [{"id": 1, "file_name": "1.jpg", "width": 20, "height": 10}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [{"image_id": 1, "category_id": 3, "bbox": [2, 1, 5, 4]},
                            {"image_id": 1, "category_id": 3, "bbox": [15, 5, 10, 10]},
                            {"image_id": 1, "category_id": 3, "bbox": [0, 0, 3, 3], "iscrowd": 1}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert import_coco(tmp_path / "c.json", tmp_path / "img", tmp_path / "out" / "c.jsonl").records == 1
    [record] = read_jsonl(tmp_path / "out" / "c.jsonl")
    assert record.id == "c-1" and record.image.resolve() == (tmp_path / "img" / "1.jpg").resolve()
    assert [o.bbox for o in record.objects] == [(2.0, 1.0, 7.0, 5.0), (15.0, 5.0, 20.0, 10.0)]  # clipped


def test_only_answer_tokens_are_trained(processor):
    template = Template(processor)
    answer = format_answer([(8, 16, 32, 48)], ["bolt"], 64, 64, "rel1000")
    encoded = template.encode(Image.new("RGB", (64, 64)), "Detect.", answer, system="S")
    ids, labels = encoded["input_ids"], encoded["labels"]
    trained = ids[labels != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == answer + "<|im_end|>"
    assert json.loads(answer) == [{"bbox_2d": [125, 250, 500, 750], "label": "bolt"}]
    # labels are a suffix: nothing before the answer is trained
    first = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    assert (labels[:first] == IGNORE_INDEX).all() and (labels[first:-1] != IGNORE_INDEX).all()


def test_coordinates_round_trip():
    boxes = [(10.0, 20.0, 30.0, 40.0)]
    rel = json.loads(format_answer(boxes, ["a"], 100, 80, "rel1000"))[0]["bbox_2d"]
    assert [rel[0] / 1000 * 100, rel[1] / 1000 * 80, rel[2] / 1000 * 100, rel[3] / 1000 * 80] == pytest.approx(list(boxes[0]), abs=0.1)
    absolute = json.loads(format_answer(boxes, ["a"], 100, 80, "abs", resized=(200, 160)))[0]["bbox_2d"]
    assert absolute == [20, 40, 60, 80]


def test_prompt_priority_and_no_system_leak(processor, corpus):
    cfg = parse_config({"custom": {"fusion_config": {
        "target": {"name": "bbu", "train_jsonl": str(corpus["bbu"]), "prompts": {"system": "TARGET-SPECIFIC"}},
        "sources": [{"name": "lvis", "train_jsonl": str(corpus["lvis"]), "ratio": 0.5},
                    {"name": "coco", "train_jsonl": str(corpus["coco"]), "ratio": 0.5, "domain": "other"}],
        "domain_prompts": {"source": {"system": "SOURCE-DOMAIN", "user": "source user"}},
        "default_prompts": {"system": "DEFAULT", "user": "default user"}}}})
    fusion = cfg.custom.fusion_config
    assert resolve_prompts(fusion, "bbu").system == "TARGET-SPECIFIC" and resolve_prompts(fusion, "bbu").user == "default user"
    assert resolve_prompts(fusion, "lvis").system == "SOURCE-DOMAIN" and resolve_prompts(fusion, "lvis").user == "source user"
    assert resolve_prompts(fusion, "coco").system == "DEFAULT"
    dataset = FusionDataset(fusion, processor, cfg.model)
    decode = processor.tokenizer.decode
    first = decode(dataset[(0, 0, False, 0, 0)]["input_ids"])
    second = decode(dataset[(2, 0, False, 0, 1)]["input_ids"])
    assert "TARGET-SPECIFIC" in first and "TARGET-SPECIFIC" not in second and "DEFAULT" in second
    assert dataset.template.system == "You are a helpful assistant."  # restored after every encode


def test_augmentation_moves_boxes_with_the_pixels():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[10:30, 5:25] = 255
    cfg = AugmentationConfig(hflip_p=1.0, scale=(0.6, 1.0), color_jitter=0.0)
    for seed in range(5):
        out, boxes, labels, dropped = augment(image, [(5, 10, 25, 30)], ["sq"], cfg, seed=seed, strength=1.0)
        if dropped:
            continue
        x1, y1, x2, y2 = boxes[0]
        bright = np.argwhere(out[..., 0] > 128)
        assert abs(bright[:, 1].min() - x1) <= 2 and abs(bright[:, 1].max() + 1 - x2) <= 2
        assert abs(bright[:, 0].min() - y1) <= 2 and abs(bright[:, 0].max() + 1 - y2) <= 2
    a = augment(image, [(5, 10, 25, 30)], ["sq"], cfg, seed=3, strength=1.0)
    b = augment(image, [(5, 10, 25, 30)], ["sq"], cfg, seed=3, strength=1.0)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert derive_aug_seed(1, 2, 0, 5, 9) == derive_aug_seed(1, 2, 0, 5, 9) != derive_aug_seed(1, 3, 0, 5, 9)


def test_object_cap_is_deterministic_and_sources_stay_clean(processor, corpus):
    cfg = parse_config({"custom": {"fusion_config": {
        "target": {"name": "bbu", "train_jsonl": str(corpus["bbu"]), "max_objects_per_image": 1},
        "sources": [{"name": "lvis", "train_jsonl": str(corpus["lvis"]), "ratio": 0.5}],
        "augmentation": {"enabled": True}}}})
    dataset = FusionDataset(cfg.custom.fusion_config, processor, cfg.model)
    many = next(i for i, r in enumerate(dataset.records[0]) if len(r.objects) > 1)
    a, b = dataset[Slot(0, many, False, 0, 0)], dataset[Slot(0, many, False, 1, 5)]
    assert a["meta"].object_capped and a["meta"].augmented
    assert not dataset[Slot(1, 0, False, 0, 1)]["meta"].augmented  # sources clean unless enabled
    decode = processor.tokenizer.decode
    labels = [json.loads(decode(x["input_ids"][x["labels"] != -100]).removesuffix("<|im_end|>"))[0]["label"] for x in (a, b)]
    assert labels[0] == labels[1]  # the same object kept in every epoch


def test_sampler_drives_workers_without_dataset_set_epoch(processor, corpus, tmp_path):
    import torch

    from eventlog import write_rows  # noqa: F401  (tests dir on sys.path)
    from hsm.config import MiningConfig
    from hsm.data.fusion import DetectionCollator, EvalDataset
    from hsm.mining.plan import DatasetInfo
    from hsm.mining.planner import PlanRequest, plan_epoch
    from hsm.data.sampler import HsmSampler

    cfg = parse_config({"custom": {"fusion_config": {
        "target": {"name": "bbu", "train_jsonl": str(corpus["bbu"]), "val_jsonl": str(corpus["bbu"].parent / "val.jsonl")},
        "sources": [{"name": "lvis", "train_jsonl": str(corpus["lvis"]), "ratio": 0.5,
                     "val_jsonl": str(corpus["lvis"].parent / "val.jsonl")}]}}})
    dataset = FusionDataset(cfg.custom.fusion_config, processor, cfg.model)
    # A plan for epoch 1 that makes sample 0 hard (x3), from a real event log.
    rows = [{"attempt": 0, "epoch": 0, "global_step": i, "rank": 0, "position": 0, "dataset": "bbu", "base_idx": i,
             "sample_id": f"bbu-train-{i:05d}", "loss": 9.0 if i == 0 else 1.0, "token_acc": 0.5, "n_tokens": 5,
             "aug_seed": 0, "drawn_as_hard": False} for i in range(12)]
    write_rows(tmp_path / "hsm", rows)
    plan_epoch(PlanRequest(tmp_path / "hsm", 1, MiningConfig(enabled=True, selector={"k": 1}), "bbu",
               dataset=DatasetInfo("bbu", 12, dataset.target_info.fingerprint)))
    sampler = HsmSampler(sizes=dataset.sizes, ratios=dataset.ratios, target=dataset.target_info, seed=0,
                         batch_size=3, hsm_dir=tmp_path / "hsm")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=2,
                                         collate_fn=DetectionCollator(processor.tokenizer.pad_token_id))
    sampler.set_epoch(1)  # only the sampler hears about the epoch, as under accelerate
    seen = [(d, i, h, e) for batch in loader for d, i, h, e in zip(batch["hsm_meta"].dataset, batch["hsm_meta"].base_idx,
                                                                    batch["hsm_meta"].drawn_as_hard, batch["hsm_meta"].epoch)]
    schedule = sampler.schedule
    names = dataset.names
    assert seen == [(names[c], int(i), bool(h), 1) for c, i, h in zip(schedule.dataset, schedule.base_idx, schedule.is_hard)]
    # The plan's weight reached the workers: 12 draws, weights 3 + 11 x 1, so floor/ceil of 12 * 3 / 14.
    assert sum(1 for d, i, _, _ in seen if d == "bbu" and i == 0) in (2, 3)
    assert all(h == (d == "bbu" and i == 0) for d, i, h, _ in seen)
    # Evaluation: target only by default, in file order, never augmented.
    evaluation = EvalDataset(dataset)
    assert [s.dataset_code for s in evaluation.slots] == [0, 0, 0]
    assert [evaluation[i]["meta"].base_idx for i in range(3)] == [0, 1, 2]
    assert not any(evaluation[i]["meta"].augmented for i in range(3))
    with_sources = EvalDataset(FusionDataset(cfg.custom.fusion_config.model_copy(update={"eval_sources": True}), processor, cfg.model))
    assert [s.dataset_code for s in with_sources.slots] == [0, 0, 0, 1, 1, 1]
