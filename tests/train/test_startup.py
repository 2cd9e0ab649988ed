"""hsm train's start-up: check first, write last, under the run's lock, before the model loads.

Most cases are refused before any training, so they cost a config load; one test trains
the smallest run (one epoch of 8 target samples) to show the opt-in replacement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hsm.cli.app import app
from fake_checkpoint import complete_checkpoint
from lock_holder import lock_held

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _train(out: Path, corpus_args: list[str], *extra: str):
    return runner.invoke(app, ["train", str(ROOT / "configs" / "demo.yaml"), *corpus_args,
                               f"training.output_dir={out}", "training.report_to=[]",
                               "training.per_device_train_batch_size=4", *extra])


def _text(result) -> str:
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return " ".join(result.output.split())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def old_run(tmp_path):
    """An output folder holding an hsm run: its config (a selector of its own), dataset record and an event part."""
    from eventlog import random_rows, write_rows

    out = tmp_path / "out"
    hsm = out / "hsm"
    write_rows(hsm, random_rows(__import__("numpy").random.default_rng(1), n_target=8, n_epochs=1, n_ranks=1,
                                max_obs=1))
    (hsm / "config.yaml").write_text("custom:\n  hard_sample_mining:\n    enabled: true\n    selector: {mode: percentile, value: 0.77}\n")
    (hsm / "dataset.json").write_text(json.dumps({"target": {"name": "tgt", "size": 8}}))
    return out


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_naming_it(old_run, make_corpus, demo_overrides):
    before = _snapshot(old_run)
    text = _text(_train(old_run, demo_overrides(make_corpus(8, 4, 0))))
    assert f"{old_run / 'hsm'}: already holds an hsm run" in text
    assert "config.yaml" in text and "events/" in text
    assert "resume_from_checkpoint" in text and "training.overwrite_output_dir=true" in text
    assert _snapshot(old_run) == before  # nothing rewritten, not even the config


def test_a_bad_resume_path_is_refused_before_anything_is_written(old_run, make_corpus, demo_overrides):
    before = _snapshot(old_run)
    missing = old_run / "checkpoint-999"
    text = _text(_train(old_run, demo_overrides(make_corpus(8, 4, 0)), f"training.resume_from_checkpoint={missing}"))
    assert f"training.resume_from_checkpoint: {missing}: not a complete checkpoint (no such folder)" in text
    assert _snapshot(old_run) == before


def test_a_half_written_checkpoint_names_the_newest_complete_one(tmp_path, make_corpus, demo_overrides):
    out = tmp_path / "out"
    complete = complete_checkpoint(out, 6)
    half = out / "checkpoint-9"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"weights")  # killed before trainer_state.json
    text = _text(_train(out, demo_overrides(make_corpus(8, 4, 0)), f"training.resume_from_checkpoint={half}"))
    assert "checkpoint-9: not a complete checkpoint (no trainer_state.json" in text
    assert f"the newest complete one is {complete}" in text and "resume_from_checkpoint=last" in text
    assert not (out / "hsm").exists()


def test_resume_last_picks_the_newest_complete_checkpoint(tmp_path):
    from hsm.config import ConfigError
    from hsm.train.checkpoints import complete_checkpoints, resolve_resume

    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(ConfigError, match="holds no complete checkpoint-N"):
        resolve_resume(tmp_path, "last")
    complete_checkpoint(tmp_path, 3)
    newest = complete_checkpoint(tmp_path, 12)
    (tmp_path / "checkpoint-15").mkdir()  # empty: killed right after mkdir
    torn = complete_checkpoint(tmp_path, 18)
    (torn / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    wrong = complete_checkpoint(tmp_path, 21)
    (wrong / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-12"]
    with pytest.warns(UserWarning, match="checkpoint-15, checkpoint-18, checkpoint-21 incomplete"):
        assert resolve_resume(tmp_path, "last") == str(newest)
    with pytest.raises(ConfigError, match="unreadable trainer_state.json"):
        resolve_resume(tmp_path, str(torn))


def test_resume_checks_every_file_before_the_model_loads(old_run, make_corpus, demo_overrides):
    """A resumed run continues the run in the folder: its files are checked first (here a foreign part)."""
    complete_checkpoint(old_run, 2)
    foreign = old_run / "hsm" / "events" / "epoch=0" / "rank=0" / "part-00099.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    text = _text(_train(old_run, demo_overrides(make_corpus(8, 4, 0)), "training.resume_from_checkpoint=last"))
    assert "part-00099.parquet" in text and "not an hsm event part" in text


def test_a_second_training_on_one_folder_is_refused_at_once(old_run, make_corpus, demo_overrides):
    """The first training holds the run's lock from start-up to its end; a second one fails before loading anything."""
    complete_checkpoint(old_run, 2)
    with lock_held(old_run / "hsm" / ".lock") as holder:
        before = _snapshot(old_run)
        text = _text(_train(old_run, demo_overrides(make_corpus(8, 4, 0)), "training.resume_from_checkpoint=last"))
        assert holder.poll() is None  # refused while the lock is still held: it did not wait for the holder to end
        assert "another hsm plan or training is writing this run" in text
        assert _snapshot(old_run) == before


def test_a_refused_start_comes_before_torch_and_transformers_load(old_run, make_corpus, demo_overrides):
    """`hsm train` refuses a used folder, and a run whose lock another process holds, before it imports torch or
    transformers (what made a refused start under a launcher take a minute on a loaded machine); nothing written."""
    corpus = demo_overrides(make_corpus(8, 4, 0))

    def refused(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "hsm.cli.app", "train", "configs/demo.yaml",
                               *corpus, f"training.output_dir={old_run}", "training.report_to=[]", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "hsm.config_load" in imported and not imported & {"torch", "transformers"}
        return " ".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))

    before = _snapshot(old_run)
    assert f"{old_run / 'hsm'}: already holds an hsm run" in refused()
    with lock_held(old_run / "hsm" / ".lock"):
        assert "another hsm plan or training is writing this run" in refused("training.overwrite_output_dir=true")
    assert _snapshot(old_run) == before


def test_overwrite_replaces_the_run_and_training_holds_the_lock_until_it_ends(old_run, make_corpus, demo_config):
    """The opt-in removes the old hsm/ first; while the new run trains, another writer is shut out (its own
    epoch-end planning is not); the lock is released at the end. One epoch of 8 target samples."""
    from filelock import FileLock, Timeout
    from transformers import Trainer, TrainerCallback

    from hsm.io import read_recorded
    from hsm.run import train

    old_part = next((old_run / "hsm" / "events").rglob("part-*.parquet"))
    old_checkpoint = complete_checkpoint(old_run, 40)  # the replaced run's weights go with it
    seen = []

    class LockProbe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            try:
                FileLock(old_run / "hsm" / ".lock").acquire(timeout=0)  # another lock object, as another process's
                seen.append("free")
            except Timeout:
                seen.append("held")

    class ProbedTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(LockProbe())

    with pytest.warns(UserWarning, match="removed the previous hsm run in .* and its 1 checkpoint folder"):
        summary = train(demo_config(make_corpus(8, 4, 0), old_run, "training.num_train_epochs=1",
                                    "training.overwrite_output_dir=true"), base_trainer=ProbedTrainer)
    assert seen and set(seen) == {"held"} and summary["global_step"] == len(seen)
    assert not old_checkpoint.exists()
    assert (old_run / "hsm" / "plans" / "epoch=1" / "manifest.json").is_file()  # planned under its own lock
    FileLock(old_run / "hsm" / ".lock").acquire(timeout=0)  # released at the end
    runs = {pq.read_table(p, columns=["run_id"]).column(0)[0].as_py() for p in (old_run / "hsm" / "events").rglob("part-*.parquet")}
    assert "test-run" not in runs and old_part.parent.exists()  # the old run's parts are gone, not mixed in
    config = read_recorded(old_run / "hsm" / "config.yaml").decode()  # written with its sha256 record
    assert "0.77" not in config


def test_overwrite_output_dir_is_a_boolean(old_run, make_corpus, demo_overrides):
    bad = _train(old_run, demo_overrides(make_corpus(8, 4, 0)), "training.overwrite_output_dir=maybe")
    assert "training.overwrite_output_dir: 'maybe' is not a boolean" in _text(bad)
