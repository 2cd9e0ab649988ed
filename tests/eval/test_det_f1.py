"""The det_f1 mining metric end to end: generation on the target train set, events, fold, plan."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import oracle
from hsm.config_load import parse_config
from hsm.data.records import read_jsonl
from hsm.data.synth import render_grid_image
from hsm.eval.train_quality import POSITION_BASE, sample_f1
from hsm.metrics import METRIC_NAMES, METRICS
from hsm.mining.event_reader import read_epoch_events
from hsm.mining.state import read_state_info
from hsm.run import train
from hsm.schemas import EVENT_SCHEMA

CATEGORIES = ["bolt", "cable", "label", "screw"]


def _record(tmp_path, objects):
    line = {"id": "r", "image": "x.png", "width": 64, "height": 64,
            "objects": [{"label": label, "bbox": box} for label, box in objects]}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(line) + "\n")
    return read_jsonl(path, check_images=False)[0]


def _answer(objects):  # rel1000 coordinates of a 64 px image
    return json.dumps([{"bbox_2d": [round(v * 1000 / 64) for v in box], "label": label} for label, box in objects])


@pytest.mark.parametrize(("predicted", "expected"), [
    ([("bolt", [0, 0, 16, 16]), ("screw", [32, 32, 64, 64])], 1.0),  # both right
    ([("bolt", [0, 0, 16, 16])], 2 / 3),  # 1 TP, 1 FN
    ([("cable", [0, 0, 16, 16]), ("screw", [32, 32, 64, 64])], 0.5),  # wrong label: 1 TP, 1 FP, 1 FN
    ([("bolt", [8, 8, 24, 24]), ("screw", [32, 32, 64, 64]), ("screw", [32, 32, 64, 64])], 2 / 5),  # IoU 1/7; duplicate
    ([("wolf", [0, 0, 16, 16]), ("screw", [32, 32, 64, 64])], 0.5),  # unknown label counts as a false positive
    ([], 0.0),
])
def test_sample_f1_counts_matches_at_iou_half(tmp_path, predicted, expected):
    record = _record(tmp_path, [("bolt", [0, 0, 16, 16]), ("screw", [32, 32, 64, 64])])
    assert sample_f1(_answer(predicted), record, "rel1000", CATEGORIES) == pytest.approx(expected)


def test_metric_registry_is_the_one_table():
    assert set(METRIC_NAMES) >= {"loss", "token_acc", "coord_loss", "label_loss", "loss_sum", "det_f1"}
    for m in METRICS.values():  # every metric's column is in the event contract, nullable as registered
        assert EVENT_SCHEMA.field(m.column).nullable == m.nullable


@pytest.fixture(scope="module")
def empty_and_full(tmp_path_factory):
    """12 images: even ones empty (F1 1 for an empty answer), odd ones with two objects (F1 0 for it)."""
    root = tmp_path_factory.mktemp("det_f1")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        objects = [] if i % 2 == 0 else [("bolt", (0, 0, 16, 16)), ("screw", (32, 32, 64, 64))]
        render_grid_image(rng, 64, objects).save(root / f"{i}.png")
        lines.append({"id": f"img-{i}", "image": f"{i}.png", "width": 64, "height": 64,
                      "objects": [{"label": label, "bbox": list(box)} for label, box in objects]})
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_det_f1_events_fold_and_plan_equal_the_oracle(tmp_path, empty_and_full):
    raw = {
        "model": {"hidden_size": 32, "num_layers": 1, "patch_size": 8, "vision_hidden_size": 16,
                  "image_min_pixels": 4096, "image_max_pixels": 4096},
        "training": {"output_dir": str(tmp_path / "run"), "num_train_epochs": 2, "per_device_train_batch_size": 4,
                     "save_strategy": "no", "report_to": [], "use_cpu": True, "logging_steps": 100, "disable_tqdm": True},
        "custom": {
            "fusion_config": {"target": {"name": "t", "train_jsonl": str(empty_and_full / "train.jsonl")}},
            "hard_sample_mining": {"enabled": True, "mode": "reweight", "metric": "det_f1", "start_epoch": 1,
                                   "selector": {"mode": "top_k", "k": 6}, "hard_weight": 2.0},
            # Three new tokens cannot hold a box: every answer is empty, so F1 is 1 exactly on the empty images.
            "det_f1": {"every": 1, "batch_size": 5, "max_new_tokens": 3},
        },
    }
    cfg = parse_config(raw, "test")
    summary = train(cfg)
    hsm_dir = tmp_path / "run" / "hsm"
    events = read_epoch_events(hsm_dir, 0).table.to_pylist()
    measured = [r for r in events if r["det_f1"] is not None]
    trained = [r for r in events if r["det_f1"] is None]
    assert len(trained) == 12 and all(r["loss"] == r["loss"] for r in trained)  # training rows: no det_f1
    assert sorted(r["base_idx"] for r in measured) == list(range(12))  # every target image once
    assert all(r["det_f1"] == (1.0 if r["base_idx"] % 2 == 0 else 0.0) for r in measured)
    assert all(r["position"] >= POSITION_BASE and r["n_tokens"] == 0 for r in measured)
    assert not any(r["det_f1"] is not None for r in read_epoch_events(hsm_dir, 1).table.to_pylist())  # last epoch: none

    mining = cfg.mining
    state = oracle.full_state(events, metric="det_f1", decay=mining.ema_decay, aggregate=mining.aggregate)
    stored = pq.read_table(hsm_dir / "state" / "epoch=0" / "state.parquet").to_pylist()
    assert {r["base_idx"]: (r["n_obs"], r["score"]) for r in stored} == \
        {k[1]: (v["n_obs"], pytest.approx(v["score"])) for k, v in state.items()}
    plan = pq.read_table(hsm_dir / "plans" / "epoch=1" / "plan.parquet").to_pylist()
    expected = oracle.plan(state, "t", mining, 1)
    assert {r["base_idx"]: (r["is_hard"], r["weight"]) for r in plan} == expected
    assert {i for i, (hard, _) in expected.items() if hard} == {1, 3, 5, 7, 9, 11}
    # The epoch's mean train loss (plateau detection) is over the training rows only (det_f1 rows are NaN).
    mean_loss = read_state_info(hsm_dir, 0).epoch_stats[0]["mean_loss"]
    assert mean_loss == pytest.approx(sum(r["loss"] for r in trained) / len(trained), rel=1e-6)
    passes = [c for c in summary["trainer"].callback_handler.callbacks if type(c).__name__ == "DetF1Callback"]
    assert passes[0].passes == 1 and passes[0].seconds > 0
