"""Oracle by construction: a target sample with a wrong label, trained with the real Trainer, becomes a suspect."""

from __future__ import annotations

import json

import pytest

from hsm.config import load_config
from hsm.run import train
from hsm.suspects import data_map, read_epoch_metrics
from hsm.synth import synthesize

pytestmark = pytest.mark.slow

WRONG = 5
EPOCHS = 5


def inject_wrong_label(train_jsonl, index: int) -> str:
    """Shift every box of one record off its object (into the opposite corner) and give it a foreign class."""
    lines = train_jsonl.read_text().splitlines()
    record = json.loads(lines[index])
    width, height = record["width"], record["height"]
    objects = []
    for k in range(6):  # six boxes where there is nothing, labelled with a class the target never uses
        x1, y1 = (k * 9) % (width - 8), (k * 13) % (height - 8)
        objects.append({"label": "lamp", "bbox": [x1, y1, x1 + 7, y1 + 7]})
    record["objects"] = objects
    lines[index] = json.dumps(record)
    train_jsonl.write_text("\n".join(lines) + "\n")
    return record["id"]


def config(corpus, out, *extra):
    return load_config("configs/demo.yaml", [
        f"custom.fusion_config.target.train_jsonl={corpus['bbu']}", "custom.fusion_config.target.val_jsonl=null",
        "custom.fusion_config.sources=[]", "custom.fusion_config.augmentation.enabled=false",
        "custom.hard_sample_mining.dump=false", "custom.hard_sample_mining.selector={mode: top_k, k: 4}",
        f"training.output_dir={out}", f"training.num_train_epochs={EPOCHS}", "training.per_device_train_batch_size=8",
        "training.save_strategy='no'", "training.report_to=[]", "training.logging_steps=50", *extra,
    ])


def test_wrong_label_becomes_a_suspect_and_is_kept_out(tmp_path):
    corpus = synthesize(tmp_path / "corpus", n_target=40, n_source=2, n_val=2, hard_fraction=0.0)
    wrong_id = inject_wrong_label(corpus["bbu"], WRONG)
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
    # Its score is still the highest: without the option it would be the first hard sample.
    assert plan["score"][row] == max(plan["score"])
