"""Every planner engine against the naive oracle of docs/design.md §4, on real Parquet logs."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventlog import TARGET, random_rows, write_rows
from hsm.config import MiningConfig
from hsm.mining.engines import ENGINES
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.mining.state import find_states, read_sample_ids, read_state
from oracle import full_state, stale_adjusted
from oracle import plan as oracle_plan

ENGINE_NAMES = tuple(ENGINES)  # polars first: the others are compared with it

MODES = [
    {"mode": "reweight", "selector": {"mode": "top_k", "k": 4}},
    {"mode": "reweight", "selector": {"mode": "percentile", "value": 0.35}},
    {"mode": "reweight", "selector": {"mode": "threshold", "threshold": 1.25}},
    {"mode": "fixed_set", "hard_sample_size": 3, "regular_sample_size": 4},
    {"mode": "dynamic", "hard_pool_frac": 0.3},
    {"mode": "dynamic", "hard_pool_k": 2, "metric": "loss"},
]


def mining_config(mode: dict, aggregate: str, metric: str | None, decay: float) -> MiningConfig:
    fields = {"enabled": True, "aggregate": aggregate, "ema_decay": decay, "start_epoch": 0, **mode}
    if metric is not None and "metric" not in mode:
        fields["metric"] = metric
    return MiningConfig.model_validate(fields)


def state_rows(hsm_dir, epoch: int) -> dict:
    """The state after ``epoch`` with each sample's id joined from the id table, by (dataset, base_idx)."""
    state, _ = read_state(hsm_dir, epoch)
    ids = {(r["dataset"], r["base_idx"]): r["sample_id"] for r in read_sample_ids(hsm_dir, epoch).to_pylist()}
    rows = {(r["dataset"], r["base_idx"]): r for r in state.to_pylist()}
    assert len(ids) == read_sample_ids(hsm_dir, epoch).num_rows, "a sample appears twice in the id table"
    assert ids.keys() == rows.keys()
    return {key: dict(row, sample_id=ids[key]) for key, row in rows.items()}


def assert_state_matches(rows: dict, expected: dict, where: str) -> None:
    assert rows.keys() == expected.keys(), where
    for key, want in expected.items():
        got = rows[key]
        assert got["sample_id"] == want["sample_id"]
        assert got["n_obs"] == want["n_obs"], (where, key)
        assert got["last_epoch"] == want["last_epoch"], (where, key)
        for column in ("mean", "ema", "last", "score"):
            assert got[column] == pytest.approx(want[column], rel=1e-9, abs=1e-12), (where, key, column)


def assert_plan_matches(plan, expected: dict[int, tuple[bool, float]], scores: dict[int, float]) -> None:
    got = {r["base_idx"]: (r["is_hard"], r["weight"]) for r in plan.to_pylist()}
    assert got.keys() == expected.keys()
    hard_got = {i for i, (h, _) in got.items() if h}
    hard_want = {i for i, (h, _) in expected.items() if h}
    if hard_got != hard_want:
        # Only a sample tied with the boundary up to rounding may differ.
        boundary = min((scores[i] for i in hard_want), default=None)
        for i in hard_got ^ hard_want:
            assert boundary is not None and scores[i] == pytest.approx(boundary, rel=1e-9), (i, hard_got ^ hard_want)
    else:
        assert got == expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_target=st.integers(1, 14),
    n_epochs=st.integers(1, 4),
    n_ranks=st.integers(1, 3),
    max_obs=st.integers(1, 4),
    mode=st.sampled_from(MODES),
    aggregate=st.sampled_from(["ema", "mean"]),
    metric=st.sampled_from([None, "loss", "token_acc"]),
    resume=st.booleans(),
)
def test_engines_equal_oracle(tmp_path_factory, seed, n_target, n_epochs, n_ranks, max_obs, mode, aggregate, metric, resume):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, n_target=n_target, n_epochs=n_epochs, n_ranks=n_ranks, max_obs=max_obs, resume=resume)
    mining = mining_config(mode, aggregate, metric, decay=0.5 if aggregate == "ema" else 0.9)
    expected_state = full_state(rows, metric=mining.metric, decay=mining.ema_decay, aggregate=mining.aggregate)
    if not expected_state:
        return
    scores = {k[1]: v["score"] for k, v in expected_state.items() if k[0] == TARGET}
    expected_plan = oracle_plan(expected_state, TARGET, mining, n_epochs)
    plans, states = {}, {}
    for engine in ENGINE_NAMES:
        hsm_dir = tmp_path_factory.mktemp(engine) / "hsm"
        write_rows(hsm_dir, rows, flush_rows=int(rng.integers(1, 9)))
        result = plan_epoch(PlanRequest(hsm_dir, n_epochs, mining, TARGET, engine=engine))
        last = find_states(hsm_dir)[-1]
        assert_state_matches(state_rows(hsm_dir, last), expected_state, engine)
        assert_plan_matches(result.plan, expected_plan, scores)
        assert set(result.plan.column("dataset").to_pylist()) <= {TARGET}
        plans[engine] = pq.read_table(hsm_dir / "plans" / f"epoch={n_epochs}" / "plan.parquet")
        states[engine] = pq.read_table(hsm_dir / "state" / f"epoch={last}" / "state.parquet")
    for engine in ENGINE_NAMES[1:]:
        assert plans["polars"].equals(plans[engine]), f"engines disagree: polars, {engine}"
        assert states["polars"].equals(states[engine]), f"engine states disagree: polars, {engine}"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n_epochs=st.integers(2, 4), engine=st.sampled_from(ENGINE_NAMES))
def test_incremental_fold_equals_full_recomputation(tmp_path_factory, seed, n_epochs, engine):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, n_target=10, n_epochs=n_epochs, n_ranks=2, max_obs=3)
    mining = mining_config(MODES[0], "ema", "loss", decay=0.9)
    incremental = tmp_path_factory.mktemp("inc") / "hsm"
    write_rows(incremental, rows)
    for epoch in range(1, n_epochs + 1):  # one fold per call, each reading only its own epoch
        result = plan_epoch(PlanRequest(incremental, epoch, mining, TARGET, engine=engine))
        assert result.folded_epochs == [epoch - 1] or not any(r["epoch"] == epoch - 1 for r in rows)
    scratch = tmp_path_factory.mktemp("full") / "hsm"
    shutil.copytree(incremental / "events", scratch / "events")
    plan_epoch(PlanRequest(scratch, n_epochs, mining, TARGET, engine=engine))
    a = state_rows(incremental, n_epochs - 1)
    b = state_rows(scratch, n_epochs - 1)
    assert_state_matches(a, b, "incremental")
    expected = full_state(rows, metric="loss", decay=0.9, aggregate="ema")
    assert_state_matches(a, expected, "oracle")


def test_changed_events_are_refolded(tmp_path):
    rng = np.random.default_rng(7)
    rows = random_rows(rng, n_target=8, n_epochs=2, n_ranks=1, max_obs=2)
    mining = mining_config(MODES[0], "mean", "loss", decay=0.9)
    hsm_dir = tmp_path / "hsm"
    write_rows(hsm_dir, [r for r in rows if r["epoch"] == 0])
    plan_epoch(PlanRequest(hsm_dir, 1, mining, TARGET))
    # Epoch 0 gains events after its state was written (a resumed attempt): it is refolded.
    extra = [dict(r, attempt=1, loss=2.875) for r in rows if r["epoch"] == 0]
    write_rows(hsm_dir, extra + [r for r in rows if r["epoch"] == 1])
    result = plan_epoch(PlanRequest(hsm_dir, 2, mining, TARGET))
    assert result.folded_epochs == [0, 1]
    assert_state_matches(state_rows(hsm_dir, 1), full_state(rows + extra, metric="loss", decay=0.9, aggregate="mean"), "refold")


BOX_METRICS = ("coord_loss", "label_loss", "loss_sum")


def with_box_metrics(rng: np.random.Generator, rows: list[dict]) -> list[dict]:
    """The rows with the nullable box-aware columns: dyadic values (ties), null for about one event in five."""
    out = []
    for r in rows:
        extra = {name: (None if rng.random() < 0.2 else float(rng.integers(0, 16)) / 4) for name in BOX_METRICS}
        out.append(dict(r, **extra))
    return out


def write_parts(hsm_dir, rows: list[dict]) -> None:
    """One Parquet part per (epoch, rank, attempt), written directly in the event schema (nulls included)."""
    from hsm.mining.events import PART_WRITE_OPTIONS
    from hsm.schemas import EVENT_SCHEMA

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["epoch"], r["rank"], r["attempt"]), []).append(dict(r, run_id="test-run"))
    for number, ((epoch, rank, _), group) in enumerate(sorted(groups.items())):
        group.sort(key=lambda r: (r["global_step"], r["position"]))
        path = hsm_dir / "events" / f"epoch={epoch}" / f"rank={rank}" / f"part-{number:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(group, schema=EVENT_SCHEMA), path, **PART_WRITE_OPTIONS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_target=st.integers(1, 10),
    n_epochs=st.integers(1, 4),
    max_obs=st.integers(1, 3),
    mode=st.sampled_from(MODES),
    aggregate=st.sampled_from(["epoch_ema", "last", "ema", "mean"]),
    metric=st.sampled_from([*BOX_METRICS, "loss", "token_acc"]),
    decay=st.sampled_from([0.0, 0.5, 0.75]),
    stale=st.sampled_from([None, (1, "decay"), (2, "decay"), (1, "flag"), (2, "flag")]),
)
def test_box_metrics_epoch_aggregates_and_staleness_equal_oracle(
    tmp_path_factory, seed, n_target, n_epochs, max_obs, mode, aggregate, metric, decay, stale
):
    rng = np.random.default_rng(seed)
    rows = with_box_metrics(rng, random_rows(rng, n_target=n_target, n_epochs=n_epochs, n_ranks=2, max_obs=max_obs,
                                             resume=bool(seed % 2)))
    fields = {"enabled": True, "aggregate": aggregate, "ema_decay": decay, "start_epoch": 0, **mode, "metric": metric}
    if stale is not None:
        fields.update(stale_after=stale[0], stale_policy=stale[1])
    mining = MiningConfig.model_validate(fields)
    expected_state = full_state(rows, metric=metric, decay=decay, aggregate=aggregate)
    if not any(key[0] == TARGET for key in expected_state):
        return
    adjusted = stale_adjusted(expected_state, TARGET, mining, n_epochs)
    scores = {k[1]: v["score"] for k, v in adjusted.items() if k[0] == TARGET}
    expected_plan = oracle_plan(expected_state, TARGET, mining, n_epochs)
    files = {}
    for engine in ENGINE_NAMES:
        hsm_dir = tmp_path_factory.mktemp(engine) / "hsm"
        write_parts(hsm_dir, rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # epochs without events
            result = plan_epoch(PlanRequest(hsm_dir, n_epochs, mining, TARGET, engine=engine))
        last = find_states(hsm_dir)[-1]
        assert_state_matches(state_rows(hsm_dir, last), expected_state, engine)
        assert_plan_matches(result.plan, expected_plan, scores)
        got_scores = dict(zip(result.plan.column("base_idx").to_pylist(), result.plan.column("score").to_pylist()))
        for idx, want in scores.items():
            assert got_scores[idx] == pytest.approx(want, rel=1e-9, abs=1e-12), (engine, idx)
        files[engine] = [pq.read_table(hsm_dir / "plans" / f"epoch={n_epochs}" / "plan.parquet"),
                         pq.read_table(hsm_dir / "state" / f"epoch={last}" / "state.parquet")]
    for engine in ENGINE_NAMES[1:]:
        assert all(a.equals(b) for a, b in zip(files["polars"], files[engine])), f"engines disagree: polars, {engine}"


def test_epoch_ema_is_not_dominated_by_the_first_epoch(tmp_path):
    # Issue 8: per observation, a sample seen once per epoch with losses 5, 3, 2 scores 4.52 under ema
    # (decay 0.9); epoch_ema weighs the epochs 0.9^2 : 0.9 : 1 after bias correction, last is 2.
    rows = [{"attempt": 0, "epoch": e, "global_step": 10 * e, "rank": 0, "position": 0, "dataset": TARGET,
             "base_idx": 0, "sample_id": "s0", "loss": loss, "token_acc": 0.5, "n_tokens": 4, "aug_seed": 0,
             "drawn_as_hard": False} for e, loss in enumerate([5.0, 3.0, 2.0])]
    want = {"ema": 0.9 * (0.9 * 5 + 0.1 * 3) + 0.1 * 2,
            "epoch_ema": (0.1 * 0.81 * 5 + 0.1 * 0.9 * 3 + 0.1 * 2) / (1 - 0.9**3),
            "last": 2.0}
    for aggregate, value in want.items():
        hsm_dir = tmp_path / aggregate / "hsm"
        write_parts(hsm_dir, rows)
        plan = plan_epoch(PlanRequest(hsm_dir, 3, MiningConfig(enabled=True, aggregate=aggregate, start_epoch=0), TARGET)).plan
        assert plan.column("score").to_pylist() == [pytest.approx(value, rel=1e-12)], aggregate
    assert want["last"] < want["epoch_ema"] < 3.3 < 4.5 < want["ema"]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("aggregate", ["ema", "epoch_ema"])
def test_out_of_core_fold_is_byte_identical(tmp_path, engine, aggregate):
    rng = np.random.default_rng(17)
    rows = random_rows(rng, n_target=40, n_epochs=3, n_ranks=2, max_obs=3, resume=True)
    mining = mining_config(MODES[1], aggregate, "loss", decay=0.75)
    files = {}
    for how, limit in (("memory", None), ("spilled", 1), ("no-stats", 1)):  # a 1-byte budget: one bucket per sample range
        hsm_dir = tmp_path / how / "hsm"
        write_rows(hsm_dir, rows)
        if how == "no-stats":  # parts of another writer, without footer statistics: spans come from a scan
            for part in (hsm_dir / "events").rglob("*.parquet"):
                pq.write_table(pq.read_table(part), part, write_statistics=False)
            for ledger in (hsm_dir / "events").rglob("_sha256.json"):
                ledger.unlink()  # another writer keeps no ledger: its parts are read with page checksums
        from hsm.mining.update import fold_pending

        folded = fold_pending(hsm_dir, 2, mining, engine=engine, memory_limit=limit, temp_directory=tmp_path)
        folded.wait()
        plan_epoch(PlanRequest(hsm_dir, 3, mining, TARGET, engine=engine))
        files[how] = [pq.read_table(hsm_dir / "plans" / "epoch=3" / "plan.parquet"),
                      *(pq.read_table(hsm_dir / "state" / f"epoch={e}" / "state.parquet") for e in range(3)),
                      *(pq.read_table(hsm_dir / "sample_ids" / f"epoch={e}" / "sample_ids.parquet") for e in range(3))]
    assert all(a.equals(b) for a, b in zip(files["memory"], files["spilled"]))
    assert all(a.equals(b) for a, b in zip(files["memory"], files["no-stats"]))
    assert_state_matches(state_rows(tmp_path / "spilled" / "hsm", 2),
                         full_state(rows, metric="loss", decay=0.75, aggregate=aggregate), "spilled")
    assert not list(tmp_path.glob("hsm-fold-*")), "spill files left behind"


@settings(max_examples=60, deadline=None)
@given(
    prev=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 80)), max_size=50, unique=True),
    events=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 80), st.floats(0, 5, width=32)), max_size=120),
    n_steps=st.integers(1, 4),
    per_epoch=st.booleans(),
    decay=st.sampled_from([0.0, 0.5, 0.9, 0.75]),
)
def test_polars_and_duckdb_folds_agree_bit_for_bit(prev, events, n_steps, per_epoch, decay):
    """The Polars, numpy and SQL folds on the same keyed tables: equal tables, events in any row order."""
    from hsm.mining.engines.duckdb_engine import fold_epoch as fold_duckdb
    from hsm.mining.engines.numpy_engine import fold_epoch as fold_numpy
    from hsm.mining.engines.polars_engine import fold_epoch as fold_polars
    from hsm.mining.state import IDX_BITS

    rng = np.random.default_rng(len(events) + 1000 * len(prev))
    prev_keys = np.unique(np.array([(c << IDX_BITS) | i for c, i in prev], dtype=np.int64))
    n = len(prev_keys)
    columns = {"key": prev_keys, "n_obs": rng.integers(1, 5, n), "mean": rng.random(n), "ema": rng.random(n),
               "last": rng.random(n), "last_epoch": np.zeros(n, np.int32)}
    if per_epoch:
        columns.update(n_epochs=np.ones(n, np.int32), epoch_mean=rng.random(n), epoch_ema=rng.random(n))
    state = pa.table(columns) if n else None
    m = len(events)
    # Steps, ranks and positions not in row order: each engine orders a sample's events itself.
    keyed = pa.table({
        "key": np.array([(c << IDX_BITS) | i for c, i, _ in events], dtype=np.int64),
        "x": np.array([x for *_, x in events], dtype=np.float64),
        "global_step": rng.integers(0, n_steps, m).astype(np.int64), "rank": rng.integers(0, 2, m).astype(np.int32),
        "position": rng.permutation(m).astype(np.int32),
    })
    polars_out = fold_polars(state, keyed, epoch=1, ema_decay=decay, per_epoch=per_epoch)
    duckdb_out = fold_duckdb(state, keyed, epoch=1, ema_decay=decay, per_epoch=per_epoch)
    numpy_out = fold_numpy(state, keyed, epoch=1, ema_decay=decay, per_epoch=per_epoch)
    assert polars_out.combine_chunks().equals(duckdb_out.combine_chunks())
    assert numpy_out.combine_chunks().equals(duckdb_out.combine_chunks())


@settings(max_examples=15, deadline=None)
@given(picks=st.lists(st.integers(0, 150_000), max_size=12), dataset=st.sampled_from([None, "target", "coco"]))
def test_sample_id_lookup_prunes_row_groups_and_equals_a_filter(tmp_path_factory, picks, dataset):
    """The tie-break lookup reads only the row groups that can hold the asked indices; same rows as a plain filter."""
    from hsm.mining.state import read_sample_ids, write_sample_ids

    hsm_dir = tmp_path_factory.mktemp("ids")
    n = 140_000  # three row groups of 2^16 rows
    base = np.arange(n, dtype=np.int64)
    names = np.where(base % 7 == 0, "coco", "target")
    table = pa.table({"dataset": pa.array(names).dictionary_encode(), "base_idx": base,
                      "sample_id": pa.array([f"s{i}" for i in range(n)])})
    write_sample_ids(hsm_dir, 0, table)
    got = read_sample_ids(hsm_dir, 0, dataset=dataset, base_idx=np.array(picks, dtype=np.int64))
    wanted = set(picks)
    expected = [(str(d), int(i), f"s{i}") for d, i in zip(names, base) if i in wanted and dataset in (None, d)]
    rows = list(zip(got.column("dataset").to_pylist(), got.column("base_idx").to_pylist(), got.column("sample_id").to_pylist()))
    assert sorted(rows) == sorted(expected)


@pytest.mark.parametrize("n_events, top", [(5_000, 90), (300_000, 1 << 39)])  # packed values; argsort fallback
def test_polars_key_order_groups_every_event_by_key(n_events, top):
    """The Polars engine's key sort, on keys small enough to pack with the row number and on
    keys too wide for that: a permutation of the rows whose keys are ascending."""
    import polars as pl

    from hsm.mining.engines.polars_engine import _key_order
    from hsm.mining.state import IDX_BITS

    rng = np.random.default_rng(n_events)
    keys = (rng.integers(0, 3, n_events) << IDX_BITS) | rng.integers(0, top, n_events)
    events = pa.table({"key": keys, "global_step": np.zeros(n_events, np.int64),
                       "rank": np.zeros(n_events, np.int32), "position": np.zeros(n_events, np.int32)})
    order, sorted_keys = _key_order(events, pl.from_arrow(events))
    assert np.array_equal(np.sort(order), np.arange(n_events))
    assert np.array_equal(sorted_keys, keys[order])
    assert np.array_equal(sorted_keys, np.sort(keys))


@settings(max_examples=80, deadline=None)
@given(a=st.sets(st.integers(0, 60)), b=st.sets(st.integers(0, 60)))
def test_merge_sorted_keys_equals_the_naive_union(a, b):
    """The merge of the carried state's keys with the epoch's: its naive definition."""
    from hsm.mining.engines.kernels import merge_sorted_keys

    a_keys, b_keys = np.array(sorted(a), dtype=np.int64), np.array(sorted(b), dtype=np.int64)
    merged, a_at, b_at = merge_sorted_keys(a_keys, b_keys)
    union = sorted(a | b)
    row = {k: i for i, k in enumerate(union)}
    assert merged.tolist() == union
    assert b_at.tolist() == [row[k] for k in sorted(b)]
    if a_at is None:
        assert b <= a
    else:
        assert a_at.tolist() == [row[k] for k in sorted(a)]
