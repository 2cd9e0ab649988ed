"""Plan files: checksums, dataset checks, manifests, dumps, state provenance."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog import TARGET, random_rows, sample_id, write_rows
from oracle import plan_from_rows, tie_key
from hsm.config import MiningConfig
from hsm.mining.plan import DatasetInfo, PlanError, load_plan, plan_dir, write_plan
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.mining.state import StateMismatch


@pytest.fixture
def run(tmp_path):
    rows = random_rows(np.random.default_rng(11), n_target=12, n_epochs=2, n_ranks=2, max_obs=2)
    hsm_dir = tmp_path / "hsm"
    write_rows(hsm_dir, rows)
    mining = MiningConfig(enabled=True, selector={"k": 3}, dump=True)
    result = plan_epoch(PlanRequest(hsm_dir, 2, mining, TARGET, dataset=DatasetInfo(TARGET, 12, "fp-1"), dump_dir=tmp_path))
    return hsm_dir, mining, result


def test_plan_loads_and_matches_manifest(run):
    hsm_dir, _, result = run
    plan = load_plan(hsm_dir, 2, dataset=DatasetInfo(TARGET, 12, "fp-1"), expected_checksum=result.manifest["checksum"])
    assert plan.is_hard.sum() == 3 == result.manifest["counts"]["hard"]
    assert set(plan.weight[plan.hard_idx]) == {3.0}
    assert plan.triggered and plan.mode == "reweight"
    manifest = json.loads((plan_dir(hsm_dir, 2) / "manifest.json").read_text())
    for key in ("plan_version", "epoch", "mode", "metric", "selector", "config_hash", "target", "counts", "checksum", "engine", "created_at"):
        assert key in manifest


def test_dump_lists_hard_samples_in_rank_order(run, tmp_path):
    _, mining, result = run
    dump = json.loads((tmp_path / "hard_samples_epoch_2.json").read_text())
    plan = result.plan.to_pylist()
    # Plans carry no sample_id (the id table does); the log's ids come from eventlog.sample_id.
    ids = {r["base_idx"]: sample_id(r["dataset"], r["base_idx"]) for r in plan}
    hard = sorted((r for r in plan if r["is_hard"]),
                  key=lambda r: (-r["score"], tie_key(mining.seed, ids[r["base_idx"]]), ids[r["base_idx"]]))
    assert [d["sample_id"] for d in dump["samples"]] == [sample_id(r["dataset"], r["base_idx"]) for r in hard]
    assert set(dump["samples"][0]) == {"sample_id", "dataset", "base_idx", "score"}


def test_tampered_plan_is_refused(run):
    hsm_dir, _, _ = run
    path = plan_dir(hsm_dir, 2) / "plan.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PlanError, match="sha256 .* does not match"):
        load_plan(hsm_dir, 2)


def test_broadcast_checksum_must_match(run):
    hsm_dir, _, _ = run
    with pytest.raises(PlanError, match="rank 0"):
        load_plan(hsm_dir, 2, expected_checksum="0" * 64)


@pytest.mark.parametrize(
    "dataset, message",
    [
        (DatasetInfo("other", 12, "fp-1"), "is for dataset 'tgt'"),
        (DatasetInfo(TARGET, 13, "fp-1"), "n=12, the dataset has n=13"),
        (DatasetInfo(TARGET, 12, "fp-2"), "fingerprint"),
    ],
)
def test_plan_for_another_dataset_is_refused(run, dataset, message):
    hsm_dir, _, _ = run
    with pytest.raises(PlanError, match=message):
        load_plan(hsm_dir, 2, dataset=dataset)


def test_out_of_range_index_is_refused(tmp_path):
    rows = random_rows(np.random.default_rng(5), n_target=12, n_epochs=1, n_ranks=1, max_obs=2)
    write_rows(tmp_path / "hsm", rows)
    plan_epoch(PlanRequest(tmp_path / "hsm", 1, MiningConfig(enabled=True), TARGET))  # size unknown offline
    with pytest.raises(PlanError, match=r"base_idx 1\d out of range for dataset 'tgt' \(n=10\)"):
        load_plan(tmp_path / "hsm", 1, dataset=DatasetInfo(TARGET, 10))


def test_missing_plan_is_none_and_manifest_without_plan_fails(run):
    hsm_dir, _, _ = run
    assert load_plan(hsm_dir, 5) is None
    (plan_dir(hsm_dir, 2) / "plan.parquet").unlink()
    with pytest.raises(PlanError, match="missing although its manifest exists"):
        load_plan(hsm_dir, 2)


def test_state_built_with_other_parameters_is_refused(run):
    hsm_dir, _, _ = run
    with pytest.raises(StateMismatch, match="metric"):
        plan_epoch(PlanRequest(hsm_dir, 2, MiningConfig(enabled=True, metric="token_acc"), TARGET))


def test_dry_run_writes_nothing(tmp_path):
    rows = random_rows(np.random.default_rng(2), n_target=5, n_epochs=1, n_ranks=1, max_obs=1)
    write_rows(tmp_path / "hsm", rows)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = plan_epoch(PlanRequest(tmp_path / "hsm", 1, MiningConfig(enabled=True), TARGET, write=False))
    assert result.plan.num_rows > 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def write_rows_as_plan(hsm_dir, names, base_idx, is_hard, weight, mode="reweight", size=None):
    n = len(base_idx)
    table = pa.table({"dataset": pa.array(names, pa.string()), "base_idx": pa.array(base_idx, pa.int64()),
                      "score": pa.array(np.zeros(n)), "n_obs": pa.array(np.ones(n, np.int64)),
                      "is_hard": pa.array(is_hard, pa.bool_()), "weight": pa.array(weight, pa.float64())})
    default = 0.0 if mode == "fixed_set" else 1.0
    write_plan(hsm_dir, 1, table, {"mode": mode, "triggered": True, "default_weight": default, "hard_pool_frac": 0.3,
                                   "target_epoch_size": None, "target": {"name": TARGET, "size": size, "fingerprint": None}})


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), data=st.data(), batch_rows=st.integers(1, 7),
       mode=st.sampled_from(["reweight", "fixed_set", "dynamic"]), sorted_full=st.booleans())
def test_dense_load_is_a_scatter_of_the_rows(n, data, batch_rows, mode, sorted_full):
    if sorted_full:  # every sample, in order: the slice path
        rows = list(range(n))
    else:  # any subset, any order: the scatter path
        rows = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    is_hard = data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    weight = data.draw(st.lists(st.floats(0.0, 9.0), min_size=len(rows), max_size=len(rows)))
    with tempfile.TemporaryDirectory() as tmp:
        write_rows_as_plan(Path(tmp), [TARGET] * len(rows), rows, is_hard, weight, mode, size=n)
        plan = load_plan(Path(tmp), 1, dataset=DatasetInfo(TARGET, n), batch_rows=batch_rows)
        offline = load_plan(Path(tmp), 1, batch_rows=batch_rows)  # no dataset: the manifest's size
    # Oracle: a Python loop over the rows.
    default = 0.0 if mode == "fixed_set" else 1.0
    dense_weight, dense_hard = [default] * n, [False] * n
    for i, h, w in zip(rows, is_hard, weight):
        dense_weight[i], dense_hard[i] = w, h
    for loaded in (plan, offline):
        assert loaded.n_target == n and loaded.is_hard.tolist() == dense_hard
        assert loaded.hard_idx.tolist() == [i for i in range(n) if dense_hard[i]]
        assert loaded.weight is None if mode == "dynamic" else loaded.weight.tolist() == dense_weight
    rebuilt = plan_from_rows(plan.manifest, np.array(rows, dtype=np.int64), np.array(is_hard, dtype=bool), np.array(weight), n)
    assert rebuilt.is_hard.tolist() == dense_hard
    assert rebuilt.weight is None if mode == "dynamic" else rebuilt.weight.tolist() == dense_weight


@pytest.mark.parametrize("rows, bad", [([0, 1, 2, 3, 4, 5, 15, 12], 15), ([0, 1, 2, 3, -3, 4], -3)])
def test_out_of_range_index_in_a_later_batch_is_refused(tmp_path, rows, bad):
    write_rows_as_plan(tmp_path, [TARGET] * len(rows), rows, [False] * len(rows), [1.0] * len(rows))
    with pytest.raises(PlanError, match=rf"base_idx {bad} out of range for dataset 'tgt' \(n=10\)"):
        load_plan(tmp_path, 1, dataset=DatasetInfo(TARGET, 10), batch_rows=2)


@pytest.mark.parametrize("names", [[TARGET, TARGET, "other", TARGET], ["other"] * 4])
def test_rows_of_another_dataset_are_refused(tmp_path, names):
    # Mixed names are read from the rows; a single other name from the column's one-word dictionary.
    write_rows_as_plan(tmp_path, names, [0, 1, 2, 3], [False] * 4, [1.0] * 4)
    with pytest.raises(PlanError, match=r"rows for datasets \[.*'other'.*\], only 'tgt' may be planned"):
        load_plan(tmp_path, 1, dataset=DatasetInfo(TARGET, 10), batch_rows=3)
