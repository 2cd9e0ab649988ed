"""Schedule and sampler properties (pure numpy, any world size on one CPU)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm.plan import Plan
from hsm.schedule import World, build_schedule, shard_positions, source_quota, systematic_counts


def make_plan(mode, n, hard_idx, weight_hard=3.0, *, target_epoch_size=None, frac=0.3, regular_idx=()):
    base = np.arange(n)
    is_hard = np.isin(base, hard_idx)
    if mode == "reweight":
        weight, default = np.where(is_hard, weight_hard, 1.0), 1.0
    elif mode == "fixed_set":
        weight, default = (is_hard | np.isin(base, regular_idx)).astype(float), 0.0
    else:
        weight, default = np.ones(n), 1.0
    manifest = {"mode": mode, "triggered": True, "default_weight": default, "target_epoch_size": target_epoch_size,
                "hard_pool_frac": frac, "checksum": "x"}
    return Plan(manifest=manifest, base_idx=base, is_hard=is_hard, weight=weight)


sources_st = st.lists(st.tuples(st.integers(1, 30), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])), max_size=3)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), sources=sources_st, seed=st.integers(0, 50), epoch=st.integers(0, 5))
def test_no_plan_covers_target_once_and_source_quotas_exact(n, sources, seed, epoch):
    sizes, ratios = [s for s, _ in sources], [r for _, r in sources]
    s = build_schedule(None, n_target=n, source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch)
    assert sorted(s.base_idx[s.dataset == 0].tolist()) == list(range(n))
    for k, (size, ratio) in enumerate(sources, start=1):
        assert (s.dataset == k).sum() == math.floor(ratio * n + 0.5)
        assert (s.base_idx[s.dataset == k] < size).all()
    again = build_schedule(None, n_target=n, source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch)
    assert np.array_equal(s.base_idx, again.base_idx) and np.array_equal(s.dataset, again.dataset)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 200), n_hard=st.integers(0, 50), weight=st.floats(1.0, 6.0), seed=st.integers(0, 50), ratio=st.sampled_from([0.0, 0.3]))
def test_reweight_counts_within_floor_and_ceiling(n, n_hard, weight, seed, ratio):
    hard = np.arange(min(n_hard, n))
    plan = make_plan("reweight", n, hard, weight)
    s = build_schedule(plan, n_target=n, source_sizes=[7], source_ratios=[ratio], seed=seed, epoch=1)
    counts = np.bincount(s.base_idx[s.dataset == 0], minlength=n)
    w = plan.target_weights(n)
    expected = n * w / w.sum()
    assert counts.sum() == n  # epoch length constant
    assert (counts >= np.floor(expected - 1e-9)).all() and (counts <= np.ceil(expected + 1e-9)).all()
    assert (s.dataset == 1).sum() == source_quota(ratio, n)  # sources untouched by the plan
    assert np.array_equal(s.is_hard[s.dataset == 0], np.isin(s.base_idx[s.dataset == 0], hard))
    assert not s.is_hard[s.dataset != 0].any()


@settings(max_examples=50, deadline=None)
@given(n=st.integers(5, 100), hard=st.integers(1, 20), regular=st.integers(0, 20), size=st.one_of(st.none(), st.integers(1, 150)), seed=st.integers(0, 9))
def test_fixed_set_shows_only_the_chosen_samples(n, hard, regular, size, seed):
    hard_idx = np.arange(min(hard, n))
    regular_idx = np.arange(min(hard, n), min(hard + regular, n))
    plan = make_plan("fixed_set", n, hard_idx, target_epoch_size=size, regular_idx=regular_idx)
    s = build_schedule(plan, n_target=n, source_sizes=[4], source_ratios=[0.5], seed=seed, epoch=2)
    target = s.base_idx[s.dataset == 0]
    chosen = set(hard_idx) | set(regular_idx)
    assert set(target.tolist()) <= chosen
    assert len(target) == (size or n)
    counts = np.bincount(target, minlength=n)[sorted(chosen)]
    assert counts.max() - counts.min() <= 1
    assert (s.dataset == 1).sum() == source_quota(0.5, n)  # quota from the base target size


@settings(max_examples=60, deadline=None)
@given(n=st.integers(4, 120), pool=st.integers(1, 60), frac=st.sampled_from([0.1, 0.3, 0.5]), batch=st.integers(1, 9), ratio=st.sampled_from([0.0, 0.4]), seed=st.integers(0, 9))
def test_dynamic_batches_mix_at_the_fixed_ratio(n, pool, frac, batch, ratio, seed):
    hard = np.arange(min(pool, n))
    plan = make_plan("dynamic", n, hard, frac=frac)
    s = build_schedule(plan, n_target=n, source_sizes=[5], source_ratios=[ratio], seed=seed, epoch=3, batch_size=batch)
    assert (s.dataset == 0).sum() == n
    hard_slots = 0
    for start in range(0, len(s), batch):
        sl = slice(start, start + batch)
        t = int((s.dataset[sl] == 0).sum())
        h = int(s.is_hard[sl].sum())
        if len(hard) < n:
            assert abs(h - frac * t) <= 1
        hard_slots += h
    assert np.isin(s.base_idx[s.is_hard], hard).all()
    assert not np.isin(s.base_idx[(s.dataset == 0) & ~s.is_hard], hard).any() or len(hard) == n
    assert s.shortfall == max(0, hard_slots - len(hard))
    before = build_schedule(None, n_target=n, source_sizes=[5], source_ratios=[ratio], seed=seed, epoch=3, batch_size=batch)
    assert not before.is_hard.any()


def test_other_epoch_other_schedule():
    a = build_schedule(None, n_target=50, source_sizes=[9], source_ratios=[0.5], seed=1, epoch=0)
    b = build_schedule(None, n_target=50, source_sizes=[9], source_ratios=[0.5], seed=1, epoch=1)
    assert not np.array_equal(a.base_idx, b.base_idx)


@settings(max_examples=100, deadline=None)
@given(n_slots=st.integers(1, 300), batch=st.integers(1, 8), world_size=st.integers(1, 8))
def test_rank_shards_union_is_the_global_schedule(n_slots, batch, world_size):
    shards = [shard_positions(n_slots, batch, World(r, world_size)) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # every rank steps the same number of times
    dealt = []
    rounds = len(shards[0]) // batch if world_size > 1 else 1
    for k in range(rounds if world_size > 1 else 1):
        for shard in shards:
            dealt.extend(shard[k * batch:(k + 1) * batch].tolist() if world_size > 1 else shard.tolist())
    assert dealt[:n_slots] == list(range(n_slots))  # whole batches dealt round robin, in order
    assert set(dealt) == set(range(n_slots))


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=60), total=st.integers(0, 200), seed=st.integers(0, 99))
def test_systematic_counts(weights, total, seed):
    w = np.array(weights)
    counts = systematic_counts(w, total, np.random.default_rng(seed))
    if w.sum() <= 0:
        assert counts.sum() == 0
        return
    expected = total * w / w.sum()
    assert counts.sum() == total
    assert (counts >= np.floor(expected - 1e-9)).all() and (counts <= np.ceil(expected + 1e-9)).all()
