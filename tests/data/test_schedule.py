"""Schedule and sampler properties (pure numpy, any world size on one CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import pack_slots, plan_from_rows
from hsm.data.draws import epoch_length, source_quota, systematic_counts
from hsm.data.mixer import hard_slots_per_batch
from hsm.data.schedule import Schedule, build_schedule, shard_positions, slot_bits
from hsm.data.shuffles import CHUNK_SLOTS, cycled_target, random_permutation
from hsm.world import World


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
    return plan_from_rows(manifest, base, is_hard, weight, n)


# Chunks of a few slots cross every chunk boundary with tiny epochs; the default is what runs.
chunk_st = st.sampled_from([1, 2, 3, 7, 16, CHUNK_SLOTS])
sources_st = st.lists(st.tuples(st.integers(1, 30), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])), max_size=3)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), sources=sources_st, seed=st.integers(0, 50), epoch=st.integers(0, 5), chunk=chunk_st)
def test_no_plan_covers_target_once_and_source_quotas_exact(n, sources, seed, epoch, chunk):
    sizes, ratios = [s for s, _ in sources], [r for _, r in sources]
    s = build_schedule(None, n_target=n, source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch, chunk_slots=chunk)
    assert sorted(s.base_idx[s.dataset == 0].tolist()) == list(range(n))
    for k, (size, ratio) in enumerate(sources, start=1):
        assert (s.dataset == k).sum() == math.floor(ratio * n + 0.5)
        assert (s.base_idx[s.dataset == k] < size).all()
    again = build_schedule(None, n_target=n, source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch, chunk_slots=chunk)
    assert np.array_equal(s.base_idx, again.base_idx) and np.array_equal(s.dataset, again.dataset)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 200), n_hard=st.integers(0, 50), weight=st.floats(1.0, 6.0), seed=st.integers(0, 50), ratio=st.sampled_from([0.0, 0.3]),
       chunk=chunk_st)
def test_reweight_counts_within_floor_and_ceiling(n, n_hard, weight, seed, ratio, chunk):
    hard = np.arange(min(n_hard, n))
    plan = make_plan("reweight", n, hard, weight)
    s = build_schedule(plan, n_target=n, source_sizes=[7], source_ratios=[ratio], seed=seed, epoch=1, chunk_slots=chunk)
    counts = np.bincount(s.base_idx[s.dataset == 0], minlength=n)
    w = plan.weight
    expected = n * w / w.sum()
    assert counts.sum() == n  # epoch length constant
    assert (counts >= np.floor(expected - 1e-9)).all() and (counts <= np.ceil(expected + 1e-9)).all()
    assert (s.dataset == 1).sum() == source_quota(ratio, n)  # sources untouched by the plan
    assert np.array_equal(s.is_hard[s.dataset == 0], np.isin(s.base_idx[s.dataset == 0], hard))
    assert not s.is_hard[s.dataset != 0].any()


@settings(max_examples=50, deadline=None)
@given(n=st.integers(5, 100), hard=st.integers(1, 20), regular=st.integers(0, 20), size=st.one_of(st.none(), st.integers(1, 150)), seed=st.integers(0, 9),
       chunk=chunk_st)
def test_fixed_set_shows_only_the_chosen_samples(n, hard, regular, size, seed, chunk):
    hard_idx = np.arange(min(hard, n))
    regular_idx = np.arange(min(hard, n), min(hard + regular, n))
    plan = make_plan("fixed_set", n, hard_idx, target_epoch_size=size, regular_idx=regular_idx)
    s = build_schedule(plan, n_target=n, source_sizes=[4], source_ratios=[0.5], seed=seed, epoch=2, target_epoch_size=size,
                       chunk_slots=chunk)
    target = s.base_idx[s.dataset == 0]
    chosen = set(hard_idx) | set(regular_idx)
    assert set(target.tolist()) <= chosen
    assert len(target) == (size or n)
    counts = np.bincount(target, minlength=n)[sorted(chosen)]
    assert counts.max() - counts.min() <= 1
    assert (s.dataset == 1).sum() == source_quota(0.5, n)  # quota from the base target size


@settings(max_examples=60, deadline=None)
@given(n=st.integers(4, 120), pool=st.integers(1, 60), frac=st.sampled_from([0.1, 0.3, 0.5]), batch=st.integers(1, 9), ratio=st.sampled_from([0.0, 0.4]), seed=st.integers(0, 9), chunk=chunk_st)
def test_dynamic_batches_mix_at_the_fixed_ratio(n, pool, frac, batch, ratio, seed, chunk):
    hard = np.arange(min(pool, n))
    plan = make_plan("dynamic", n, hard, frac=frac)
    s = build_schedule(plan, n_target=n, source_sizes=[5], source_ratios=[ratio], seed=seed, epoch=3, batch_size=batch,
                       chunk_slots=chunk)
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
    # Each pool is cycled a whole permutation at a time: counts differ by at most one within a pool.
    for pool_idx, drawn in ((hard, s.base_idx[s.is_hard]), (np.setdiff1d(np.arange(n), hard), s.base_idx[(s.dataset == 0) & ~s.is_hard])):
        if len(drawn) and len(pool_idx):
            seen = np.bincount(drawn, minlength=n)[pool_idx]
            assert seen.max() - seen.min() <= 1
    before = build_schedule(None, n_target=n, source_sizes=[5], source_ratios=[ratio], seed=seed, epoch=3, batch_size=batch)
    assert not before.is_hard.any()


def test_other_epoch_other_schedule():
    a = build_schedule(None, n_target=50, source_sizes=[9], source_ratios=[0.5], seed=1, epoch=0)
    b = build_schedule(None, n_target=50, source_sizes=[9], source_ratios=[0.5], seed=1, epoch=1)
    assert not np.array_equal(a.base_idx, b.base_idx)


def dealt_by_hand(n_slots: int, batch: int, world_size: int) -> list[list[int]]:
    """ms-swift's dealing, slowly: whole batches to rank 0, 1, ... while a whole round is left; then
    each rank takes an equal shorter batch of the rest; the last < world_size slots are not dealt."""
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    start = 0
    while n_slots - start >= world_size * batch:
        for r in range(world_size):
            ranks[r].extend(range(start, start + batch))
            start += batch
    share = (n_slots - start) // world_size
    for r in range(world_size):
        ranks[r].extend(range(start, start + share))
        start += share
    return ranks


@settings(max_examples=100, deadline=None)
@given(n_slots=st.integers(1, 300), batch=st.integers(1, 8), world_size=st.integers(1, 8))
def test_rank_shards_deal_whole_batches_and_never_repeat_a_slot(n_slots, batch, world_size):
    shards = [shard_positions(n_slots, batch, World(r, world_size)).tolist() for r in range(world_size)]
    assert shards == dealt_by_hand(n_slots, batch, world_size)
    # As ms-swift's BatchSamplerShard: n // world_size slots per rank, so every rank steps the same number of
    # times; no slot twice; the fewer than world_size slots not dealt are the schedule's last.
    assert all(len(s) == n_slots // world_size for s in shards)
    dealt = [p for s in shards for p in s]
    assert len(dealt) == len(set(dealt)) and sorted(dealt) == list(range(len(dealt)))
    assert n_slots - len(dealt) < world_size


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
       mode=st.sampled_from(["fixed_set", "reweight", "dynamic"]), chunk=chunk_st)
def test_every_epoch_has_the_length_fixed_when_the_run_starts(n, size, seed, ratios, mode, chunk):
    # The Trainer counts steps per epoch once; before and after the plan, every epoch fills exactly that.
    size = size if mode == "fixed_set" else None
    length = epoch_length(n, ratios, size)
    sizes = [7] * len(ratios)
    for epoch in range(3):
        before = build_schedule(None, n_target=n, source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch,
                                target_epoch_size=size, batch_size=3, chunk_slots=chunk)
        hard = np.arange(max(1, n // 3))
        after = build_schedule(make_plan(mode, n, hard, regular_idx=np.arange(n // 3, n // 2)), n_target=n,
                               source_sizes=sizes, source_ratios=ratios, seed=seed, epoch=epoch, target_epoch_size=size, batch_size=3,
                               chunk_slots=chunk)
        for schedule in (before, after):
            assert len(schedule) == length
            assert (schedule.dataset == 0).sum() == (size or n)
            for k, ratio in enumerate(ratios, start=1):
                assert (schedule.dataset == k).sum() == source_quota(ratio, n)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), count=st.integers(1, 100), seed=st.integers(0, 9), epochs=st.integers(1, 5), chunk=chunk_st)
def test_target_cycle_sees_the_whole_target_before_repeating(n, count, seed, epochs, chunk):
    drawn = np.concatenate([cycled_target(n, count, seed=seed, epoch=e, chunk_slots=chunk) for e in range(epochs)])
    # Naive oracle: the same permutations concatenated, then sliced.
    passes = -(-count * epochs // n)
    naive = np.concatenate([random_permutation(n, np.random.default_rng([seed, c, 8]), chunk_slots=chunk)
                            for c in range(passes)])[:count * epochs]
    assert np.array_equal(drawn, naive)
    for start in range(0, len(drawn) - n + 1, n):  # every aligned window of n draws is the whole target once
        assert sorted(drawn[start:start + n].tolist()) == list(range(n))


def test_source_quota_is_exact_on_the_decimal_ratio():
    # 0.35 * 10 is 3.4999999999999996 as floats; half up on the decimal is 4.
    assert source_quota(0.35, 10) == 4
    assert source_quota(0.25, 44) == 11 and source_quota(0.5, 44) == 22


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 400), batch=st.integers(1, 64), world=st.integers(1, 8), frac=st.sampled_from([0.05, 0.1, 0.3, 0.33, 0.5, 0.7, 1.0]),
       ratio=st.sampled_from([0.0, 0.25, 0.5]), seed=st.integers(0, 5), chunk=chunk_st)
def test_dynamic_hard_share_is_the_configured_one_at_every_batch_and_world_size(n, batch, world, frac, ratio, seed, chunk):
    hard = np.arange(max(1, n // 2))
    plan = make_plan("dynamic", n, hard, frac=frac)
    s = build_schedule(plan, n_target=n, source_sizes=[5], source_ratios=[ratio], seed=seed, epoch=2, batch_size=batch,
                       chunk_slots=chunk)
    target = s.dataset == 0
    if len(hard) < n:
        assert abs(s.is_hard.sum() - frac * target.sum()) <= 1  # over the epoch: within one slot
        for start in range(0, len(s), batch):  # each batch as even as its size allows
            t = int(target[start:start + batch].sum())
            assert abs(int(s.is_hard[start:start + batch].sum()) - frac * t) < 1
    # What the ranks train on (whole batches dealt round robin) holds every slot of the schedule but
    # the fewer than `world` last ones, each once.
    dealt = np.concatenate([shard_positions(len(s), batch, World(r, world)) for r in range(world)])
    assert len(set(dealt.tolist())) == len(dealt) and set(dealt.tolist()) == set(range(len(s) - len(s) % world))


def test_batch_size_one_still_mixes_hard_samples():
    # The field-test defect: at batch size 1, round(0.3 * 1) = 0 gave no hard slot at all.
    per_batch = hard_slots_per_batch(np.ones(100, dtype=np.int64), 0.3)
    assert per_batch.sum() == 30 and set(per_batch.tolist()) == {0, 1}
    assert np.abs(np.cumsum(per_batch) - 0.3 * np.arange(1, 101)).max() <= 0.5  # spread, not bunched


def one_shot_systematic_counts(weights, total, offset):
    """The whole-array formula the chunked version must equal bit for bit."""
    cumulative = np.cumsum(weights / weights.sum()) * total
    cumulative[-1] = total
    return np.diff(np.ceil(cumulative - offset).astype(np.int64), prepend=0)


@settings(max_examples=150, deadline=None)
@given(weights=st.lists(st.one_of(st.floats(0.0, 10.0), st.floats(0.0, 1e-300), st.sampled_from([0.0, 1.0, 3.0, 0.1])),
                        min_size=1, max_size=80),
       total=st.integers(0, 500), seed=st.integers(0, 99), chunk=st.integers(1, 9))
def test_chunked_systematic_counts_equal_the_one_shot_formula(weights, total, seed, chunk):
    w = np.array(weights)
    if w.sum() <= 0 or total == 0:
        assert not systematic_counts(w, total, np.random.default_rng(seed), chunk_slots=chunk).any()
        return
    offset = np.random.default_rng(seed).random()
    expected = one_shot_systematic_counts(w, total, offset)
    for size in (chunk, CHUNK_SLOTS):
        assert np.array_equal(systematic_counts(w, total, np.random.default_rng(seed), chunk_slots=size), expected)


def test_systematic_counts_refuse_bad_weights():
    for bad in ([1.0, np.nan], [1.0, np.inf], [1.0, -0.5]):
        with pytest.raises(ValueError, match="finite and non-negative"):
            systematic_counts(np.array(bad), 3, np.random.default_rng(0))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), seed=st.integers(0, 99), chunk=chunk_st)
def test_random_permutation_is_a_deterministic_permutation(n, seed, chunk):
    perm = random_permutation(n, np.random.default_rng(seed), dtype=np.int32, chunk_slots=chunk)
    assert perm.dtype == np.int32 and sorted(perm.tolist()) == list(range(n))
    assert np.array_equal(perm, random_permutation(n, np.random.default_rng(seed), chunk_slots=chunk))


def chi_square(observed: np.ndarray) -> float:
    expected = observed.sum() / len(observed)
    return float(((observed - expected) ** 2 / expected).sum())


def test_random_permutation_is_uniform():
    # Small: one shuffle. Every order of 4 items equally often; 23 degrees of freedom, 0.999 quantile 49.7.
    orders = {}
    for seed in range(12_000):
        key = tuple(random_permutation(4, np.random.default_rng(seed), chunk_slots=1).tolist())
        orders[key] = orders.get(key, 0) + 1
    assert len(orders) == 24
    assert chi_square(np.array(list(orders.values()))) < 49.7


@pytest.mark.parametrize("chunk", [1, 2])
def test_random_permutation_is_uniform_across_buckets(chunk):
    # 48 items over more than 16 buckets: the two-level path (shuffled pieces dealt to buckets, buckets shuffled).
    # Where items 0, 1 and 47 land: uniform over the 48 positions (47 degrees of freedom, 0.999 quantile 82.7),
    # and item 0 before item 1 half the time (within 4 sigma).
    n, runs = 48, 3_000
    where = np.array([np.argsort(random_permutation(n, np.random.default_rng(seed), chunk_slots=chunk))[[0, 1, n - 1]]
                      for seed in range(runs)])
    for item in range(3):
        assert chi_square(np.bincount(where[:, item], minlength=n)) < 82.7
    assert abs((where[:, 0] < where[:, 1]).sum() - runs / 2) < 4 * np.sqrt(runs / 4)


def test_schedule_order_is_uniform_over_chunks():
    # Target {0, 1} and one source draw (the source has one sample): the 6 orders equally likely,
    # as one global shuffle gives, with chunks of 2 slots. 5 degrees of freedom: 0.999 quantile 20.5.
    orders = {}
    for seed in range(6_000):
        s = build_schedule(None, n_target=2, source_sizes=[1], source_ratios=[0.5], seed=seed, epoch=0, chunk_slots=2)
        key = tuple(zip(s.dataset.tolist(), s.base_idx.tolist()))
        orders[key] = orders.get(key, 0) + 1
    assert len(orders) == 6
    assert chi_square(np.array(list(orders.values()))) < 20.5


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n_codes=st.integers(1, 8), n=st.integers(0, 50))
def test_int32_and_int64_layouts_decode_alike(data, n_codes, n):
    dtype32, bits32 = slot_bits(1 << 20, n_codes)
    assert dtype32 == np.int32
    max_idx = 1 << bits32
    codes = np.array(data.draw(st.lists(st.integers(0, n_codes - 1), min_size=n, max_size=n)), dtype=np.int64)
    idx = np.array(data.draw(st.lists(st.integers(0, max_idx - 1), min_size=n, max_size=n)), dtype=np.int64)
    hard = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    small = Schedule(slots=pack_slots(codes, idx, hard, dtype32, bits32), epoch=0, idx_bits=bits32)
    wide = Schedule(slots=pack_slots(codes, idx, hard, np.dtype(np.int64), 40), epoch=0, idx_bits=40)
    for s in (small, wide):
        assert s.dataset.tolist() == codes.tolist() and s.base_idx.tolist() == idx.tolist()
        assert s.is_hard.tolist() == hard.tolist()
        assert s.decode(0, n) == (codes.tolist(), idx.tolist(), hard.tolist())
        positions = np.arange(n)[::-1]
        assert s.decode_at(positions) == (codes[::-1].tolist(), idx[::-1].tolist(), hard[::-1].tolist())
    assert (small.slots >= 0).all()  # the sign bit stays clear


def test_layout_is_int32_while_indices_fit():
    assert slot_bits(1 << 27, 5) == (np.dtype(np.int32), 27)
    assert slot_bits((1 << 27) + 1, 5)[0] == np.int64
    assert slot_bits(1 << 29, 2) == (np.dtype(np.int32), 29)
    assert slot_bits(10, 9)[0] == np.int32 and slot_bits(10, 9)[1] == 26


def test_a_large_source_switches_the_schedule_to_int64_slots():
    n, big = 40, (1 << 28) + 5
    s = build_schedule(make_plan("reweight", n, np.arange(5)), n_target=n, source_sizes=[3, big], source_ratios=[0.25, 1.0],
                       seed=4, epoch=1, chunk_slots=16)
    small = build_schedule(make_plan("reweight", n, np.arange(5)), n_target=n, source_sizes=[3, 9], source_ratios=[0.25, 1.0],
                           seed=4, epoch=1, chunk_slots=16)
    assert s.slots.dtype == np.int64 and small.slots.dtype == np.int32
    for schedule, size in ((s, big), (small, 9)):
        assert schedule.counts().tolist() == [n, 10, 40]
        assert (schedule.base_idx[schedule.dataset == 2] < size).all()
        assert np.array_equal(schedule.is_hard, (schedule.dataset == 0) & (schedule.base_idx < 5))
    assert (s.base_idx[s.dataset == 2] >= 1 << 27).any()  # the wide indices survive packing


def test_dynamic_regular_samples_are_a_uniform_subset_of_their_pool():
    # 6 target slots, half hard: 3 regular slots from a pool of 5, dealt over chunks of 2 slots.
    # Each of the 10 subsets equally often (9 degrees of freedom, 0.999 quantile 27.9), each at most once.
    plan = make_plan("dynamic", 6, np.array([0]), frac=0.5)
    subsets = {}
    for seed in range(3_000):
        s = build_schedule(plan, n_target=6, source_sizes=[], source_ratios=[], seed=seed, epoch=0, batch_size=2,
                           chunk_slots=2)
        regular = sorted(s.base_idx[~s.is_hard].tolist())
        assert len(regular) == 3 == len(set(regular)) and 0 not in regular
        subsets[tuple(regular)] = subsets.get(tuple(regular), 0) + 1
    assert len(subsets) == 10
    assert chi_square(np.array(list(subsets.values()))) < 27.9
