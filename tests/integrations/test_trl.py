"""hsm inside TRL's SFTTrainer (VLM path) on the tiny real-architecture Qwen3-VL: events, plan, unchanged loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("trl")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling  # noqa: E402

from hsm.config import MiningConfig, SelectorConfig  # noqa: E402
from hsm.integrations.trl import HsmSFTTrainer, detection_dataset  # noqa: E402
from hsm.train.model import build_checkpoint  # noqa: E402
from hsm.data.synth import DEFAULT_PROMPTS, synthesize  # noqa: E402
from step_tap import in_order  # noqa: E402
from lock_holder import lock_held  # noqa: E402
from wholerun import replan_and_report

pytestmark = pytest.mark.slow


def sft_config(out, epochs):
    return SFTConfig(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=4, learning_rate=0.01,
                     lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     seed=0, max_length=None, dataloader_num_workers=0)


def box_token_positions(tokenizer, input_ids: list[int], answer: str) -> tuple[set[int], set[int]]:
    """Oracle, independent of hsm's scanners: the answer's coordinate and label tokens in ``input_ids``.

    Coordinates and labels are found in the JSON answer by parsing it (``json.loads``) and locating each value's
    text in writing order with ``str.find``; the answer's tokens are found in the ids by a plain scan.
    """
    import json

    spans = []  # (start, end, role)
    cursor = 0
    for obj in json.loads(answer):
        cursor = answer.index("[", answer.index('"bbox_2d"', cursor))
        for value in obj["bbox_2d"]:
            at = answer.index(str(value), cursor)
            spans.append((at, at + len(str(value)), "coord"))
            cursor = at + len(str(value))
        text = json.dumps(obj["label"])[1:-1]
        at = answer.index('"', answer.index(":", answer.index('"label"', cursor))) + 1  # the value's opening quote
        spans.append((at, at + len(text), "label"))
        cursor = at + len(text) + 1
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    run = encoded["input_ids"]
    first = next(i for i in range(len(input_ids)) if input_ids[i:i + len(run)] == run)
    coords, labels = set(), set()
    for k, (start, end) in enumerate(encoded["offset_mapping"]):
        roles = {role for s, e, role in spans if s < end and start < e}
        if "coord" in roles:
            coords.add(first + k)
        elif "label" in roles:
            labels.add(first + k)
    return coords, labels


def answer_positions(tokenizer, input_ids: list[int]) -> list[int]:
    """Oracle: the positions of the last assistant turn's content and its ``<|im_end|>``, found by walking the ids
    from the last ``<|im_start|>`` past the ``assistant\n`` header (what hsm train supervises)."""
    im_start, im_end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = max(t for t, i in enumerate(input_ids) if i == im_start)
    header = len(tokenizer("assistant\n", add_special_tokens=False)["input_ids"])
    end = input_ids.index(im_end, start + 1 + header)
    return list(range(start + 1 + header, end + 1))


def recomputed_box_losses(checkpoint, processor, rows: list[dict]) -> list[dict]:
    """Per-sample loss, coord_loss, label_loss, loss_sum, n_tokens of the untrained model over the answer's tokens
    (TRL itself trains on the prompt too), each row alone, in float64."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    collator = DataCollatorForVisionLanguageModeling(processor)
    out = []
    for row in rows:
        answer = row["messages"][-1]["content"][0]["text"]
        batch = collator([dict(row)])
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].double()
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
        assert (labels[:-1] != -100).sum() > len(answer_positions(processor.tokenizer, ids))  # TRL trains on more
        nll = {t: -torch.log_softmax(logits[t - 1], -1)[labels[t]].item() for t in answer_positions(processor.tokenizer, ids)}
        coords, label_tokens = box_token_positions(processor.tokenizer, ids, answer)
        out.append({"loss": sum(nll.values()) / len(nll), "loss_sum": sum(nll.values()), "n_tokens": len(nll),
                    "coord_loss": sum(nll[t] for t in coords) / len(coords),
                    "label_loss": sum(nll[t] for t in label_tokens) / len(label_tokens)})
    return out


InOrderSFTTrainer = in_order(SFTTrainer)  # the plain SFTTrainer, fed hsm's epoch-0 order by the tests


MINING = MiningConfig(enabled=True, mode="reweight", metric="loss", start_epoch=1,
                      selector=SelectorConfig(mode="top_k", k=2), hard_weight=3.0)


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory) -> dict:
    """One HsmSFTTrainer run, mining on, 2 epochs of 8 rows in batches of 4, shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("trl")
    checkpoint = build_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    corpus = synthesize(tmp_path / "corpus", n_target=8, n_source=1, n_val=1)
    system, user = DEFAULT_PROMPTS["target"]
    dataset = detection_dataset(corpus["bbu"], system=system, user=user)
    processor = AutoProcessor.from_pretrained(checkpoint)
    out = tmp_path / "hsm"
    trainer = HsmSFTTrainer(model=AutoModelForImageTextToText.from_pretrained(checkpoint), args=sft_config(out, 2),
                            train_dataset=dataset, processing_class=processor, mining=MINING, dataset_name="bbu")
    trainer.train()
    events = pa.concat_tables([pq.read_table(p) for p in sorted((out / "hsm").glob("events/epoch=*/rank=0/*.parquet"))])
    return {"tmp": tmp_path, "checkpoint": checkpoint, "corpus": corpus, "dataset": dataset, "processor": processor,
            "out": out, "trainer": trainer, "events": events, "prompts": (system, user)}


def test_hsm_sft_trainer_logs_plans_and_keeps_trl_loss(tmp_path, trl_run):
    checkpoint, dataset, processor = trl_run["checkpoint"], trl_run["dataset"], trl_run["processor"]
    out, trainer, events = trl_run["out"], trl_run["trainer"], trl_run["events"]
    epoch0 = events.filter(pc.equal(events.column("epoch"), 0)).sort_by([("global_step", "ascending"), ("position", "ascending")])
    assert sorted(epoch0.column("sample_id").to_pylist()) == sorted(dataset["id"])  # every row once
    # Box-aware signals from the same pass, over the answer's tokens only: step 0 ran the untrained weights,
    # recomputed here row by row.
    first = epoch0.filter(pc.equal(epoch0.column("global_step"), 0)).to_pylist()
    expected = recomputed_box_losses(checkpoint, processor, [dataset[e["base_idx"]] for e in first])
    for event, oracle in zip(first, expected):
        assert event["n_tokens"] == oracle["n_tokens"]
        for key in ("loss", "loss_sum", "coord_loss", "label_loss"):
            assert event[key] == pytest.approx(oracle[key], rel=1e-4, abs=1e-5), key
    plan = pq.read_table(out / "hsm" / "plans" / "epoch=1" / "plan.parquet").to_pylist()
    hard = {r["base_idx"] for r in plan if r["is_hard"]}
    assert len(hard) == 2
    # Epoch 1 follows the plan: the hard rows are drawn as hard, about hard_weight times each.
    epoch1 = events.filter(pc.equal(events.column("epoch"), 1)).to_pylist()
    assert {e["base_idx"] for e in epoch1 if e["drawn_as_hard"]} == hard
    assert all(e["drawn_as_hard"] == (e["base_idx"] in hard) for e in epoch1)
    hsm_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    # A plain SFTTrainer on the same rows in hsm's epoch-0 order gives the same loss, step for step.
    ordered = dataset.select(epoch0.column("base_idx").to_pylist())
    plain = InOrderSFTTrainer(model=AutoModelForImageTextToText.from_pretrained(checkpoint),
                              args=sft_config(tmp_path / "plain", 1), train_dataset=ordered, processing_class=processor)
    plain.train()
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert len(plain_losses) == 2
    assert hsm_losses[:2] == pytest.approx(plain_losses, rel=1e-6)


def test_trl_statistics_count_the_tokens_hsm_train_supervises(trl_run):
    """The same record's n_tokens under TRL (which trains on the prompt too) and under hsm train's own encoding."""
    from PIL import Image

    from hsm.data.encoding import Template
    from hsm.data.records import read_jsonl

    records = read_jsonl(trl_run["corpus"]["bbu"])
    system, user = trl_run["prompts"]
    template = Template(trl_run["processor"], system)
    epoch0 = trl_run["events"].filter(pc.equal(trl_run["events"].column("epoch"), 0)).to_pylist()
    for event in epoch0:
        row = trl_run["dataset"][event["base_idx"]]
        with Image.open(records[event["base_idx"]].image) as image:
            encoded = template.encode(image.convert("RGB"), user, row["messages"][-1]["content"][0]["text"], system)
        assert event["n_tokens"] == int((encoded["labels"] != -100).sum()), event["sample_id"]


def test_trl_run_is_a_whole_run_for_plan_report_and_sql(tmp_path, trl_run):
    """`hsm plan`, `hsm report` and `hsm sql` on a TRL run with no flags: the config is the one trained with, the
    plan equals training's, and the report's gallery shows every card's image with the record's own boxes."""
    import shutil

    import yaml
    from typer.testing import CliRunner

    from hsm.cli.app import app
    from hsm.config_load import load_config
    from hsm.data.records import read_jsonl
    from hsm.report.data import read_sample_records

    run = tmp_path / "run"
    shutil.copytree(trl_run["out"], run)
    config = load_config(run / "hsm" / "config.yaml")
    assert config.mining == MINING and config.target_name == "bbu"
    html = replan_and_report(run, 2)
    runner = CliRunner()
    assert html.count("data:image/jpeg") >= 16  # 8 hardest and 8 easiest cards, each with its image
    records = read_jsonl(trl_run["corpus"]["bbu"])
    shown = read_sample_records(run / "hsm", yaml.safe_load((run / "hsm" / "config.yaml").read_text())["model"]["coord_format"])
    assert len(shown) == len(records)
    for base_idx, record in enumerate(records):  # TRL's row i is the JSONL's line i
        got = shown[base_idx]
        assert (got.image, got.width, got.height) == (record.image, record.width, record.height)
        assert [o.label for o in got.objects] == [o.label for o in record.objects]
        for mine, want in zip(got.objects, record.objects):  # rel1000 rounding: within a thousandth of the side
            assert mine.bbox == pytest.approx(want.bbox, abs=record.width / 1000 + 1e-9)
    queried = runner.invoke(app, ["sql", "--run-dir", str(run), "dataset_breakdown"])
    assert queried.exit_code == 0 and "bbu" in queried.output, queried.output


def test_trl_fusion_telemetry_counts_the_epoch(trl_run):
    """hsm/fusion/<target>/items, input_len_mean and drawn_as_hard per epoch: the epoch's draws (the events), their
    mean length (each row collated alone by TRL's collator) and how many were drawn as hard."""
    collator = DataCollatorForVisionLanguageModeling(trl_run["processor"])
    length = [int(collator([dict(row)])["attention_mask"].sum()) for row in trl_run["dataset"]]
    logged = [h for h in trl_run["trainer"].state.log_history if "hsm/fusion/bbu/items" in h]
    events = trl_run["events"].to_pylist()
    assert len(logged) == 2
    for epoch, logs in enumerate(logged):
        drawn = [e for e in events if e["epoch"] == epoch]
        assert logs["hsm/fusion/bbu/items"] == len(drawn) == 8
        assert logs["hsm/fusion/bbu/drawn_as_hard"] == sum(e["drawn_as_hard"] for e in drawn)
        assert logs["hsm/fusion/bbu/input_len_mean"] == pytest.approx(sum(length[e["base_idx"]] for e in drawn) / len(drawn))
    assert logged[1]["hsm/fusion/bbu/drawn_as_hard"] > 0


def test_hsm_sft_trainer_refuses_det_f1_at_start_up(tmp_path):
    """det_f1 needs hsm train's generation pass: refused before TRL builds anything, naming the stack."""
    from hsm.config import ConfigError

    with pytest.raises(ConfigError, match=r"metric: 'det_f1' .* TRL does not run"):
        HsmSFTTrainer(model=None, args=sft_config(tmp_path, 1), train_dataset=None,
                      mining=MiningConfig(enabled=True, metric="det_f1"))


def test_fingerprint_changes_when_what_an_id_names_changes(tmp_path):
    """Positional ids (`bbu:<row>`) over the same file in another order name other images: another fingerprint;
    the same rows give the same one, and an edited answer another."""
    from hsm.integrations.slots import SlotDataset, row_contents

    corpus = synthesize(tmp_path / "corpus", n_target=6, n_source=1, n_val=1)
    lines = corpus["bbu"].read_text().splitlines(keepends=True)
    shuffled = corpus["bbu"].with_name("shuffled.jsonl")  # beside the images its relative paths name
    shuffled.write_text("".join(lines[::-1]))
    system, user = DEFAULT_PROMPTS["target"]

    def fingerprint(dataset) -> str:
        ids = [f"bbu:{i}" for i in range(len(dataset))]
        return SlotDataset(dataset, "bbu", ids, target_contents=row_contents(dataset)).info.fingerprint

    plain = detection_dataset(corpus["bbu"], system=system, user=user)
    assert fingerprint(plain) == fingerprint(detection_dataset(corpus["bbu"], system=system, user=user))
    assert fingerprint(plain) != fingerprint(detection_dataset(shuffled, system=system, user=user))
    edited = corpus["bbu"].with_name("edited.jsonl")
    edited.write_text("".join(lines).replace('"label": "', '"label": "x', 1))
    assert fingerprint(plain) != fingerprint(detection_dataset(edited, system=system, user=user))
    contents = row_contents(plain)
    assert [c["images"] for c in contents] == [[str(r["images"][0].filename)] for r in plain]


@pytest.mark.parametrize("flag", ["padding_free", "packing"])
def test_hsm_sft_trainer_refuses_packing_and_padding_free_at_start_up(tmp_path, flag):
    """TRL 1.16 refuses both for vision datasets, and a packed row is no longer one sample: hsm says so, naming the
    flag, before TRL builds anything (no model is needed to get the error)."""
    args = sft_config(tmp_path, 1)
    setattr(args, flag, True)
    with pytest.raises(ValueError, match=rf"^SFTConfig\.{flag}=True: .*set {flag}=False"):
        HsmSFTTrainer(model=None, args=args, train_dataset=None, mining=None)


def start_trainer(trl_run, out, **kwargs) -> HsmSFTTrainer:
    """An HsmSFTTrainer of one optimizer step on the shared run's rows, writing into ``out``."""
    args = sft_config(out, 1)
    args.max_steps = 1
    return HsmSFTTrainer(model=AutoModelForImageTextToText.from_pretrained(trl_run["checkpoint"]), args=args,
                         train_dataset=kwargs.pop("dataset", trl_run["dataset"]), processing_class=trl_run["processor"],
                         mining=MINING, dataset_name="bbu", **kwargs)


def test_hsm_sft_trainer_refuses_a_folder_another_training_holds(tmp_path, trl_run):
    """A second training on a run whose lock another process holds is refused when train() starts, before step 0."""
    from hsm.mining.plan import RunLocked

    lock = tmp_path / "out" / "hsm" / ".lock"
    lock.parent.mkdir(parents=True)
    with lock_held(lock):
        trainer = start_trainer(trl_run, tmp_path / "out")
        with pytest.raises(RunLocked, match="another hsm plan or training is writing this run"):
            trainer.train()
        assert trainer.state.global_step == 0
        assert [p.name for p in lock.parent.iterdir()] == [".lock"]  # nothing written


def test_hsm_sft_trainer_refuses_a_used_folder_and_overwrite_replaces_it(tmp_path, trl_run):
    """A fresh run into a folder holding an hsm run is refused, naming it, with the old run untouched;
    ``overwrite_output_dir=True`` removes the old run first, so the log holds the new run only."""
    import shutil

    from hsm.train.startup import RunExists

    used = tmp_path / "used"
    shutil.copytree(trl_run["out"] / "hsm", used / "hsm")
    before = {p: p.read_bytes() for p in sorted((used / "hsm").rglob("*")) if p.is_file() and p.name != ".lock"}
    with pytest.raises(RunExists, match=rf"{used / 'hsm'}: already holds an hsm run .*overwrite_output_dir=True"):
        start_trainer(trl_run, used).train()
    assert {p: p.read_bytes() for p in sorted((used / "hsm").rglob("*")) if p.is_file() and p.name != ".lock"} == before

    with pytest.warns(UserWarning, match="removed the previous hsm run"):
        start_trainer(trl_run, used, overwrite_output_dir=True).train()
    assert sorted(p.name for p in (used / "hsm" / "plans").iterdir()) == ["epoch=1"]  # the old run had epoch=2 too
    assert not (used / "hsm" / "events" / "epoch=1").exists()
    steps = pa.concat_tables([pq.read_table(p) for p in (used / "hsm").glob("events/epoch=*/rank=0/*.parquet")])
    assert set(steps.column("global_step").to_pylist()) == {0}  # one step of the new run, nothing of the old
    assert (used / "hsm" / "config.sha256.json").is_file() and (used / "hsm" / "samples.sha256.json").is_file()


def test_hsm_sft_trainer_names_a_truncated_image_before_step_0(tmp_path, trl_run):
    """An image truncated after the dataset was built fails when train() starts, naming its record's file:line."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(trl_run["corpus"]["bbu"].parent.parent, corpus)
    jsonl = corpus / trl_run["corpus"]["bbu"].relative_to(trl_run["corpus"]["bbu"].parent.parent)
    system, user = trl_run["prompts"]
    dataset = detection_dataset(jsonl, system=system, user=user)
    third = json.loads(jsonl.read_text().splitlines()[2])
    image = jsonl.parent / third["image"]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    trainer = start_trainer(trl_run, tmp_path / "out", dataset=dataset)
    from hsm.data.records import RecordError

    with pytest.raises(RecordError, match=rf"{jsonl.name}:3: image .* cannot be decoded"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "out" / "hsm").exists()


def torchrun_trl(checkpoint: Path, jsonl: Path, *runs: tuple[Path, int, str]) -> list[list[dict]]:
    """``tests/dist_trl.py`` once per ``(out, epochs, mining)`` of ``runs``, in one launch; each run's rank reports."""
    torchrun = Path(sys.executable).parent / "torchrun"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    argv = [arg for i, (out, epochs, mining) in enumerate(runs)
            for arg in (*(["--"] if i else []), str(checkpoint), str(jsonl), str(out), str(epochs), mining)]
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "tests/dist_runs.py", "tests/dist_trl.py", *argv],
                          cwd=root, capture_output=True, text=True, timeout=600 * len(runs), env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [[json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)] if mining != "identity" else None
            for out, _, mining in runs]


def test_hsm_sft_trainer_on_two_ranks(tmp_path):
    checkpoint = build_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    corpus = synthesize(tmp_path / "corpus", n_target=8, n_source=1, n_val=1)
    on, off, _ = torchrun_trl(checkpoint, corpus["bbu"], (tmp_path / "on", 2, "on"), (tmp_path / "off", 1, "off"),
                              (tmp_path / "identity", 1, "identity"))
    assert [r["backend"] for r in on] == ["gloo", "gloo"] and on[0]["expected"] == on[1]["expected"]

    parts = sorted((tmp_path / "on" / "hsm" / "events").glob("epoch=*/rank=*/*.parquet"))
    events = pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()
    epoch0 = [e for e in events if e["epoch"] == 0]
    assert {e["rank"] for e in epoch0} == {0, 1}  # events from both ranks
    assert sorted(e["base_idx"] for e in epoch0) == list(range(8))  # every row once over the two ranks
    plans = sorted((tmp_path / "on" / "hsm" / "plans").glob("epoch=*/plan.parquet"))
    assert [p.parent.name for p in plans] == ["epoch=1", "epoch=2"]  # one plan per epoch boundary, on rank 0's disk
    hard = {r["base_idx"] for r in pq.read_table(plans[0]).to_pylist() if r["is_hard"]}
    assert hard == {e["base_idx"] for e in sorted(epoch0, key=lambda e: -e["loss"])[:2]}
    epoch1 = [e for e in events if e["epoch"] == 1]
    assert epoch1 and {e["rank"] for e in epoch1} == {0, 1}
    assert all(e["drawn_as_hard"] == (e["base_idx"] in hard) for e in epoch1)

    # Mining on equals mining off step for step in epoch 0 (2 optimizer steps of 2 ranks x 2 rows).
    losses_on = [h["loss"] for h in on[0]["log_history"] if "loss" in h]
    losses_off = [h["loss"] for h in off[0]["log_history"] if "loss" in h]
    assert len(losses_off) == 2 and losses_on[:2] == pytest.approx(losses_off, rel=1e-6)

    # One optimizer step (2 micro-batches per rank) with mining on is bit-identical to plain TRL on the same rows, on
    # each rank: every micro-batch's loss and every gradient after DDP's all-reduce (torch.equal).
    from safetensors.torch import load_file

    for rank in (0, 1):
        hsm, plain = (load_file(str(tmp_path / "identity" / f"{v}-rank{rank}.safetensors")) for v in ("hsm", "plain"))
        assert hsm.keys() == plain.keys() and sum(k.startswith("loss.") for k in hsm) == 2
        differ = [k for k in hsm if not torch.equal(hsm[k], plain[k])]
        assert not differ, f"rank {rank}: {len(differ)} of {len(hsm)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hsm_eval_run_reads_trl_checkpoints(tmp_path, lora):
    """`hsm eval run` on the checkpoint-N folder TRL wrote (full weights, or a peft adapter folder):
    the model it evaluates is the trained one, and its answers are the trained model's own greedy answers."""
    import yaml
    from peft import LoraConfig
    from typer.testing import CliRunner

    from hsm.cli.app import app
    from hsm.config_load import load_config
    from hsm.data.encoding import resolve_prompts
    from hsm.data.records import read_jsonl
    from hsm.eval.generation import generate_answers, load_checkpoint

    base = build_checkpoint(tmp_path / "base", "qwen3_vl")
    corpus = synthesize(tmp_path / "corpus", n_target=8, n_source=1, n_val=3)
    system, user = DEFAULT_PROMPTS["target"]
    processor = AutoProcessor.from_pretrained(base)
    args = sft_config(tmp_path / "trl", 1)
    args.save_strategy, args.learning_rate = "epoch", 0.05
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer = HsmSFTTrainer(model=AutoModelForImageTextToText.from_pretrained(base), args=args, peft_config=peft,
                            train_dataset=detection_dataset(corpus["bbu"], system=system, user=user),
                            processing_class=processor, mining=None, dataset_name="bbu")
    trainer.train()
    checkpoint = next((tmp_path / "trl").glob("checkpoint-*"))
    assert (checkpoint / ("adapter_config.json" if lora else "config.json")).is_file()
    trained = trainer.model.merge_and_unload() if lora else trainer.model

    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(base)},
        "custom": {"fusion_config": {"target": {"name": "bbu", "train_jsonl": str(corpus["bbu"]),
                                                "val_jsonl": str(corpus["bbu"].with_name("val.jsonl"))},
                                     "domain_prompts": {"target": {"system": system, "user": user}}}}}))
    cfg = load_config(config)
    loaded, loaded_processor = load_checkpoint(cfg.model, checkpoint)
    want = {k: v for k, v in trained.state_dict().items()}
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)  # the trained weights, not the base's
    assert not all(torch.equal(got[k], v) for k, v in AutoModelForImageTextToText.from_pretrained(base).state_dict().items())

    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "run", str(config), "--checkpoint", str(checkpoint), "--out", str(out),
                                      "--max-new-tokens", "24", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(corpus["bbu"].with_name("val.jsonl"))
    answers = [json.loads(line) for line in (out / "bbu" / "answers.jsonl").read_text().splitlines()]
    expected = generate_answers(trained.eval(), processor, records, resolve_prompts(cfg.custom.fusion_config, "bbu"),
                                max_new_tokens=24, batch_size=2, max_image_side=cfg.custom.fusion_config.max_image_side)
    assert [a["answer"] for a in answers] == expected
    assert json.loads((out / "bbu" / "metrics.json").read_text())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_step_of_hsm_sft_trainer_is_bit_identical_to_plain_trl(tmp_path, accumulation):
    """The loss of every micro-batch and every parameter's gradient after one optimizer step ``torch.equal`` those of
    a plain SFTTrainer on the same rows: hsm reads TRL's own fused LM-head pass and adds nothing to the loss.
    (Padding-free is refused for vision datasets by TRL 1.16 itself, so padded batches only.)"""
    from step_tap import assert_same_step, tapped

    checkpoint = build_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    corpus = synthesize(tmp_path / "corpus", n_target=8, n_source=1, n_val=1)
    dataset = detection_dataset(corpus["bbu"], system=DEFAULT_PROMPTS["target"][0], user=DEFAULT_PROMPTS["target"][1])
    processor = AutoProcessor.from_pretrained(checkpoint)

    def args(out):
        config = sft_config(out, 1)
        config.max_steps, config.max_grad_norm, config.gradient_accumulation_steps = 1, 0.0, accumulation
        config.per_device_train_batch_size = 2
        return config

    hsm = tapped(HsmSFTTrainer)(model=AutoModelForImageTextToText.from_pretrained(checkpoint), args=args(tmp_path / "hsm"),
                                train_dataset=dataset, processing_class=processor, dataset_name="bbu",
                                mining=MiningConfig(enabled=True, mode="reweight", metric="loss"))
    hsm.train()
    parts = sorted((tmp_path / "hsm" / "hsm").glob("events/epoch=0/rank=0/*.parquet"))
    step0 = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by([("position", "ascending")])
    order = step0.column("base_idx").to_pylist()
    assert len(order) == 2 * accumulation  # every micro-batch logged its rows
    plain = tapped(InOrderSFTTrainer)(model=AutoModelForImageTextToText.from_pretrained(checkpoint),
                                      args=args(tmp_path / "plain"), train_dataset=dataset.select(order),
                                      processing_class=processor)
    plain.train()
    assert len(hsm.step_losses) == accumulation
    assert_same_step(plain, hsm)
