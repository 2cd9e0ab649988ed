"""One optimizer step of ``hsm train`` with mining on is bit-identical to the plain run (mining off).

The loss of every micro-batch and every parameter's gradient are compared with ``torch.equal`` through the real
``transformers.Trainer`` and the tiny Qwen3-VL (``accepts_loss_kwargs = False``: its loss is each micro-batch's own
token mean), at gradient accumulation 1 and 2.
"""

from __future__ import annotations

import pytest
from transformers import Trainer

from hsm.run import train
from step_tap import assert_same_step, tapped

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(24, 8, 4)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_step_of_hsm_train_is_bit_identical_to_the_plain_run(tmp_path, corpus, demo_config, accumulation):
    runs = {}
    for mining in ("false", "true"):
        cfg = demo_config(corpus, tmp_path / mining, "training.max_steps=1", "training.max_grad_norm=0",
                          f"training.gradient_accumulation_steps={accumulation}",
                          f"custom.hard_sample_mining.enabled={mining}")
        runs[mining] = train(cfg, base_trainer=tapped(Trainer))["trainer"]
    assert len(runs["true"].step_losses) == accumulation
    assert_same_step(runs["false"], runs["true"])
