"""Resuming only from the run's own checkpoints: a checkpoint past the run's event log is another run's.

A run replaced with ``training.overwrite_output_dir=true`` loses its ``hsm/`` but leaves its
``checkpoint-N`` folders; ``resume_from_checkpoint=last`` must not continue the old run's
weights in the new run's log. No test here trains: the log is written with the event writer
and the checkpoints are folders as the Trainer leaves them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hsm.cli.app import app
from hsm.config import ConfigError
from hsm.train.checkpoints import resolve_resume
from fake_checkpoint import complete_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _logged_run(output_dir: Path, seed: int) -> int:
    """Write a 2-rank, 2-epoch log with a resumed attempt under ``output_dir/hsm``; returns its highest step."""
    from eventlog import random_rows, write_rows

    rows = random_rows(np.random.default_rng(seed), n_target=12, n_epochs=2, n_ranks=2, max_obs=2, resume=True)
    write_rows(output_dir / "hsm", rows)
    return max(r["global_step"] for r in rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_last_logged_step_is_the_highest_step_of_the_log(tmp_path, seed):
    from hsm.train.checkpoints import last_logged_step

    assert last_logged_step(tmp_path / "hsm") is None
    highest = _logged_run(tmp_path, seed)
    assert last_logged_step(tmp_path / "hsm") == highest


def test_a_checkpoint_the_log_reaches_is_resumed(tmp_path):
    """Steps count from 0 in the log: the run's checkpoint-N follows step N - 1, the last it logged."""
    highest = _logged_run(tmp_path, 0)
    own = complete_checkpoint(tmp_path, highest + 1)
    assert resolve_resume(tmp_path, "last") == str(own)
    assert resolve_resume(tmp_path, str(own)) == str(own)


def test_a_checkpoint_past_the_log_is_refused_naming_it(tmp_path):
    highest = _logged_run(tmp_path, 0)
    complete_checkpoint(tmp_path, highest + 1)
    foreign = complete_checkpoint(tmp_path, highest + 50)  # the replaced run's, newer than any of this run's
    for value in ("last", str(foreign)):
        with pytest.raises(ConfigError) as caught:
            resolve_resume(tmp_path, value)
        text = str(caught.value)
        assert f"{foreign} is at step {highest + 50}" in text
        assert f"ends at step {highest + 1}" in text and "overwrite_output_dir" in text


def test_a_checkpoint_without_a_log_is_resumed(tmp_path):
    """No event log (mining off, or a log not started yet): nothing to compare, the checkpoint is taken."""
    own = complete_checkpoint(tmp_path, 54)
    assert resolve_resume(tmp_path, "last") == str(own)


def test_hsm_train_refuses_to_resume_a_replaced_runs_checkpoint(tmp_path, make_corpus, demo_overrides):
    """The field case: a run replaced with overwrite_output_dir (its log ends early) beside the old run's
    checkpoint-54; ``hsm train ... resume_from_checkpoint=last`` exits 2 naming it and writes nothing."""
    out = tmp_path / "out"
    highest = _logged_run(out, 0)
    foreign = complete_checkpoint(out, 54 + highest)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["train", str(ROOT / "configs" / "demo.yaml"), *demo_overrides(make_corpus(8, 4, 0)),
                                      f"training.output_dir={out}", "training.report_to=[]",
                                      "training.resume_from_checkpoint=last"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"{foreign} is at step {54 + highest}" in text and "not written by this run" in text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: b for p, b in before.items() if p.name != ".lock"}
