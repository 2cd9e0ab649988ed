"""``hsm sql`` views: state and plans files hold no strings, yet users still see sample_id."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from eventlog import TARGET, random_rows, sample_id, write_rows
from hsm.config import MiningConfig
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.mining.queries import connect


def test_views_join_sample_id_onto_state_and_plans(tmp_path):
    rows = random_rows(np.random.default_rng(4), n_target=15, n_epochs=3, n_ranks=2, max_obs=2)
    hsm_dir = tmp_path / "hsm"
    write_rows(hsm_dir, [r for r in rows if r["epoch"] < 2])
    mining = MiningConfig(enabled=True, selector={"k": 4})
    plan_epoch(PlanRequest(hsm_dir, 2, mining, TARGET))
    # A resumed attempt changes epoch 0 after the fact: it is refolded, the id table rewritten.
    write_rows(hsm_dir, [dict(r, attempt=1) for r in rows if r["epoch"] == 0] + [r for r in rows if r["epoch"] == 2])
    plan_epoch(PlanRequest(hsm_dir, 3, mining, TARGET))
    assert "sample_id" not in pq.read_schema(hsm_dir / "state" / "epoch=2" / "state.parquet").names
    assert "sample_id" not in pq.read_schema(hsm_dir / "plans" / "epoch=3" / "plan.parquet").names
    con = connect(tmp_path)
    for view in ("state", "plans"):
        got = con.sql(f"SELECT sample_id, dataset, base_idx, epoch FROM {view}").fetchall()
        assert got, view
        assert all(sid == sample_id(ds, idx) for sid, ds, idx, _ in got), view
        assert len(got) == len({(ds, idx, e) for _, ds, idx, e in got}), f"{view}: a row joined twice"
    observed = {(r["dataset"], r["base_idx"]) for r in rows}
    ids = con.sql("SELECT dataset, base_idx, sample_id FROM sample_ids").fetchall()
    assert {(d, i) for d, i, _ in ids} == observed and len(ids) == len(observed)
    # The hardest samples query, which joins events on sample_id, still works through the views.
    assert con.sql("SELECT count(*) FROM plans p JOIN events e USING (sample_id)").fetchall()[0][0] > 0


def test_event_values_are_the_latest_plans_metric_as_difficulty(tmp_path):
    rows = random_rows(np.random.default_rng(7), n_target=12, n_epochs=2, n_ranks=2, max_obs=2)
    hsm_dir = tmp_path / "hsm"
    write_rows(hsm_dir, rows)
    con = connect(tmp_path)  # before any plan: loss
    got = con.sql("SELECT DISTINCT metric FROM event_values").fetchall()
    assert got == [("loss",)]
    plan_epoch(PlanRequest(hsm_dir, 2, MiningConfig(enabled=True, selector={"k": 3}, metric="token_acc"), TARGET))
    con = connect(tmp_path)
    got = con.sql("SELECT epoch, global_step, rank, position, metric, value FROM event_values").fetchall()
    # Every attempt kept by the events view, with 1 - token_acc (as float32 was logged) as its value.
    kept = {}
    for r in rows:
        key = (r["epoch"], r["global_step"], r["rank"])
        kept[key] = max(kept.get(key, -1), r["attempt"])
    want = {(r["epoch"], r["global_step"], r["rank"], r["position"]): 1.0 - float(np.float32(r["token_acc"]))
            for r in rows if r["attempt"] == kept[(r["epoch"], r["global_step"], r["rank"])]}
    assert {g[:4]: g[5] for g in got} == want
    assert {g[4] for g in got} == {"token_acc"}
