"""The sampler on N ranks: what accelerate's batch sharding really repeats, and what hsm's own dealing drops."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler

from hsm.data.sampler import HsmSampler
from hsm.mining.plan import DatasetInfo
from hsm.world import World


def sampler(n_target: int, n_source: int, batch: int, world: World | None = None) -> HsmSampler:
    ratios = [n_source / n_target] if n_source else []
    sizes = [n_target, n_source] if n_source else [n_target]
    return HsmSampler(sizes=sizes, ratios=ratios, target=DatasetInfo("t", n_target), seed=3, batch_size=batch,
                      world=world)


@settings(max_examples=60, deadline=None)
@given(n_target=st.integers(1, 40), n_source=st.integers(0, 20), batch=st.integers(1, 5), ranks=st.integers(2, 4))
def test_the_repeat_warning_counts_what_accelerate_repeats(n_target, n_source, batch, ranks):
    one = sampler(n_target, n_source, batch)
    assert one.warn_uneven_ranks(1) == 0  # one process: accelerate does not shard
    dealt = Counter()
    for rank in range(ranks):  # accelerate's own sharding, as the Trainer prepares the loader (even_batches)
        shard = BatchSamplerShard(BatchSampler(one, batch, drop_last=False), num_processes=ranks, process_index=rank)
        dealt.update(slot[-1] for b in shard for slot in b)  # slot[-1]: its position in the epoch
    assert set(dealt) == set(range(one.epoch_length))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        repeats = one.warn_uneven_ranks(ranks)
    assert repeats == sum(dealt.values()) - one.epoch_length
    assert (len(caught) == 1) == (repeats > 0)
    if repeats:
        assert f"repeats the epoch's first {repeats} slot(s)" in str(caught[0].message)


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_sampler_that_deals_its_ranks_repeats_nothing_and_keeps_source_shares(ranks):
    # ms-swift's case: 146 target rows and a source of 50 (its #50), batch 4; the schedule holds 146 + 50.
    shards = [list(sampler(146, 50, 4, World(r, ranks))) for r in range(ranks)]
    assert len({len(s) for s in shards}) == 1
    positions = [slot[-1] for s in shards for slot in s]
    assert len(positions) == len(set(positions)) == 196 - 196 % ranks
    counts = Counter(slot[0] for s in shards for slot in s)
    whole = Counter(slot[0] for slot in sampler(146, 50, 4))
    assert whole == {0: 146, 1: 50}
    assert sum(whole[c] - counts[c] for c in whole) == 196 % ranks  # only the < ranks last slots go untrained
    left = 196 % ranks  # the slots no rank trains: said once at start-up, never repeated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sampler(146, 50, 4, World(0, ranks)).warn_uneven_ranks(ranks) == -left
    assert [str(w.message).count(f"the last {left} slot(s) of each epoch are not trained") for w in caught] == (
        [1] if left else [])


@settings(max_examples=200, deadline=None)
@given(n_slots=st.integers(0, 500), batch_size=st.integers(1, 9), ranks=st.integers(2, 8))
def test_the_slots_no_rank_trains_are_the_epoch_length_modulo_the_ranks(n_slots, batch_size, ranks):
    """What warn_uneven_ranks reports as left out, against the ranks' shards themselves."""
    from hsm.data.schedule import shard_positions

    dealt = [shard_positions(n_slots, batch_size, World(r, ranks)) for r in range(ranks)]
    assert n_slots - sum(len(d) for d in dealt) == n_slots % ranks
    assert len(np.unique(np.concatenate(dealt))) == sum(len(d) for d in dealt)
