"""The CLI through typer's CliRunner, and once as the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from eventlog import TARGET, random_rows, write_rows
from hsm.cli.app import app
from hsm.mining.queries import shipped_queries

runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path):
    rows = random_rows(np.random.default_rng(1), n_target=20, n_epochs=3, n_ranks=2, max_obs=2)
    write_rows(tmp_path / "hsm", rows)
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 5}}, "fusion_config": {"target": {"name": TARGET}}}}
    (tmp_path / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_plan_then_sql(run_dir):
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2"])
    assert result.exit_code == 0, result.output
    assert "folded epochs: 0, 1" in result.output
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3", "--engine", "duckdb"])
    assert result.exit_code == 0, result.output
    assert "churn vs epoch 2" in result.output
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", "SELECT epoch, count(*) FILTER (WHERE is_hard) AS h FROM plans GROUP BY 1 ORDER BY 1", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"epoch": 2, "h": 5}, {"epoch": 3, "h": 5}]


def test_every_shipped_query_runs_and_lists(run_dir):
    for epoch in (2, 3):
        assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", str(epoch)]).exit_code == 0
    listing = runner.invoke(app, ["sql", "--list"]).output
    for name in shipped_queries():
        assert name in listing
        result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), name, "--format", "csv"])
        assert result.exit_code == 0, (name, result.output)
        # header + at least one row; suspects may rightly be none (tests/test_report_suspects.py checks it)
        assert len(result.output.strip().splitlines()) >= (1 if name == "suspects" else 2), name


def test_churn_query_agrees_with_the_planner(run_dir):
    runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2"])
    out = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3"]).output
    churn = json.loads(runner.invoke(app, ["sql", "--run-dir", str(run_dir), "hard_set_churn", "--format", "json"]).output)
    last = churn[-1]
    assert f"kept {last['kept']}, added {last['added']}, removed {last['removed']}" in out


def test_planning_an_epoch_again_says_whether_the_stored_plan_changed(run_dir):
    """A re-plan of a planned epoch says it wrote the same plan (its bytes are the stored ones), and with --force
    over another plan, that it replaced it."""
    def plan(*extra: str) -> str:
        result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2", *extra])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    first = plan()
    assert "wrote" in first and "the same plan" not in first and "replaced" not in first
    stored = (run_dir / "hsm" / "plans" / "epoch=2" / "plan.parquet").read_bytes()
    assert "(the same plan as the one stored before)" in plan()
    assert (run_dir / "hsm" / "plans" / "epoch=2" / "plan.parquet").read_bytes() == stored
    config = run_dir / "hsm" / "config.yaml"
    config.write_text(config.read_text().replace("k: 5", "k: 7"))
    assert "(it replaced another plan)" in plan("--force")


def test_dry_run_does_not_write(run_dir):
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2", "--dry-run"])
    assert result.exit_code == 0 and "dry run" in result.output
    assert not (run_dir / "hsm" / "plans").exists() and not (run_dir / "hsm" / "state").exists()


def test_bad_inputs_exit_nonzero_with_a_message(run_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("custom:\n  hard_sample_mining:\n    enabled: true\n    selector: {k: -1}\n")
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2", "--config", str(bad)])
    assert result.exit_code == 2 and "custom.hard_sample_mining.selector.k" in result.output
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2", "--engine", "spark"])
    assert result.exit_code == 2 and "--engine" in result.output
    part = next((run_dir / "hsm" / "events" / "epoch=0").rglob("part-*.parquet"))
    part.write_bytes(b"PAR1 broken")
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2"])
    assert result.exit_code == 2 and part.name in result.output and "--skip-corrupt" in result.output
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2", "--skip-corrupt"])
    assert result.exit_code == 0 and "skipped 1 corrupt" in result.output
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "no_such_query"])
    assert result.exit_code == 2 and "known:" in result.output
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "-e", "SELECT count(*) FROM events"])
    assert result.exit_code == 2 and part.name in result.output and "--skip-corrupt" in result.output
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "--skip-corrupt", "--format", "csv", "-e",
                                 "SELECT count(*) AS n FROM events"])
    # The damaged part is left out with a warning on stderr; stdout stays the CSV alone.
    assert result.exit_code == 0 and result.stdout.splitlines()[0] == "n" and part.name in result.stderr
    result = runner.invoke(app, ["sql", "--run-dir", str(run_dir), "--skip-corrupt", "-e", "SELECT nope FROM plans"])
    assert result.exit_code == 2 and "nope" in result.output


def test_installed_console_script(run_dir):
    exe = Path(sys.executable).parent / "hsm"
    script = str(exe) if exe.exists() else shutil.which("hsm")
    assert script, "the hsm console script is not installed"
    done = subprocess.run([script, "plan", "--run-dir", str(run_dir), "--epoch", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "hsm" / "plans" / "epoch=1" / "manifest.json").is_file()
    done = subprocess.run([script, "plan", "--run-dir", str(run_dir / "nowhere"), "--epoch", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no such run" in done.stderr
    # hsm plan must not pay for torch or transformers at start-up.
    probe = "import sys, hsm.cli.app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split() == ["False", "False"]


def test_train_rejects_bad_training_values_before_writing_anything(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "configs/demo.yaml", f"training.output_dir={out}", "training.learning_rate=fast",
                                 "training.num_train_epochs=two", "training.per_device_train_batch_size=eight",
                                 "training.seed=1.5"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "configs/demo.yaml" in text and "Traceback" not in text and result.exception is None or isinstance(result.exception, SystemExit)
    for key, value in (("learning_rate", "'fast'"), ("num_train_epochs", "'two'"), ("per_device_train_batch_size", "'eight'"),
                       ("seed", "1.5")):
        assert f"training.{key}: {value} is not a valid" in text, key
    assert not out.exists()


def test_train_reports_training_and_custom_problems_together(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "configs/demo.yaml", f"training.output_dir={out}",
                                 "training.per_device_train_batch_size=eight", "training.no_such_field=1",
                                 "custom.hard_sample_mining.ema_decay=7", "custom.fusion_config.sources.0.ratio=-1"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "invalid configuration (4 problem(s))" in text
    for key in ("training.per_device_train_batch_size: 'eight' is not a valid", "training.no_such_field: unknown",
                "custom.hard_sample_mining.ema_decay", "custom.fusion_config.sources.0.ratio"):
        assert key in text, key
    assert not out.exists()


def test_train_rejects_values_training_cannot_run_with_and_unwritable_output(tmp_path, make_corpus, demo_overrides):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "configs/demo.yaml", f"training.output_dir={out}", "training.per_device_train_batch_size=0",
                                 "training.gradient_accumulation_steps=0", "training.learning_rate=-1"])
    assert result.exit_code == 2 and not out.exists()
    text = " ".join(result.output.split())
    for problem in ("training.per_device_train_batch_size: 0 must be >= 1", "training.gradient_accumulation_steps: 0 must be >= 1",
                    "training.learning_rate: -1.0 must be >= 0"):
        assert problem in text
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["train", "configs/demo.yaml", f"training.output_dir={blocker}/run",
                                 *demo_overrides(make_corpus(4, 2, 1))])
    assert result.exit_code == 2, result.output
    assert "cannot write" in " ".join(result.output.split()) and "Traceback" not in result.output


def test_demo_refuses_to_clear_a_run_directory_that_is_not_an_hsm_run(tmp_path):
    """`hsm demo` starts fresh by removing its previous run, but never a directory hsm did not write."""
    keep = tmp_path / "run" / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not an hsm run" in result.output and keep.read_text() == "mine"
    assert not (tmp_path / "data").exists()  # refused before the corpus was written


def _tmpfs(path: Path, size_kib: int) -> bool:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("size_kib", [96, 1024])
def test_disk_full_during_train_is_a_clear_error_naming_the_file(tmp_path, size_kib, make_corpus, demo_overrides):
    """The output file system fills up mid-run (events, plan or checkpoint): exit 2, one message naming
    the file that could not be written, no traceback, no half-written plan published. A small corpus (3 steps an
    epoch) is enough: the first epoch-end checkpoint (~2.8 MB) outgrows either file system if nothing before it did."""
    corpus = make_corpus(8, 4, 0)
    mount = tmp_path / "full"
    if not _tmpfs(mount, size_kib):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hsm.cli.app", "train", "configs/demo.yaml", f"training.output_dir={mount}/run",
             *demo_overrides(corpus), "training.report_to=[]",
             "training.num_train_epochs=3"],
            capture_output=True, text=True, timeout=600)
        text = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2, text[-2000:]
        assert "Traceback" not in text and "No space left on device" in text and str(mount) in text
        plans = mount / "run" / "hsm" / "plans"
        if plans.is_dir():  # every published plan is whole: a manifest beside each plan, no staging left
            for folder in plans.iterdir():
                assert not folder.name.startswith("."), folder
                assert (folder / "plan.parquet").is_file() == (folder / "manifest.json").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_epoch_lists_in_messages_are_ranges(run_dir):
    """A plan asked for far past the log names the empty epochs as one range, not one number each."""
    result = runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "99"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "no events in epochs 3-98" in text and "4, 5" not in text
    assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "2"]).exit_code == 0
    assert runner.invoke(app, ["plan", "--run-dir", str(run_dir), "--epoch", "3"]).exit_code == 0
    report = runner.invoke(app, ["report", "--run-dir", str(run_dir), "--epoch", "99", "--out", str(run_dir / "r.html")])
    assert report.exit_code == 2 and "plans exist for epochs 2-3" in " ".join(report.output.split())


def test_epoch_ranges_expand_to_the_epochs():
    from hypothesis import given
    from hypothesis import strategies as st

    from hsm.mining.planner import epoch_ranges

    @given(st.lists(st.integers(0, 60), max_size=30))
    def check(epochs):
        text = epoch_ranges(epochs)
        expanded = []
        for part in filter(None, text.split(", ")):
            first, _, last = part.partition("-")
            expanded += range(int(first), int(last or first) + 1)
        assert expanded == sorted(set(epochs))
        assert len(text.split(", ")) <= len(set(epochs)) or not epochs

    check()


@pytest.mark.parametrize("report_to, shown", [([], False), (["tensorboard"], True), (["all"], True)])
def test_train_summary_suggests_tensorboard_only_when_it_logged_there(tmp_path, report_to, shown):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from hsm.cli.common import console
    from hsm.cli.train import _print_summary

    args = TrainingArguments(output_dir=str(tmp_path), report_to=report_to if report_to != ["all"] else "none")
    args.report_to = report_to  # "all" names every installed integration: set it as written
    summary = {"output_dir": str(tmp_path), "hsm_dir": str(tmp_path / "hsm"), "global_step": 3, "train_loss": 1.0,
               "mining": True, "trainer": SimpleNamespace(args=args)}
    with console.capture() as captured:
        _print_summary(summary)
    assert ("tensorboard --logdir" in captured.get()) == shown


@pytest.mark.parametrize("resumed_at, trained", [(None, True), (2, True), (3, False)])
def test_train_summary_says_when_a_resumed_run_had_nothing_left_to_train(tmp_path, resumed_at, trained):
    """Resumed from the run's last checkpoint, the Trainer runs no step and reports a train loss of 0:
    the summary says nothing was left to train instead of printing that loss."""
    import json
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from hsm.cli.common import console
    from hsm.cli.train import _print_summary

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    if resumed_at is not None:
        checkpoint = tmp_path / f"checkpoint-{resumed_at}"
        checkpoint.mkdir()
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": resumed_at}))
        args.resume_from_checkpoint = str(checkpoint)
    summary = {"output_dir": str(tmp_path), "hsm_dir": str(tmp_path / "hsm"), "global_step": 3,
               "train_loss": 0.25 if trained else 0.0, "mining": True, "trainer": SimpleNamespace(args=args)}
    with console.capture() as captured:
        _print_summary(summary)
    text = " ".join(captured.get().split())
    if trained:
        assert "hsm train done: 3 steps, train loss 0.2500" in text
    else:
        assert "resumed at step 3, the run's last (3 steps); nothing left to train" in text
        assert "train loss" not in text
