"""det_f1 measurement rows are not training draws: the views and the report count draws and average losses
over the training rows only, while the planner still reads the measurements."""

from __future__ import annotations

import numpy as np
import yaml

from hsm.config import MiningConfig
from hsm.eval.train_quality import POSITION_BASE
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.mining.queries import MEASUREMENT_POSITION, connect, query_text, run_query
from hsm.report.data import load_run

N = 6


def write_run(tmp_path) -> tuple[dict, list[float]]:
    """Epoch 0 of 6 target samples: 8 training draws (two samples drawn twice) with known losses, then one
    det_f1 measurement row per sample (loss NaN), as hsm train's DetF1Callback logs them."""
    hsm_dir = tmp_path / "hsm"
    writer = EventWriter(hsm_dir, run_id="r", rank=0)
    drawn = [0, 1, 2, 3, 4, 5, 0, 1]
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 1.5]
    for step in range(2):
        idx = drawn[4 * step:4 * step + 4]
        writer.append(EventBatch(
            epoch=0, global_step=step, dataset=["t"] * 4, base_idx=idx, sample_id=[f"s{i}" for i in idx],
            loss=np.array(losses[4 * step:4 * step + 4], np.float32), token_acc=np.full(4, 0.5, np.float32),
            n_tokens=np.full(4, 10, np.int32), aug_seed=np.zeros(4, np.int64), drawn_as_hard=np.zeros(4, bool)))
    writer.append(EventBatch(
        epoch=0, global_step=2, dataset=["t"] * N, base_idx=list(range(N)), sample_id=[f"s{i}" for i in range(N)],
        loss=np.full(N, np.nan, np.float32), token_acc=np.full(N, np.nan, np.float32),
        n_tokens=np.zeros(N, np.int32), aug_seed=np.zeros(N, np.int64), drawn_as_hard=np.zeros(N, bool),
        position_offset=POSITION_BASE, metrics={"det_f1": np.linspace(0.0, 1.0, N, dtype=np.float32)}))
    writer.close()
    mining = MiningConfig(enabled=True, metric="det_f1", selector={"k": 2})
    plan_epoch(PlanRequest(hsm_dir, 1, mining, "t"))
    (hsm_dir / "config.yaml").write_text(yaml.safe_dump({"custom": {
        "hard_sample_mining": mining.model_dump(mode="json"), "fusion_config": {"target": {"name": "t"}}}}))
    return {i: drawn.count(i) for i in range(N)}, losses


def test_measurement_rows_stay_out_of_draw_counts_and_mean_losses(tmp_path):
    assert MEASUREMENT_POSITION == POSITION_BASE
    draws, losses = write_run(tmp_path)
    con = connect(tmp_path)
    assert con.sql("SELECT count(*) FROM events").fetchall() == [(8,)]
    assert con.sql("SELECT count(*), count(det_f1) FROM measurements").fetchall() == [(N, N)]
    assert con.sql("SELECT count(*) FROM event_values WHERE value IS NOT NULL").fetchall() == [(N,)]  # det_f1 rows
    breakdown = run_query(con, query_text("dataset_breakdown")).rows
    (epoch, dataset, events, samples, mean_loss, *_), = breakdown
    assert (epoch, dataset, events, samples) == (0, "t", 8, N)
    assert mean_loss == round(sum(losses) / len(losses), 5)

    run = load_run(tmp_path)
    assert run.draws == {0: draws}
    assert run.stats.times_drawn == draws
    assert run.dataset_loss.keys() == {"t"} and abs(run.dataset_loss["t"][0] - sum(losses) / len(losses)) < 1e-6
    assert all(np.isfinite(v) for v in run.stats.token_acc.values())
