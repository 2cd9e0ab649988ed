"""``hsm report`` on a run shorter than the data map needs (fewer than 3 epochs) prints no plotting noise.

Such a run is the common first look (after epoch 1, or a 2-epoch TRL run): the data map has no
sample yet and says so on the figure; the command's output holds only what it wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from hsm.cli.app import app
from hsm.config import MiningConfig
from hsm.data.records import read_jsonl
from hsm.data.synth import synthesize
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.mining.planner import PlanRequest, plan_epoch


def _short_run(root: Path, n_epochs: int) -> Path:
    """A run directory with ``n_epochs`` epochs of events on a synthetic target and the plans after each."""
    paths = synthesize(root / "data", n_target=12, n_source=2, n_val=0)
    records = read_jsonl(paths["bbu"], check_images=False)
    hsm_dir = root / "run" / "hsm"
    hsm_dir.mkdir(parents=True)
    mining = MiningConfig(enabled=True, selector={"mode": "top_k", "k": 3})
    (hsm_dir / "config.yaml").write_text(yaml.safe_dump({"custom": {
        "hard_sample_mining": mining.model_dump(mode="json"),
        "fusion_config": {"target": {"name": "bbu", "train_jsonl": str(paths["bbu"])}}}}))
    rng = np.random.default_rng(0)
    with EventWriter(hsm_dir, run_id="run", rank=0, attempt=0) as writer:
        for epoch in range(n_epochs):
            loss = rng.uniform(1.0, 3.0, len(records)).tolist()
            writer.append(EventBatch(epoch=epoch, global_step=epoch, dataset=["bbu"] * len(records),
                          base_idx=list(range(len(records))), sample_id=[r.id for r in records], loss=loss,
                          token_acc=[0.5] * len(records), n_tokens=[20] * len(records),
                          aug_seed=[0] * len(records), drawn_as_hard=[False] * len(records)))
            writer.flush()
            plan_epoch(PlanRequest(hsm_dir, epoch + 1, mining, "bbu"))
    return root / "run"


@pytest.mark.parametrize("n_epochs", [1, 2])
def test_report_on_a_run_shorter_than_the_data_map_prints_no_warning(tmp_path, n_epochs):
    run = _short_run(tmp_path, n_epochs)
    result = CliRunner().invoke(app, ["report", "--run-dir", str(run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output.lower(), result.output
    assert (tmp_path / "r.html").is_file()
