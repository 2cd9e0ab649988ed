"""hsm inside ms-swift: the real ``swift sft`` CLI on the tiny Qwen3-VL and the synthetic corpus (``make test-swift``).

Runs only where ms-swift is installed (``.venv-swift``); ``make test`` skips it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("swift")

from hsm.integrations.swift import plugin_path, write_grounding_jsonl  # noqa: E402
from hsm.train.model import build_checkpoint  # noqa: E402
from hsm.data.synth import synthesize  # noqa: E402
from lock_holder import lock_held  # noqa: E402
from wholerun import replan_and_report  # noqa: E402

pytestmark = pytest.mark.slow

TEMPLATE_PLUGIN = Path(__file__).parent / "swift_plugins" / "tiny_qwen3_vl_template.py"
CPU_PADDING_FREE_PLUGIN = Path(__file__).parent / "swift_plugins" / "cpu_padding_free.py"
N_ROWS, BATCH = 8, 4


def swift_dataset(jsonl: Path, out: Path) -> Path:
    """hsm detection JSONL -> ms-swift's grounding JSONL (what a user already has): even rows with the answer as
    ``bbox_2d`` JSON text, odd rows in ms-swift's ``objects`` format (``<ref-object><bbox>`` placeholders)."""
    write_grounding_jsonl(jsonl, out, formats=("bbox_2d", "objects"))
    return out


_ORACLE_SPANS = (  # (pattern, group holding the values, role): written apart from hsm's scanners
    (re.compile(r'"bbox_2d":\s*\[([^\]]*)\]'), 1, "coord"),
    (re.compile(r'"label":\s*"([^"]*)"'), 1, "label"),
    (re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>"), 1, "coord"),
    (re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>"), 1, "label"),
)


def oracle_roles(tokenizer, ids: list[int], positions: list[int]) -> dict[int, str]:
    """Role of each supervised position: decode token by token, mark value characters by regex on the text."""
    pieces = [tokenizer.decode([ids[t]]) for t in positions]
    text = "".join(pieces)
    char_role = [None] * len(text)
    for pattern, group, role in _ORACLE_SPANS:
        for match in pattern.finditer(text):
            for i in range(match.start(group), match.end(group)):
                if role == "label" or text[i].isdigit():
                    char_role[i] = role
    roles, at = {}, 0
    for t, piece in zip(positions, pieces):
        found = set(char_role[at:at + len(piece)])
        roles[t] = "coord" if "coord" in found else "label" if "label" in found else None
        at += len(piece)
    return roles


def recomputed_box_losses(checkpoint: Path, rows: list[dict]) -> list[dict]:
    """Per-sample losses of the untrained model, each row encoded alone by ms-swift's own template, in float64,
    over the supervised tokens up to the answer's `<|im_end|>` (ms-swift also supervises the newline after it)."""
    from swift.model import get_model_processor
    from swift.template import get_template

    spec = importlib.util.spec_from_file_location("hsm_tiny_template", TEMPLATE_PLUGIN)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    model, processor = get_model_processor(str(checkpoint), model_type="qwen3_vl", torch_dtype=torch.float32)
    template = get_template(processor, template_type="hsm_tiny_qwen3_vl")
    template.set_mode("train")
    template.model = model  # its collator computes Qwen's rope positions with the model
    out = []
    for row in rows:
        batch = template.data_collator([template.encode(row)])
        with torch.no_grad():
            logits = model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].double()
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        positions = [t for t in range(1, len(ids)) if labels[t] != -100]
        im_end = max(t for t in positions if ids[t] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        assert positions[-1] > im_end  # ms-swift supervises more than the answer
        positions = [t for t in positions if t <= im_end]
        nll = {t: -torch.log_softmax(logits[t - 1], -1)[labels[t]].item() for t in positions}
        roles = oracle_roles(processor.tokenizer, ids, positions)
        mean = {role: [nll[t] for t in positions if roles[t] == role] for role in ("coord", "label")}
        assert mean["coord"] and mean["label"], row
        out.append({"loss": sum(nll.values()) / len(nll), "loss_sum": sum(nll.values()), "n_tokens": len(nll),
                    "coord_loss": sum(mean["coord"]) / len(mean["coord"]),
                    "label_loss": sum(mean["label"]) / len(mean["label"])})
    return out


def run_swift_sft(tmp: Path, name: str, checkpoint: Path, data: list[str], *, mining: bool, epochs: int,
                  tuner: str = "full", save: str = "no", ranks: int = 1, flags: tuple[str, ...] = (),
                  plugins: tuple[Path, ...] = (), env: dict[str, str] | None = None,
                  config_text: str | None = None) -> subprocess.CompletedProcess:
    config = tmp / f"{name}.yaml"
    config.write_text(config_text or (
        "custom:\n"
        f"  hard_sample_mining: {{enabled: {str(mining).lower()}, mode: reweight, metric: loss, start_epoch: 1,"
        " selector: {mode: top_k, k: 2}, hard_weight: 3.0}\n"
        "  fusion_config: {target: {name: bbu}}\n"
    ))
    out = tmp / name
    command = [
        str(Path(sys.executable).parent / "swift"), "sft", "--model", str(checkpoint), "--model_type", "qwen3_vl",
        "--template", "hsm_tiny_qwen3_vl", "--dataset", *data, "--split_dataset_ratio", "0",
        "--tuner_type", tuner, "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(BATCH),
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--warmup_ratio", "0", "--logging_steps", "1", "--save_strategy", save, "--report_to", "none",
        "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--use_cpu", "true", "--check_model", "false",
        "--seed", "0", "--output_dir", str(out), "--dataset_shuffle", "false",
        *flags, "--external_plugins", str(plugin_path()), str(TEMPLATE_PLUGIN), *map(str, plugins),
    ]
    env = {**os.environ, **(env or {}), "HSM_CONFIG": str(config)}
    if ranks > 1:  # ms-swift's own launcher: it re-runs itself under torchrun
        env.update(NPROC_PER_NODE=str(ranks), MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def swift_sft(tmp: Path, name: str, checkpoint: Path, data: list[str], **kwargs) -> Path:
    """:func:`run_swift_sft`, which must succeed; its run directory."""
    result = run_swift_sft(tmp, name, checkpoint, data, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (run_dir,) = (tmp / name).glob("v*-*")
    return run_dir


def step_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_provenance_from_ms_swift_loader(tmp_path):
    """ms-swift's own loader on `target.jsonl src.jsonl#3`: the target's rows and each source's drawn rows."""
    from swift.dataset import load_dataset

    from hsm.integrations.swift import provenance

    corpus = synthesize(tmp_path / "corpus", n_target=5, n_source=6, n_val=1)
    target, source = swift_dataset(corpus["bbu"], tmp_path / "bbu.jsonl"), swift_dataset(corpus["lvis"], tmp_path / "src.jsonl")
    train, _ = load_dataset([str(target), f"{source}#3"], shuffle=True, seed=0)
    target_rows, sources = provenance(train, "bbu")
    assert len(target_rows) == 5 and [(s.name, len(s.rows)) for s in sources] == [("src", 3)]
    texts = {json.dumps(json.loads(line)["messages"]) for line in target.read_text().splitlines()}
    assert {json.dumps(train[i]["messages"]) for i in target_rows} == texts  # exactly the target file's rows
    assert set(target_rows).isdisjoint(sources[0].rows) and sorted([*target_rows, *sources[0].rows]) == list(range(8))
    assert provenance(train, str(target))[0] == target_rows  # the entry's path names it too
    with pytest.raises(ValueError, match="must name exactly one --dataset entry"):
        provenance(train, "coco")


@pytest.fixture(scope="module")
def mined_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(checkpoint, data, run_dir)``: `swift sft` with the hsm plugin, mining on, 2 epochs of N_ROWS rows in
    batches of BATCH (padded batches), shared by the tests that compare against it."""
    tmp_path = tmp_path_factory.mktemp("mined")
    checkpoint = build_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    corpus = synthesize(tmp_path / "corpus", n_target=N_ROWS, n_source=1, n_val=1)
    data = swift_dataset(corpus["bbu"], tmp_path / "train.jsonl")
    # One --dataset entry: the target, whatever its file name.
    return checkpoint, data, swift_sft(tmp_path, "mined", checkpoint, [str(data)], mining=True, epochs=2)


def test_swift_sft_with_hsm_plugin(tmp_path, mined_run):
    checkpoint, data, mined = mined_run
    entries = [str(data)]
    hsm_dir = mined / "hsm"
    events = pa.concat_tables([pq.read_table(p) for p in sorted(hsm_dir.glob("events/epoch=*/rank=0/*.parquet"))])
    epoch0 = events.filter(pc.equal(events.column("epoch"), 0))
    assert sorted(epoch0.column("base_idx").to_pylist()) == list(range(N_ROWS))  # every row once in epoch 0
    assert set(epoch0.column("dataset").to_pylist()) == {"bbu"}
    # Box-aware signals from the same pass, for both answer formats: step 0 ran the untrained weights.
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    first = epoch0.filter(pc.equal(epoch0.column("global_step"), 0)).to_pylist()
    assert {e["base_idx"] % 2 for e in first} == {0, 1}  # JSON rows and objects rows
    for event, oracle in zip(first, recomputed_box_losses(checkpoint, [rows[e["base_idx"]] for e in first])):
        assert event["n_tokens"] == oracle["n_tokens"]
        for key in ("loss", "loss_sum", "coord_loss", "label_loss"):
            assert event[key] == pytest.approx(oracle[key], rel=1e-4, abs=1e-5), (key, event["base_idx"])
    plan = pq.read_table(hsm_dir / "plans" / "epoch=1" / "plan.parquet").to_pylist()
    hard = {r["base_idx"] for r in plan if r["is_hard"]}
    # The plan's hard set is the 2 rows with the highest epoch-0 loss (score = mean of one observation).
    by_loss = sorted(epoch0.to_pylist(), key=lambda e: -e["loss"])
    assert hard == {e["base_idx"] for e in by_loss[:2]}
    # Epoch-1 target draws follow the plan: hard rows drawn as hard, more often than any regular row.
    epoch1 = events.filter(pc.equal(events.column("epoch"), 1)).to_pylist()
    assert epoch1 and all(e["drawn_as_hard"] == (e["base_idx"] in hard) for e in epoch1)
    counts = {i: sum(e["base_idx"] == i for e in epoch1) for i in range(N_ROWS)}
    assert min(counts[i] for i in hard) > max(counts[i] for i in range(N_ROWS) if i not in hard)

    # ms-swift's logged loss with hsm's events on equals the run with mining disabled, step for step in epoch 0.
    plain = swift_sft(tmp_path, "plain", checkpoint, entries, mining=False, epochs=1)
    assert not (plain / "hsm" / "events").exists()
    steps_per_epoch = N_ROWS // BATCH
    mined_losses, plain_losses = step_losses(mined), step_losses(plain)
    assert len(plain_losses) == steps_per_epoch
    assert mined_losses[:steps_per_epoch] == pytest.approx(plain_losses, rel=1e-6)


def epoch_events(run_dir: Path, epoch: int) -> dict[tuple[int, str], dict]:
    """One run's events of ``epoch``, by (global_step, sample_id)."""
    parts = sorted((run_dir / "hsm").glob(f"events/epoch={epoch}/*/*.parquet"))
    events = pa.concat_tables([pq.read_table(p) for p in parts])
    return {(e["global_step"], e["sample_id"]): e for e in events.to_pylist()}


def test_swift_sft_padding_free_events_equal_a_padded_run(tmp_path, mined_run):
    """`--padding_free true` (each batch one flattened row): one event per sample, equal to the padded run's epoch 0
    (same samples, steps and weights) to 1e-4; `--packing true` is refused at start-up, naming the flag."""
    checkpoint, data, padded = mined_run
    log = tmp_path / "packed.log"
    free = swift_sft(tmp_path, "free", checkpoint, [str(data)], mining=True, epochs=1, flags=("--padding_free", "true"),
                     plugins=(CPU_PADDING_FREE_PLUGIN,), env={"HSM_TEST_PACKED_LOG": str(log)})
    assert set(log.read_text().split()) == {str(BATCH)}  # every batch was one row of BATCH sequences
    want, got = epoch_events(padded, 0), epoch_events(free, 0)
    assert len(want) == N_ROWS and got.keys() == want.keys()  # the same samples at the same steps
    for key, event in got.items():
        for column in ("loss", "token_acc", "coord_loss", "label_loss", "loss_sum"):
            assert event[column] == pytest.approx(want[key][column], rel=1e-4, abs=1e-5), (column, key)
        assert (event["n_tokens"], event["position"], event["base_idx"]) == (
            want[key]["n_tokens"], want[key]["position"], want[key]["base_idx"])
    steps = N_ROWS // BATCH
    assert step_losses(free) == pytest.approx(step_losses(padded)[:steps], rel=1e-4)  # ms-swift's own loss

    packed = run_swift_sft(tmp_path, "packed", checkpoint, [str(data)], mining=True, epochs=1,
                           flags=("--packing", "true"), plugins=(CPU_PADDING_FREE_PLUGIN,))
    assert packed.returncode != 0 and "swift sft --packing true: ms-swift bins rows into fixed packs" in packed.stderr


def test_swift_run_is_a_whole_run_for_plan_report_and_sql(tmp_path, mined_run):
    """`hsm plan`, `hsm report` and `hsm sql` on a `swift sft` run with no flags: the config is hsm.yaml resolved,
    the plan equals training's, and each base_idx (a position in ms-swift's train set) shows its own image and boxes."""
    import shutil

    from typer.testing import CliRunner

    from hsm.cli.app import app
    from hsm.config_load import load_config
    from hsm.data.records import read_jsonl
    from hsm.report.data import read_sample_records

    _, data, mined = mined_run
    run = tmp_path / "run"
    shutil.copytree(mined, run)
    config = load_config(run / "hsm" / "config.yaml")
    assert config.mining.selector.k == 2 and config.mining.hard_weight == 3.0 and config.target_name == "bbu"
    html = replan_and_report(run, 2)
    runner = CliRunner()
    assert html.count("data:image/jpeg") >= 2 * N_ROWS
    records = {r.image: r for r in read_jsonl(data.parent / "corpus" / "bbu" / "train.jsonl")}
    shown = read_sample_records(run / "hsm")
    assert len(shown) == N_ROWS and {shown[i].image for i in range(N_ROWS)} == set(records)
    for base_idx in range(N_ROWS):  # JSON answers (0-1000) and objects rows (pixels) alike
        got = shown[base_idx]
        want = records[got.image]
        assert [o.label for o in got.objects] == [o.label for o in want.objects]
        for mine, theirs in zip(got.objects, want.objects):
            assert mine.bbox == pytest.approx(theirs.bbox, abs=want.width / 1000 + 0.5)
    queried = runner.invoke(app, ["sql", "--run-dir", str(run), "dataset_breakdown"])
    assert queried.exit_code == 0 and "bbu" in queried.output, queried.output


_MINING = "custom:\n  hard_sample_mining: {enabled: true, %s}\n  fusion_config: {target: {name: bbu}}\n"


@pytest.mark.parametrize(("flags", "message"), [
    ({"streaming": True, "max_steps": 2}, "swift sft --streaming true: ms-swift then reads the dataset as an IterableDataset"),
    ({"packing": True}, "swift sft --packing true: ms-swift bins rows into fixed packs"),
], ids=["streaming", "packing"])
def test_swift_arguments_refuse_streaming_and_packing(tmp_path, monkeypatch, flags, message):
    """ms-swift's own argument parsing with the hsm plugin: refused there, before ms-swift's flash-attention check
    (`--packing` on a CPU) and long before the model and data load (no traceback from inside training)."""
    from swift.arguments import SftArguments

    config = tmp_path / "hsm.yaml"
    config.write_text(_MINING % "metric: loss")
    monkeypatch.setenv("HSM_CONFIG", str(config))
    checkpoint = build_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    with pytest.raises(ValueError, match=re.escape(message)):
        SftArguments(model=str(checkpoint), model_type="qwen3_vl", dataset=[str(tmp_path / "train.jsonl")],
                     use_cpu=True, output_dir=str(tmp_path / "out"), report_to=["none"],
                     external_plugins=[str(plugin_path())], **flags)


def test_swift_plugin_refuses_det_f1(tmp_path, monkeypatch):
    from hsm.config import ConfigError
    from hsm.integrations.swift import register

    config = tmp_path / "hsm.yaml"
    config.write_text(_MINING % "metric: det_f1")
    monkeypatch.setenv("HSM_CONFIG", str(config))
    with pytest.raises(ConfigError, match="metric: 'det_f1' is measured by hsm train's own generation pass, which ms-swift"):
        register()


def test_swift_sft_reports_a_bad_hsm_config_before_loading_the_model(tmp_path):
    """The hsm config is checked when ms-swift imports the plugin: a mistake names its key even though the model
    path does not exist (ms-swift has not looked at it yet)."""
    corpus = synthesize(tmp_path / "corpus", n_target=4, n_source=1, n_val=1)
    data = swift_dataset(corpus["bbu"], tmp_path / "train.jsonl")
    done = run_swift_sft(tmp_path, "refused", tmp_path / "no-such-model", [str(data)], mining=True, epochs=1,
                         config_text=_MINING % "selector: {mode: top_k, k: -1}")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "custom.hard_sample_mining.selector.k" in output, output[-3000:]


def test_swift_sft_refuses_a_folder_that_holds_an_hsm_run(tmp_path, mined_run):
    """A fresh `swift sft` into a folder holding an hsm run (`--add_version false` reuses it) is refused while
    ms-swift checks its arguments (before the model loads), naming the folder and the opt-in; the old run stays
    as it was and ms-swift writes nothing there."""
    import shutil

    checkpoint, data, mined = mined_run
    used = tmp_path / "used"
    shutil.copytree(mined / "hsm", used / "hsm")
    before = {p: p.read_bytes() for p in sorted((used / "hsm").rglob("*")) if p.is_file() and p.name != ".lock"}
    done = run_swift_sft(tmp_path, "used", checkpoint, [str(data)], mining=True, epochs=1,
                         flags=("--add_version", "false"))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert f"{used / 'hsm'}: already holds an hsm run" in output and "overwrite_output_dir: true in HSM_CONFIG" in output
    assert {p: p.read_bytes() for p in sorted((used / "hsm").rglob("*")) if p.is_file() and p.name != ".lock"} == before
    assert not (used / "logging.jsonl").exists() or not step_losses(used)  # no step ran
    assert not (used / "args.json").exists()  # refused while ms-swift checked its arguments: before it wrote any


def test_swift_sft_refuses_a_folder_another_training_holds_and_names_a_truncated_image(tmp_path, mined_run):
    """Two start-up refusals of `swift sft`, each before step 0 with nothing written: a run whose lock another
    process holds (a training or `hsm plan` on it), and a training row whose image is cut in half (named with
    its path, before any step spends compute on the rows that decode)."""
    checkpoint, data, _ = mined_run
    held = tmp_path / "held"
    lock = held / "hsm" / ".lock"
    lock.parent.mkdir(parents=True)
    with lock_held(lock):
        done = run_swift_sft(tmp_path, "held", checkpoint, [str(data)], mining=True, epochs=1,
                             flags=("--add_version", "false"))
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and "another hsm plan or training is writing this run" in output, output[-3000:]
    assert [p.name for p in lock.parent.iterdir()] == [".lock"]
    assert sorted(p.name for p in held.iterdir()) == ["hsm"]  # refused before the model loaded or args.json

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    image = Path(rows[2]["images"][0])
    cut = tmp_path / f"cut{image.suffix}"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    rows[2]["images"] = [str(cut)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = run_swift_sft(tmp_path, "cut", checkpoint, [str(bad)], mining=True, epochs=1)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and f"image {cut} cannot be decoded" in output, output[-3000:]
    assert f"--dataset {bad} row 2: image {cut}" in output  # the entry and the row (the file's line order here)
    assert not list((tmp_path / "cut").glob("v*-*/hsm"))
    assert not any(step_losses(run) for run in (tmp_path / "cut").glob("v*-*") if (run / "logging.jsonl").exists())


def test_fingerprint_under_ms_swift_follows_its_shuffle(tmp_path):
    """Positional ids over ms-swift's train set: `--dataset_shuffle true` puts other rows at the same positions, so
    the fingerprint changes; the same load gives the same fingerprint."""
    from swift.dataset import load_dataset

    from hsm.integrations.slots import SlotDataset, row_contents

    corpus = synthesize(tmp_path / "corpus", n_target=12, n_source=1, n_val=1)
    data = swift_dataset(corpus["bbu"], tmp_path / "train.jsonl")

    def fingerprint(shuffle: bool) -> str:
        train, _ = load_dataset([str(data)], shuffle=shuffle, seed=0)
        ids = [f"bbu:{i}" for i in range(len(train))]
        return SlotDataset(train, "bbu", ids, target_contents=row_contents(train)).info.fingerprint

    assert fingerprint(False) == fingerprint(False)
    assert fingerprint(True) != fingerprint(False)


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_hsm_eval_run_reads_swift_checkpoints(tmp_path, tuner):
    """`hsm eval run` on the checkpoint folder `swift sft` wrote (full weights, or its LoRA adapter folder):
    the weights evaluated are ms-swift's trained ones (LoRA merged as W + B A * alpha / r, by hand here)."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    from typer.testing import CliRunner

    from hsm.cli.app import app
    from hsm.config_load import load_config
    from hsm.eval.generation import load_checkpoint

    base = build_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    corpus = synthesize(tmp_path / "corpus", n_target=N_ROWS, n_source=1, n_val=2)
    data = swift_dataset(corpus["bbu"], tmp_path / "train.jsonl")
    run_dir = swift_sft(tmp_path, tuner, base, [str(data)], mining=False, epochs=1, tuner=tuner, save="epoch")
    (checkpoint,) = run_dir.glob("checkpoint-*")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(base)},
        "custom": {"fusion_config": {"target": {"name": "bbu", "train_jsonl": str(corpus["bbu"]),
                                                "val_jsonl": str(corpus["bbu"].with_name("val.jsonl"))},
                                     "domain_prompts": {"target": {"system": "You are a detection assistant.",
                                                                   "user": "Detect all objects."}}}}}))
    loaded, _ = load_checkpoint(load_config(config).model, checkpoint)
    got = loaded.state_dict()
    base_weights = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    if tuner == "full":
        want = AutoModelForImageTextToText.from_pretrained(checkpoint).state_dict()
    else:
        adapter = json.loads((checkpoint / "adapter_config.json").read_text())
        scale = adapter["lora_alpha"] / adapter["r"]
        tensors = load_file(checkpoint / "adapter_model.safetensors")
        want = dict(base_weights)
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
            target = next(k for k in want if k.endswith(name))
            want[target] = want[target] + (b @ a) * scale
        assert any(not torch.equal(want[k], base_weights[k]) for k in want)  # the adapters changed something
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    assert not all(torch.equal(got[k], base_weights[k]) for k in got)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "run", str(config), "--checkpoint", str(checkpoint), "--out", str(out),
                                      "--max-new-tokens", "16", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert len((out / "bbu" / "answers.jsonl").read_text().splitlines()) == 2


def test_swift_sft_on_two_ranks(tmp_path):
    """`swift sft` with NPROC_PER_NODE=2 (gloo on CPU): events from both ranks, one plan, epoch-1 draws follow it,
    and the loss with mining on equals mining off step for step in epoch 0; the first optimizer step is
    bit-identical on each rank (every loss and every all-reduced gradient ``torch.equal``; hsm's loss hook against
    the model's own loss)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    n_rows = 16
    checkpoint = build_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    corpus = synthesize(tmp_path / "corpus", n_target=n_rows, n_source=1, n_val=1)
    data = swift_dataset(corpus["bbu"], tmp_path / "train.jsonl")
    tap = str(tmp_path / "step-{mining}-{rank}.safetensors")
    mined = swift_sft(tmp_path, "mined", checkpoint, [str(data)], mining=True, epochs=2, ranks=2,
                      plugins=(STEP_TAP_PLUGIN,), env={"HSM_TEST_STEP_TAP": tap.replace("{mining}", "on")})
    events = pa.concat_tables([pq.read_table(p) for p in sorted((mined / "hsm").glob("events/epoch=*/rank=*/*.parquet"))])
    assert set(events.column("rank").to_pylist()) == {0, 1}
    epoch0 = events.filter(pc.equal(events.column("epoch"), 0)).to_pylist()
    assert sorted(e["base_idx"] for e in epoch0) == list(range(n_rows))  # each row once, across the two ranks
    per_step = {}
    for e in epoch0:
        per_step.setdefault(e["global_step"], set()).add(e["rank"])
    assert all(ranks == {0, 1} for ranks in per_step.values())  # every step trained on both ranks
    plans = sorted(p.parent.name for p in (mined / "hsm" / "plans").glob("epoch=*/plan.parquet"))
    assert plans == ["epoch=1", "epoch=2"]  # one plan per epoch end, written once (rank 0), on the shared disk
    plan = pq.read_table(mined / "hsm" / "plans" / "epoch=1" / "plan.parquet").to_pylist()
    hard = {r["base_idx"] for r in plan if r["is_hard"]}
    by_loss = sorted(epoch0, key=lambda e: -e["loss"])
    assert hard == {e["base_idx"] for e in by_loss[:2]}  # top_k 2 over both ranks' events
    epoch1 = events.filter(pc.equal(events.column("epoch"), 1)).to_pylist()
    assert epoch1 and all(e["drawn_as_hard"] == (e["base_idx"] in hard) for e in epoch1)
    assert {e["rank"] for e in epoch1} == {0, 1}
    plain = swift_sft(tmp_path, "plain", checkpoint, [str(data)], mining=False, epochs=1, ranks=2,
                      plugins=(STEP_TAP_PLUGIN,), env={"HSM_TEST_STEP_TAP": tap.replace("{mining}", "off")})
    steps = n_rows // (2 * BATCH)
    assert step_losses(plain) == pytest.approx(step_losses(mined)[:steps], rel=1e-6)
    assert len(step_losses(plain)) == steps
    for rank in (0, 1):
        on, off = (tap.replace("{mining}", m).replace("{rank}", str(rank)) for m in ("on", "off"))
        assert safe_open(on, "pt").metadata()["compute_loss_func"] == "HsmSwiftLoss"
        step_on, step_off = load_file(on), load_file(off)
        assert step_on.keys() == step_off.keys() and sum(k.startswith("grad.") for k in step_on) > 10
        differ = [k for k in step_on if not torch.equal(step_on[k], step_off[k])]
        assert not differ, f"rank {rank}: {len(differ)} of {len(step_on)} differ, e.g. {differ[:3]}"


STEP_TAP_PLUGIN = Path(__file__).parent / "swift_plugins" / "step_tap.py"


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_step_with_hsms_loss_hook_is_bit_identical_to_plain_swift(tmp_path, mined_run, accumulation, padding_free):
    """hsm's loss (``--loss_type hsm``, selected by the plugin) against plain ms-swift (mining off: the model's own
    loss): after one optimizer step every micro-batch loss and every parameter's gradient ``torch.equal``."""
    from safetensors.torch import load_file

    checkpoint, data, _ = mined_run
    flags = ("--max_steps", "1", "--max_grad_norm", "0", "--gradient_accumulation_steps", str(accumulation))
    plugins: tuple[Path, ...] = (STEP_TAP_PLUGIN,)
    if padding_free:
        flags, plugins = (*flags, "--padding_free", "true"), (*plugins, CPU_PADDING_FREE_PLUGIN)
    taps = {}
    for mining in (False, True):
        taps[mining] = tmp_path / f"step-{mining}.safetensors"
        swift_sft(tmp_path, f"run-{mining}", checkpoint, [str(data)], mining=mining, epochs=1, flags=flags,
                  plugins=plugins, env={"HSM_TEST_STEP_TAP": str(taps[mining])})
    from safetensors import safe_open

    hooks = {mining: safe_open(str(path), "pt").metadata()["compute_loss_func"] for mining, path in taps.items()}
    assert hooks == {False: "NoneType", True: "HsmSwiftLoss"}  # plain: the model's own loss; hsm: its loss hook
    plain, hsm = load_file(taps[False]), load_file(taps[True])
    assert plain.keys() == hsm.keys()
    assert sum(key.startswith("loss.") for key in plain) == accumulation
    assert sum(key.startswith("grad.") for key in plain) > 10
    differ = [key for key in plain if not torch.equal(plain[key], hsm[key])]
    assert not differ, f"{len(differ)} of {len(plain)} differ, e.g. {differ[:3]}"
    events = pa.concat_tables([pq.read_table(p) for p in (tmp_path / "run-True").glob("v*-*/hsm/events/*/*/*.parquet")])
    assert events.num_rows == BATCH * accumulation  # the statistics came from the same step


def test_loss_plan_says_when_hsm_keeps_the_users_loss():
    """hsm owns the loss only where it can mirror plain ms-swift; otherwise it keeps the user's and says why."""
    from types import SimpleNamespace

    from transformers.loss.loss_utils import ForCausalLMLoss

    from hsm.integrations.swift import LOSS_TYPE, _loss_plan

    causal = SimpleNamespace(loss_function=ForCausalLMLoss)
    plain = SimpleNamespace(use_liger_kernel=False, loss_type=None)
    assert _loss_plan(plain, causal) == (True, None)
    assert _loss_plan(SimpleNamespace(use_liger_kernel=False, loss_type=LOSS_TYPE), causal) == (True, None)
    owns, note = _loss_plan(SimpleNamespace(use_liger_kernel=True, loss_type=None), causal)
    assert not owns and note.startswith("--use_liger_kernel")
    owns, note = _loss_plan(SimpleNamespace(use_liger_kernel=False, loss_type="cross_entropy"), causal)
    assert not owns and "--loss_type cross_entropy: hsm keeps that loss" in note
    owns, note = _loss_plan(plain, SimpleNamespace(loss_function=lambda **kwargs: None))
    assert not owns and "not transformers' ForCausalLMLoss" in note
