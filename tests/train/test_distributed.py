"""Two real processes under torchrun (gloo, CPU) through the real Trainer, DDP and DeepSpeed ZeRO-2.

One uninterrupted mining run per launcher is the reference for three questions:
- its epoch 0 equals a run with mining off step for step (loss and grad norm), DDP
  without and ZeRO-2 with gradient accumulation 2: mining never rescales the loss on N ranks;
- every slot of the global schedule is logged once and both ranks hold the same plans;
- a run resumed from a mid-epoch checkpoint trains on the same batches and writes
  the same plans as the uninterrupted run, and no earlier plan changes.

Every run of this file but the README's command shares two launches (``tests/dist_runs.py``): the
uninterrupted, mining-off and per-node runs, DDP before ZeRO-2, then both resumed runs. A launch's
imports and rendezvous cost more than one of these tiny runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hsm.config_load import load_config
from hsm.mining.plan import DatasetInfo, load_plan
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.data.schedule import build_schedule

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# 16 target + 2 x 4 source slots = 24 per epoch; 2 ranks x 4 per micro-batch = 3 micro-batches per rank.
N_TARGET, N_SOURCE = 16, 8
LAUNCHES = {
    # launcher: (extra overrides, gradient accumulation, optimizer steps per epoch, mid-epoch checkpoint)
    "ddp": ([], 1, 3, 8),
    "zero2": (["deepspeed=configs/deepspeed_zero2.json"], 2, 2, 5),
}


def launch(corpus: Path, *runs: tuple) -> None:
    """``tests/dist_train.py CORPUS OUT EXTRA...`` for each ``(OUT, EXTRA)`` of ``runs``, in order, in one launch
    (``(OUT, EXTRA, SCRIPT)`` runs ``SCRIPT`` instead)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # DeepSpeed's JIT op, built once
    argv = [arg for i, (out, extra, *script) in enumerate(runs)
            for arg in (*(["--"] if i else []), *script, str(corpus), str(out), *extra)]
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "tests/dist_runs.py", "tests/dist_train.py", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=300 * len(runs), env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def rank_reports(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def step_logs(report: dict) -> list[list[float]]:
    return [[h["loss"], h["grad_norm"]] for h in report["log_history"] if "loss" in h and "grad_norm" in h]


def events(run: Path, epoch: int | None = None) -> list[dict]:
    pattern = f"epoch={epoch}/rank=*/part-*.parquet" if epoch is not None else "epoch=*/rank=*/part-*.parquet"
    parts = sorted((run / "hsm" / "events").glob(pattern))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist() if parts else []


def plan_files(run: Path) -> dict[int, bytes]:
    return {int(p.parent.name.split("=")[1]): p.read_bytes() for p in (run / "hsm" / "plans").glob("epoch=*/plan.parquet")}


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(N_TARGET, N_SOURCE, 2)["bbu"].parents[1]  # the corpus root dist_train.py reads


def common_overrides(launcher: str) -> list[str]:
    extra, accumulation, _, _ = LAUNCHES[launcher]
    return [*extra, f"training.gradient_accumulation_steps={accumulation}"]


def prepare_resume(straight: Path, resumed: Path, launcher: str) -> dict[int, bytes]:
    """Copy ``straight`` to ``resumed`` as if the run had died right after saving its mid-epoch checkpoint: what it
    wrote after the checkpoint removed. Returns the plans the copy keeps."""
    _, _, steps_per_epoch, checkpoint = LAUNCHES[launcher]
    shutil.copytree(straight, resumed)
    epoch_of_checkpoint = checkpoint // steps_per_epoch
    assert checkpoint % steps_per_epoch, "the checkpoint must be mid-epoch"
    for part in (resumed / "hsm" / "events").rglob("part-*.parquet"):
        steps = pq.read_table(part, columns=["global_step"]).column("global_step").to_pylist()
        assert min(steps) >= checkpoint or max(steps) < checkpoint, "events are flushed at every checkpoint"
        if min(steps) >= checkpoint:  # never written: neither the part nor its ledger entry
            part.unlink()
            ledger = part.with_name("_sha256.json")
            ledger.write_text(json.dumps({k: v for k, v in json.loads(ledger.read_text()).items() if k != part.name}))
    for epoch in range(epoch_of_checkpoint + 1, 4):
        shutil.rmtree(resumed / "hsm" / "plans" / f"epoch={epoch}")
    for epoch in range(epoch_of_checkpoint, 3):
        shutil.rmtree(resumed / "hsm" / "state" / f"epoch={epoch}", ignore_errors=True)
    return plan_files(resumed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict:
    """Every run the tests below read, in two launches: per launcher an uninterrupted 3-epoch run with a mid-epoch
    checkpoint, a 1-epoch run with mining off, and (second launch) the run resumed from that checkpoint; and a
    2-epoch run whose ranks write to their own directories (``node{rank}``)."""
    root = tmp_path_factory.mktemp("distributed")
    first, second, found = [], [], {"nodes": root / "nodes" / "node{rank}"}
    for launcher in LAUNCHES:  # DDP first: DeepSpeed's state stays in the process after its first run
        checkpoint, folder = LAUNCHES[launcher][3], root / launcher
        first += [(folder / "straight", [*common_overrides(launcher), "training.save_strategy=steps",
                                         f"training.save_steps={checkpoint}", "training.save_total_limit=null"]),
                  (folder / "off", [*common_overrides(launcher), "training.num_train_epochs=1",
                                    "custom.hard_sample_mining.enabled=false"])]
        if launcher == "ddp":
            first.append((found["nodes"], ["training.num_train_epochs=2"]))
            first.append((root / "session", [], "tests/dist_session.py"))  # a start-up failure on rank 0 alone
            for mining in ("false", "true"):  # one tapped optimizer step of 2 micro-batches per rank
                first.append((root / f"tap-{mining}", ["--tap", "training.max_steps=1", "training.max_grad_norm=0",
                                                      "training.gradient_accumulation_steps=2",
                                                      f"custom.hard_sample_mining.enabled={mining}"]))
        second.append((folder / "resumed", [*common_overrides(launcher), "training.save_strategy=no",
                                            f"training.resume_from_checkpoint={folder / 'resumed' / f'checkpoint-{checkpoint}'}"]))
        found[launcher] = {"straight": folder / "straight", "off": folder / "off", "resumed": folder / "resumed"}
    launch(corpus, *first)
    found["tap"] = {mining: root / f"tap-{mining}" for mining in ("false", "true")}
    found["session"] = root / "session"
    for launcher in LAUNCHES:
        found[launcher]["before"] = prepare_resume(found[launcher]["straight"], found[launcher]["resumed"], launcher)
    launch(corpus, *second)
    return found


def test_a_start_up_failure_on_rank_0_alone_stops_every_rank_naming_it(runs):
    """Rank 0 alone writes the run's files before step 0; when that fails, the other rank's start fails too, naming
    rank 0's error (``tests/dist_session.py``), rather than going on to wait at a gradient all-reduce under a
    launcher that does not tear the job down; the half-made run folder is removed."""
    rank0, rank1 = (json.loads((runs["session"] / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["error"].startswith("OSError: ") and "No space left on device" in rank0["error"]
    assert rank1["error"].startswith("RuntimeError: hsm: rank 0 failed before step 0")
    assert rank0["error"] in rank1["error"]
    assert not (runs["session"] / "run" / "hsm").exists()


def test_one_step_on_two_ranks_is_bit_identical_to_the_plain_run(runs):
    """One optimizer step of 2 micro-batches per rank under DDP: with mining on, every micro-batch's loss and every
    gradient after DDP's all-reduce ``torch.equal`` the plain run's (mining off), on each rank; and the two ranks
    hold the same gradients (the all-reduce ran over both ranks' different rows)."""
    import torch
    from safetensors.torch import load_file

    for rank in (0, 1):
        plain, mined = (load_file(str(runs["tap"][m] / f"rank{rank}.safetensors")) for m in ("false", "true"))
        assert plain.keys() == mined.keys() and sum(k.startswith("loss.") for k in plain) == 2
        assert sum(k.startswith("grad.") for k in plain) > 10
        differ = [k for k in plain if not torch.equal(plain[k], mined[k])]
        assert not differ, f"rank {rank}: {len(differ)} of {len(plain)} tensors differ, e.g. {differ[:3]}"
    ranks = [load_file(str(runs["tap"]["true"] / f"rank{r}.safetensors")) for r in (0, 1)]
    assert not all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0] if k.startswith("loss."))  # other rows
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0] if k.startswith("grad."))


@pytest.mark.parametrize("launcher", list(LAUNCHES))
def test_two_ranks_loss_logging_plans_and_mid_epoch_resume(runs, launcher):
    _, _, steps_per_epoch, checkpoint = LAUNCHES[launcher]
    straight, off = runs[launcher]["straight"], runs[launcher]["off"]

    # 1. Mining on equals mining off step for step while both see the same batches (epoch 0).
    on_logs, off_logs = step_logs(rank_reports(straight)[0]), step_logs(rank_reports(off)[0])
    assert len(off_logs) == steps_per_epoch and len(on_logs) == 3 * steps_per_epoch
    for on_step, off_step in zip(on_logs[:steps_per_epoch], off_logs):
        assert on_step == pytest.approx(off_step, rel=1e-4)

    # 2. Both ranks hold the same plans; every slot of the global schedule is logged once.
    ranks = rank_reports(straight)
    assert ranks[0]["expected"] == ranks[1]["expected"] and len(ranks[0]["expected"]) == 3
    assert all(r["backend"] == "gloo" for r in ranks)
    if launcher == "zero2":
        assert all(r["deepspeed"] and r["zero_stage"] == 2 for r in ranks)
    info = json.loads((straight / "hsm" / "dataset.json").read_text())
    target = DatasetInfo(info["target"]["name"], info["target"]["size"], info["target"]["fingerprint"])
    sizes, names = [d["size"] for d in info["datasets"]], [d["name"] for d in info["datasets"]]
    for epoch in range(3):
        logged_rows = events(straight, epoch)
        keys = Counter((e["global_step"], e["rank"], e["position"]) for e in logged_rows)
        assert max(keys.values()) == 1 and {e["rank"] for e in logged_rows} == {0, 1}
        plan = load_plan(straight / "hsm", epoch, dataset=target)
        schedule = build_schedule(plan if plan is not None and plan.triggered else None, n_target=sizes[0],
                                  source_sizes=sizes[1:], source_ratios=[0.25, 0.25], seed=0, epoch=epoch, batch_size=4)
        assert len(logged_rows) == len(schedule)  # 24 slots: 3 whole rounds of 2 x 4, no padding
        assert Counter((names[c], int(i)) for c, i in zip(schedule.dataset, schedule.base_idx)) == \
            Counter((e["dataset"], e["base_idx"]) for e in logged_rows)

    # 3. Resumed from a mid-epoch checkpoint, as if the run had died right after saving it (the fixture's
    # prepare_resume).
    resumed, before, epoch_of_checkpoint = runs[launcher]["resumed"], runs[launcher]["before"], checkpoint // steps_per_epoch
    after, reference = plan_files(resumed), plan_files(straight)
    assert all(after[e] == content for e, content in before.items())  # no earlier plan rewritten
    assert sorted(after) == sorted(reference) == [1, 2, 3]
    for epoch in (1, 2, 3):
        assert pq.read_table(resumed / "hsm" / "plans" / f"epoch={epoch}" / "plan.parquet").drop_columns(["score"]) == \
            pq.read_table(straight / "hsm" / "plans" / f"epoch={epoch}" / "plan.parquet").drop_columns(["score"]), epoch
    # The new attempt trained on exactly the batches the uninterrupted run had after the checkpoint.
    again = sorted((e["epoch"], e["global_step"], e["rank"], e["position"], e["sample_id"])
                   for e in events(resumed) if e["attempt"] == 1)
    first = sorted((e["epoch"], e["global_step"], e["rank"], e["position"], e["sample_id"])
                   for e in events(straight) if e["global_step"] >= checkpoint)
    assert again == first and again[0][0] == epoch_of_checkpoint


def test_ranks_without_a_shared_file_system_plan_from_every_rank(tmp_path, runs):
    # Each rank has its own output directory, as nodes without a shared disk do.
    nodes = runs["nodes"].parent
    node0, node1 = nodes / "node0", nodes / "node1"
    shipped = sorted(p.relative_to(node0) for p in (node0 / "hsm" / "events").glob("epoch=*/rank=1/part-*.parquet"))
    own = sorted(p.relative_to(node1) for p in (node1 / "hsm" / "events").glob("epoch=*/rank=1/part-*.parquet"))
    assert shipped == own and shipped  # rank 1's parts reached rank 0's disk
    for path in own:
        assert (node0 / path).read_bytes() == (node1 / path).read_bytes()
        # The shipped part is recorded in rank 0's copy of rank 1's ledger, with rank 1's own digest.
        ledger0 = json.loads((node0 / path).with_name("_sha256.json").read_text())
        ledger1 = json.loads((node1 / path).with_name("_sha256.json").read_text())
        assert ledger0[path.name] == ledger1[path.name] == hashlib.sha256((node1 / path).read_bytes()).hexdigest()
    assert plan_files(node0) == plan_files(node1)  # the plan travelled back
    # The plans are those of the union of both ranks' logs, planned offline.
    union = tmp_path / "union" / "hsm"
    shutil.copytree(node0 / "hsm" / "events", union / "events", ignore=shutil.ignore_patterns("rank=1"))
    for rank_dir in (node1 / "hsm" / "events").glob("epoch=*/rank=1"):
        shutil.copytree(rank_dir, union / "events" / rank_dir.parent.name / "rank=1")
    cfg = load_config(node0 / "hsm" / "config.yaml")
    for epoch in (1, 2):
        offline = plan_epoch(PlanRequest(union, epoch, cfg.mining, "bbu", num_train_epochs=2))
        assert offline.plan.to_pylist() == pq.read_table(node0 / "hsm" / "plans" / f"epoch={epoch}" / "plan.parquet").to_pylist()
    logged = {(e["global_step"], e["rank"], e["position"]) for e in events(node0)}
    assert {r for _, r, _ in logged} == {0, 1} and len(logged) == 2 * 24


def test_readme_torchrun_command_trains_and_ends_on_every_rank(tmp_path, corpus):
    """The README's multi-GPU line (`torchrun ... -m hsm.cli.app train cfg.yaml`), 2 ranks on gloo: both ranks
    exit 0 after tearing the process group down together, and only rank 0 prints the summary."""
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    done = subprocess.run([
        str(torchrun), "--nproc_per_node", "2", "-m", "hsm.cli.app", "train", "configs/demo.yaml",
        f"custom.fusion_config.target.train_jsonl={corpus}/bbu/train.jsonl", "custom.fusion_config.target.val_jsonl=null",
        f"custom.fusion_config.sources.0.train_jsonl={corpus}/lvis/train.jsonl",
        f"custom.fusion_config.sources.1.train_jsonl={corpus}/coco/train.jsonl", f"training.output_dir={out}",
        "training.num_train_epochs=2", "training.per_device_train_batch_size=4", "training.save_strategy='no'",
        "training.report_to=[]"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("hsm train done") == 1, done.stdout[-2000:]
    assert "terminate called" not in done.stderr
    assert {e["rank"] for e in events(out)} == {0, 1} and (out / "hsm" / "plans" / "epoch=1" / "plan.parquet").is_file()
