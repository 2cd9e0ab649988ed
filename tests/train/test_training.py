"""The real transformers.Trainer with the tiny Qwen3-VL: loss equality, disabled = unchanged, end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from hsm.data.fusion import DetectionCollator, FusionDataset
from hsm.train.model import build_model, build_processor
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.run import train
from hsm.schemas import EVENT_SCHEMA
from hsm.layout import RunPaths
from hsm.train.session import MiningSession
from hsm.train.trainer import HsmTrainerMixin, make_trainer_class

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(24, 8, 4)


@pytest.fixture
def run_config(demo_config):
    def load(corpus, out, *, mining: bool, epochs: int = 3, extra=()):
        return demo_config(corpus, out, f"training.num_train_epochs={epochs}", "training.report_to=[tensorboard]",
                           "training.logging_steps=1", f"custom.hard_sample_mining.enabled={'true' if mining else 'false'}",
                           *extra)

    return load


def batch_and_model(cfg):
    processor = build_processor(cfg.model)
    dataset = FusionDataset(cfg.custom.fusion_config, processor, cfg.model)
    items = [dataset[(0, i, False, 0, i)] for i in range(3)] + [dataset[(1, 0, False, 0, 3)]]
    return DetectionCollator(processor.tokenizer.pad_token_id)(items), build_model(cfg.model, processor.tokenizer)


@pytest.mark.parametrize("num_items", [None, 37])
def test_mixin_loss_equals_plain_trainer_and_recombines(tmp_path, corpus, num_items, demo_config):
    cfg = demo_config(corpus, tmp_path)
    batch, model = batch_and_model(cfg)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_accumulation_steps=2)
    plain = Trainer(model=model, args=args)
    hsm_trainer = make_trainer_class(Trainer, mining=True)(model=model, args=args)
    hsm_trainer.use_session(MiningSession(sampler=None, fusion=cfg.custom.fusion_config, mining=None,
                                          paths=RunPaths.of(tmp_path), run_id="t"))
    hsm_trainer.compute_loss_func = hsm_trainer._mining_loss  # the loss alone: no events without a run
    inputs = {k: v for k, v in batch.items() if k != "hsm_meta"}
    model.train()
    with torch.no_grad():
        expected = plain.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
        got = hsm_trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # Per-sample values against an independent per-sample computation from the logits.
    from hsm.train.stats import per_sample_stats, token_losses

    stats = per_sample_stats(*token_losses(logits, inputs["labels"]))
    for i in range(4):
        labels = inputs["labels"][i, 1:]
        mask = labels != -100
        row_logits = logits[i, :-1][mask].float()
        assert stats[0, i].item() == pytest.approx(F.cross_entropy(row_logits, labels[mask]).item(), rel=1e-5)
        assert stats[1, i].item() == pytest.approx((row_logits.argmax(-1) == labels[mask]).float().mean().item())
        assert stats[2, i].item() == mask.sum().item()
    # The model normalises by num_items_in_batch only when it accepts loss kwargs; the mixin mirrors that.
    scaled = num_items is not None and hsm_trainer.model_accepts_loss_kwargs
    recombined = (stats[0] * stats[2]).sum() / (num_items if scaled else stats[2].sum())
    assert recombined.item() == pytest.approx(got.item(), rel=1e-5)


def test_disabled_mining_leaves_training_unchanged(tmp_path, corpus, run_config):
    seen: list[set] = []
    import hsm.train.model as model_module  # train() imports it at call time: watch the model it builds

    build = model_module.load_model_and_processor

    def load_and_watch(*args, **kwargs):
        model, processor = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, a, kw: seen.append(set(kw)), with_kwargs=True)
        return model, processor

    model_module.load_model_and_processor = load_and_watch
    try:
        off = train(run_config(corpus, tmp_path / "off", mining=False, epochs=1))
    finally:
        model_module.load_model_and_processor = build
    # hsm_meta never reaches model.forward (Qwen-VL's **kwargs would swallow it silently).
    assert seen and not any("hsm_meta" in keys for keys in seen)
    # Fusion telemetry is logged with mining off too.
    assert hsm_logs(off["trainer"], "fusion/bbu/items") == [24.0] and hsm_logs(off["trainer"], "fusion/coco/items") == [6.0]
    assert hsm_logs(off["trainer"], "fusion/epoch_size") == [36.0]
    on = train(run_config(corpus, tmp_path / "on", mining=True, epochs=1))
    assert not isinstance(off["trainer"], HsmTrainerMixin)
    assert off["trainer"].compute_loss_func is None
    assert not (tmp_path / "off" / "hsm" / "events").exists()
    losses_off = [h["loss"] for h in off["trainer"].state.log_history if "loss" in h]
    losses_on = [h["loss"] for h in on["trainer"].state.log_history if "loss" in h]
    assert losses_off == pytest.approx(losses_on, rel=1e-5)
    for a, b in zip(off["trainer"].model.parameters(), on["trainer"].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_end_to_end_mining(tmp_path, corpus, run_config, mining_run):
    # mining_run is run_config(corpus, out, mining=True, epochs=3), trained once for this file's worker
    # (this test and the SIGKILL-and-resume test below).
    out, summary = mining_run["out"], mining_run["summary"]
    assert mining_run["corpus"] == corpus
    hsm_dir = out / "hsm"
    parts = sorted(hsm_dir.glob("events/epoch=*/rank=0/part-*.parquet"))
    assert parts and pq.read_schema(parts[0]).equals(EVENT_SCHEMA, check_metadata=False)
    events = pa.concat_tables([pq.read_table(p) for p in parts])
    n_steps_per_epoch = summary["global_step"] // 3
    assert events.num_rows == 3 * 4 * n_steps_per_epoch  # every slot logged exactly once
    # The in-training plan equals hsm plan run offline on the same events.
    offline = tmp_path / "offline" / "hsm"
    shutil.copytree(hsm_dir / "events", offline / "events")
    cfg = run_config(corpus, out, mining=True)
    result = plan_epoch(PlanRequest(offline, 2, cfg.mining, "bbu"))
    assert result.plan.to_pylist() == pq.read_table(hsm_dir / "plans" / "epoch=2" / "plan.parquet").to_pylist()
    assert set(result.plan.column("dataset").to_pylist()) == {"bbu"}
    # The sampler used the plan: in epoch 2 each hard sample was drawn ~hard_weight times.
    epoch2 = events.filter(pa.compute.equal(events.column("epoch"), 2)).to_pylist()
    plan = {r["base_idx"]: r["is_hard"] for r in result.plan.to_pylist()}
    counts: dict[int, int] = {}
    for e in epoch2:
        if e["dataset"] == "bbu":
            counts[e["base_idx"]] = counts.get(e["base_idx"], 0) + 1
            assert e["drawn_as_hard"] == plan.get(e["base_idx"], False)
        else:
            assert not e["drawn_as_hard"]
    hard = [counts.get(i, 0) for i, h in plan.items() if h]
    regular = [counts.get(i, 0) for i, h in plan.items() if not h]
    assert min(hard) >= 2 and max(regular) <= 1
    logged = {k for h in summary["trainer"].state.log_history for k in h}
    for key in ("hard_pool_size", "hard_hit_rate", "hard_pool_coverage", "train_acc_hard_mean", "train_acc_hard_p90",
                "train_acc_regular_mean", "train_acc_regular_p90", "seen_hard", "seen_regular", "triggered",
                "top_loss_mean", "num_hard", "weights/max", "weights/min", "shortfall", "fusion/bbu/items",
                "nonfinite", "no_signal"):
        assert f"hsm/{key}" in logged, key
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    # The scalars' values agree with the event log and the plans.
    trainer = summary["trainer"]
    by_epoch = epoch_events(out)
    for epoch, rate, hard, regular, coverage in zip(range(3), hsm_logs(trainer, "hard_hit_rate"), hsm_logs(trainer, "seen_hard"),
                                                    hsm_logs(trainer, "seen_regular"), hsm_logs(trainer, "hard_pool_coverage")):
        target = [e for e in by_epoch[epoch] if e["dataset"] == "bbu"]
        drawn_hard = [e for e in target if e["drawn_as_hard"]]
        assert (hard, regular) == (len(drawn_hard), len(target) - len(drawn_hard))
        assert rate == pytest.approx(len(drawn_hard) / len(target))
        plan_path = out / "hsm" / "plans" / f"epoch={epoch}" / "plan.parquet"
        if epoch == 0 or not plan_path.exists():
            assert coverage == 0.0 and not drawn_hard
            continue
        pool = {r["base_idx"] for r in pq.read_table(plan_path).to_pylist() if r["is_hard"]}
        assert coverage == pytest.approx(len(pool & {e["base_idx"] for e in drawn_hard}) / len(pool))
        assert coverage > 0
    for epoch, items in enumerate(hsm_logs(trainer, "fusion/lvis/items")):
        assert items == sum(e["dataset"] == "lvis" for e in by_epoch[epoch])
    assert hsm_logs(trainer, "fusion/epoch_size") == [36.0] * 3  # 24 target + 2 x 6 source slots
    assert hsm_logs(trainer, "selector/percentile") == [1.0] * 3



def epoch_events(out) -> dict[int, list[dict]]:
    parts = sorted((out / "hsm").glob("events/epoch=*/rank=0/part-*.parquet"))
    rows = pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()
    by_epoch: dict[int, list[dict]] = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], []).append(row)
    return by_epoch


def hsm_logs(trainer, key: str) -> list[float]:
    return [h[f"hsm/{key}"] for h in trainer.state.log_history if f"hsm/{key}" in h]


def test_fixed_set_epochs_keep_the_length_the_trainer_counted(tmp_path, corpus, run_config):
    # target_epoch_size below the target size used to end the run early; above it, starved the sources.
    for size in (10,):  # the pure schedule tests cover sizes above the target
        out = tmp_path / f"size{size}"
        steps_per_epoch = -(-(size + 12) // 4)
        extra = ["custom.hard_sample_mining.mode=fixed_set", f"custom.hard_sample_mining.target_epoch_size={size}",
                 "custom.hard_sample_mining.hard_sample_size=3", "custom.hard_sample_mining.regular_sample_size=2",
                 "custom.hard_sample_mining.start_epoch=2",
                 f"training.max_steps={3 * steps_per_epoch}", "training.num_train_epochs=1"]
        cfg = run_config(corpus, out, mining=True, epochs=1, extra=extra)
        with pytest.warns(UserWarning, match="target samples were never drawn before it") as caught:
            summary = train(cfg)
        assert summary["global_step"] == 3 * steps_per_epoch  # the run reaches max_steps
        by_epoch = epoch_events(out)
        assert sorted(by_epoch) == [0, 1, 2]
        for epoch, rows in by_epoch.items():
            counts = Counter(e["dataset"] for e in rows)
            assert counts == {"bbu": size, "lvis": 6, "coco": 6}, (size, epoch)
        chosen = {e["base_idx"] for e in by_epoch[2] if e["dataset"] == "bbu"}
        assert len(chosen) <= 5  # the plan's 3 hard + 2 regular fill the target part
        # Before the plan applies, the target part cycles through the whole target.
        cycle = [e["base_idx"] for epoch in (0, 1) for e in sorted(by_epoch[epoch], key=lambda e: (e["global_step"], e["position"]))
                 if e["dataset"] == "bbu"]
        assert len(set(cycle)) == min(len(cycle), 24)
        # Epochs 0-1 drew 20 of the 24 (2 x 10): the other 4 were never observed, so the plan cannot weigh them and
        # epoch 2 draws none of them. That is said, not silent: warned at the plan, counted in its manifest, and in
        # hsm plan's summary, with the start_epoch that covers the target (ceil(24 / 10) = 3).
        never = set(range(24)) - set(cycle)
        assert len(never) == 4 and not chosen & never
        manifest = json.loads((out / "hsm" / "plans" / "epoch=2" / "manifest.json").read_text())
        assert manifest["counts"]["unobserved"] == len(never) and manifest["triggered"]
        warned = [str(w.message) for w in caught if "never drawn" in str(w.message)]
        assert len(warned) == 2 and "for epoch 3: 4 of the 24" in warned[1]  # and for epoch 3, planned at the end
        assert warned[:1] == ["hsm: fixed_set plan for epoch 2: 4 of the 24 target samples were never drawn before it, so "
                          "they can be neither hard nor regular and get weight 0: they are not trained on while "
                          "fixed_set plans apply; with target_epoch_size=10 the epochs before the first plan cover "
                          "the target only from start_epoch >= 3 on"]
        from typer.testing import CliRunner

        from hsm.cli.app import app

        offline = CliRunner().invoke(app, ["plan", "--run-dir", str(out), "--epoch", "2", "--dry-run"])
        assert offline.exit_code == 0, offline.output
        assert warned[0].removeprefix("hsm: ") in " ".join(offline.output.split())


def test_activate_after_pct_counts_the_epochs_max_steps_runs(tmp_path, corpus, run_config):
    out = tmp_path / "run"
    # num_train_epochs=1 would make it 0.75 epochs (epoch 1 applies); max_steps runs 2 epochs: 1.5.
    extra = ["custom.hard_sample_mining.activate_after_pct=0.75", "training.num_train_epochs=1", "training.max_steps=18"]
    train(run_config(corpus, out, mining=True, epochs=1, extra=extra))  # 9 steps per epoch: 2 epochs
    manifests = {e: json.loads((out / "hsm" / "plans" / f"epoch={e}" / "manifest.json").read_text()) for e in (1, 2)}
    assert not manifests[1]["triggered"] and "2.0 epochs" in manifests[1]["trigger_reason"]
    # Offline, hsm plan triggers as training did (hsm/run.json keeps the epochs the Trainer ran).
    from typer.testing import CliRunner

    from hsm.cli.app import app

    offline = CliRunner().invoke(app, ["plan", "--run-dir", str(out), "--epoch", "1", "--dry-run"])
    assert offline.exit_code == 0, offline.output
    assert "not applied" in offline.output and "2.0 epochs" in " ".join(offline.output.split())
    assert manifests[2]["triggered"]


ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 9  # 24 target + 2 x 6 source slots, batches of 4


def _resume_command(corpus: list[str], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hsm.cli.app", "train", "configs/demo.yaml", *corpus,
        f"training.output_dir={out}", "training.num_train_epochs=3", "training.per_device_train_batch_size=4",
        "training.save_strategy=steps", "training.save_steps=3", "training.save_total_limit=null",
        "training.report_to=[]", *extra,
    ]


def _plans(run: Path) -> dict[int, list[dict]]:
    return {e: pq.read_table(run / "hsm" / "plans" / f"epoch={e}" / "plan.parquet").to_pylist() for e in (1, 2, 3)}


def test_sigkill_and_resume_gives_the_uninterrupted_plans(tmp_path, mining_run, demo_overrides):
    """Crash and resume: SIGKILL mid-epoch, resume from the last complete checkpoint, the uninterrupted run's plans.

    The uninterrupted run is ``mining_run`` (the same corpus, config and epochs; it saves no checkpoints and logs
    every step: neither changes a plan), shared with the tests above in this file's worker."""
    corpus = demo_overrides(mining_run["corpus"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    straight = mining_run["out"]

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(_resume_command(corpus, crashed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = crashed / f"checkpoint-{STEPS_PER_EPOCH + 3}" / "trainer_state.json"  # mid-epoch 1
    deadline = time.time() + 240
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.exists(), "training ended before the mid-epoch checkpoint"
    assert not (crashed / "hsm" / "plans" / "epoch=2").exists(), "killed too late: epoch 1 had finished"
    checkpoints = sorted(crashed.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    last = checkpoints[-1].parent
    # A save killed midway (no trainer_state.json yet): `last` passes over it to the newest complete one.
    half = crashed / f"checkpoint-{int(last.name.split('-')[1]) + 1}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"")
    done = subprocess.run(_resume_command(corpus, crashed, "training.resume_from_checkpoint=last"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last}" in " ".join(done.stderr.split()) and half.name in done.stderr

    attempts = {a for p in (crashed / "hsm" / "events").rglob("part-*.parquet") for a in pq.read_table(p, columns=["attempt"]).column("attempt").to_pylist()}
    assert attempts == {0, 1}
    expected, got = _plans(straight), _plans(crashed)
    for epoch in (1, 2, 3):
        assert [(r["dataset"], r["base_idx"], r["is_hard"], r["weight"], r["n_obs"]) for r in got[epoch]] == \
               [(r["dataset"], r["base_idx"], r["is_hard"], r["weight"], r["n_obs"]) for r in expected[epoch]], epoch
        for a, b in zip(got[epoch], expected[epoch]):
            assert a["score"] == pytest.approx(b["score"], rel=1e-5), (epoch, a["base_idx"])
