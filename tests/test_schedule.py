"""Schedule and sampler properties (pure numpy, any world size on one CPU)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm.plan import Plan
from hsm.schedule import (
    World,
    build_schedule,
    cycled_target,
    epoch_length,
    hard_slots_per_batch,
    shard_positions,
    source_quota,
    systematic_counts,
)


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
    s = build_schedule(plan, n_target=n, source_sizes=[4], source_ratios=[0.5], seed=seed, epoch=2, target_epoch_size=size)
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


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), size=st.integers(1, 200), seed=st.integers(0, 9), ratios=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.5]), max_size=3),
       mode=st.sampled_from(["fixed_set", "reweight", "dynamic"]))
def test_every_epoch_has_the_length_fixed_when_the_run_starts(n, size, seed, ratios, mode):
    # The Trainer counts steps per epoch once; before and after the plan, every epoch fills exactly that.
    size = size if mode == "fixed_set" else None
    length = epoch_length(n, ratios, size)
    sizes = [7] * len(ratios)
    for epoch in range(3):
        before = build_schedule(None, n_target=n, source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch,
                                target_epoch_size=size, batch_size=3)
        hard = np.arange(max(1, n // 3))
        after = build_schedule(make_plan(mode, n, hard, regular_idx=np.arange(n // 3, n // 2)), n_target=n,
                               source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch, target_epoch_size=size, batch_size=3)
        for schedule in (before, after):
            assert len(schedule) == length
            assert (schedule.dataset == 0).sum() == (size or n)
            for k, ratio in enumerate(ratios, start=1):
                assert (schedule.dataset == k).sum() == source_quota(ratio, n)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), count=st.integers(1, 100), seed=st.integers(0, 9), epochs=st.integers(1, 5))
def test_target_cycle_sees_the_whole_target_before_repeating(n, count, seed, epochs):
    drawn = np.concatenate([cycled_target(n, count, seed=seed, epoch=e) for e in range(epochs)])
    # Naive oracle: the same permutations concatenated, then sliced.
    passes = -(-count * epochs // n)
    naive = np.concatenate([np.random.default_rng([seed, c, 8]).permutation(n) for c in range(passes)])[:count * epochs]
    assert np.array_equal(drawn, naive)
    for start in range(0, len(drawn) - n + 1, n):  # every aligned window of n draws is the whole target once
        assert sorted(drawn[start:start + n].tolist()) == list(range(n))


def test_source_quota_is_exact_on_the_decimal_ratio():
    # 0.35 * 10 is 3.4999999999999996 as floats; half up on the decimal is 4.
    assert source_quota(0.35, 10) == 4
    assert source_quota(0.25, 44) == 11 and source_quota(0.5, 44) == 22


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 400), batch=st.integers(1, 64), world=st.integers(1, 8), frac=st.sampled_from([0.05, 0.1, 0.3, 0.33, 0.5, 0.7, 1.0]),
       ratio=st.sampled_from([0.0, 0.25, 0.5]), seed=st.integers(0, 5))
def test_dynamic_hard_share_is_the_configured_one_at_every_batch_and_world_size(n, batch, world, frac, ratio, seed):
    hard = np.arange(max(1, n // 2))
    plan = make_plan("dynamic", n, hard, frac=frac)
    s = build_schedule(plan, n_target=n, source_sizes=[5], source_ratios=[ratio], seed=seed, epoch=2, batch_size=batch)
    target = s.dataset == 0
    if len(hard) < n:
        assert abs(s.is_hard.sum() - frac * target.sum()) <= 1  # over the epoch: within one slot
        for start in range(0, len(s), batch):  # each batch as even as its size allows
            t = int(target[start:start + batch].sum())
            assert abs(int(s.is_hard[start:start + batch].sum()) - frac * t) < 1
    # What the ranks train on (whole batches dealt round robin) holds every slot of the schedule.
    dealt = np.concatenate([shard_positions(len(s), batch, World(r, world)) for r in range(world)])
    assert set(dealt.tolist()) == set(range(len(s)))


def test_batch_size_one_still_mixes_hard_samples():
    # The field-test defect: at batch size 1, round(0.3 * 1) = 0 gave no hard slot at all.
    per_batch = hard_slots_per_batch(np.ones(100, dtype=np.int64), 0.3)
    assert per_batch.sum() == 30 and set(per_batch.tolist()) == {0, 1}
    assert np.abs(np.cumsum(per_batch) - 0.3 * np.arange(1, 101)).max() <= 0.5  # spread, not bunched
