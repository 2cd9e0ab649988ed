"""Oracle by construction: a target sample whose box is off its object, trained with the real Trainer, becomes a suspect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hsm.config_load import load_config
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.run import train
from hsm.mining.suspects import data_map, read_epoch_metrics
from hsm.data.synth import DOMAINS, render_image

pytestmark = pytest.mark.slow

WRONG = 5
EPOCHS = 5
OBJECT = (16, 16, 48, 48)
OFF_OBJECT = (44, 44, 62, 62)


def regular_corpus(root: Path, n: int = 40) -> dict[str, Path]:
    """Target images with one object, always at OBJECT: the box is learnable. Record WRONG
    points its box off the object (OFF_OBJECT): a label wrong by construction."""
    classes, tint = DOMAINS["bbu"]
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        label = classes[i % 4]
        render_image(rng, 64, 64, tint, [(label, OBJECT)]).save(root / "images" / f"{i:03d}.png")
        box = OFF_OBJECT if i == WRONG else OBJECT
        lines.append(json.dumps({"id": f"t-{i:03d}", "image": f"images/{i:03d}.png", "width": 64, "height": 64,
                                 "objects": [{"label": label, "bbox": list(box)}]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"bbu": root / "train.jsonl"}


def config(corpus, out, *extra):
    return load_config("configs/demo.yaml", [
        f"custom.fusion_config.target.train_jsonl={corpus['bbu']}", "custom.fusion_config.target.val_jsonl=null",
        "custom.fusion_config.sources=[]", "custom.fusion_config.augmentation.enabled=false",
        "custom.hard_sample_mining.dump=false", "custom.hard_sample_mining.selector={mode: top_k, k: 4}",
        f"training.output_dir={out}", f"training.num_train_epochs={EPOCHS}", "training.per_device_train_batch_size=4",
        "training.save_strategy='no'", "training.report_to=[]", "training.logging_steps=50", *extra,
    ])


def test_wrong_label_becomes_a_suspect_and_is_kept_out(tmp_path):
    corpus = regular_corpus(tmp_path / "corpus")
    wrong_id = f"t-{WRONG:03d}"
    out = tmp_path / "run"
    train(config(corpus, out, "custom.hard_sample_mining.exclude_suspects=true"))
    hsm_dir = out / "hsm"
    dm = data_map(read_epoch_metrics(hsm_dir, range(EPOCHS), "bbu", "loss"))
    suspects = set(dm.base_idx[dm.is_suspect].tolist())
    assert WRONG in suspects, (dm.mean[WRONG], sorted(zip(dm.mean, dm.base_idx))[-5:])
    last = json.loads((hsm_dir / "plans" / f"epoch={EPOCHS}" / "manifest.json").read_text())
    assert wrong_id in last["suspects"]["sample_ids"]
    import pyarrow.parquet as pq

    plan = pq.read_table(hsm_dir / "plans" / f"epoch={EPOCHS}" / "plan.parquet").to_pydict()
    row = plan["base_idx"].index(WRONG)
    assert not plan["is_hard"][row] and plan["weight"][row] == 1.0
    # Without the option the same state would put it in the hard set.
    cfg = load_config(hsm_dir / "config.yaml", ["custom.hard_sample_mining.exclude_suspects=false"])
    plain = plan_epoch(PlanRequest(hsm_dir, EPOCHS, cfg.mining, "bbu", write=False)).plan.to_pydict()
    assert plain["is_hard"][plain["base_idx"].index(WRONG)]
