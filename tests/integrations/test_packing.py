"""Padding-free batches: per-sample statistics split by the sequence boundaries equal each sample alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm.data.encoding import ROLE_COORD, ROLE_LABEL, ROLE_OTHER
from hsm.data.meta import SampleMeta
from hsm.integrations.collator import MetaCollator, packed_layout
from hsm.train.stats import packed_sample_stats, per_sample_stats, token_losses, token_samples

VOCAB = 9


def random_sample(generator: torch.Generator, length: int) -> dict[str, torch.Tensor]:
    labels = torch.randint(0, VOCAB, (length,), generator=generator)
    labels[torch.rand(length, generator=generator) < 0.3] = -100  # the first label is often supervised: never counted
    roles = torch.tensor([ROLE_OTHER, ROLE_COORD, ROLE_LABEL])[torch.randint(0, 3, (length,), generator=generator)]
    logits = torch.randn((length, VOCAB), generator=generator)
    return {"logits": logits, "labels": labels, "roles": roles.to(torch.int8)}


def alone(samples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Oracle: each sample as its own batch of one, a loop over samples."""
    columns = []
    for s in samples:
        losses, mask, correct = token_losses(s["logits"][None], s["labels"][None])
        columns.append(per_sample_stats(losses, mask, correct, s["roles"][None])[:, 0])
    return torch.stack(columns, dim=1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(2, 9), min_size=1, max_size=5),
       n_pad=st.integers(0, 3))
def test_packed_statistics_equal_each_sample_alone(seed, lengths, n_pad):
    generator = torch.Generator().manual_seed(seed)
    samples = [random_sample(generator, n) for n in lengths]
    # One row, as padding-free collators build it, padded as TRL pads: position 0 and label -100 per padding token.
    logits = torch.cat([*(s["logits"] for s in samples), torch.zeros((n_pad, VOCAB))])[None]
    labels = torch.cat([*(s["labels"] for s in samples), torch.full((n_pad,), -100)])[None]
    roles = torch.cat([*(s["roles"] for s in samples), torch.zeros(n_pad, dtype=torch.int8)])[None]
    positions = torch.cat([*(torch.arange(n) for n in lengths), torch.zeros(n_pad, dtype=torch.long)])[None]
    losses, mask, correct = token_losses(logits, labels)
    got = packed_sample_stats(losses, mask, correct, token_samples(positions, len(samples)), len(samples), roles)
    torch.testing.assert_close(got, alone(samples), rtol=1e-5, atol=1e-5, equal_nan=True)


def test_meta_collator_splits_trls_padding_free_batches_like_padded_ones():
    """TRL's own padding-free collator (one row, positions restarting, padded to a multiple of 8): the samples'
    statistics equal the padded collation's, for a model whose logits depend on the token alone."""
    trl = pytest.importorskip("trl.trainer.sft_trainer")
    generator = torch.Generator().manual_seed(0)
    items = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()} for n in (5, 3, 7)]
    for item, supervised in zip(items, (2, 0, 4)):
        n = len(item["input_ids"])
        item["labels"] = [-100] * (n - supervised) + item["input_ids"][n - supervised:]
    table = torch.randn((VOCAB, VOCAB), generator=generator)

    def collate(padding_free: bool) -> dict:
        inner = trl.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free, pad_to_multiple_of=8)
        metas = [SampleMeta(sample_id=f"s{i}", dataset="d", base_idx=i, epoch=0) for i in range(len(items))]
        return MetaCollator(inner)([{**item, "hsm_meta": meta} for item, meta in zip(items, metas)])

    padded, packed = collate(False), collate(True)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] % 8 == 0  # padding past the samples
    assert packed["hsm_meta"].input_len == (5, 3, 7) == padded["hsm_meta"].input_len
    want = per_sample_stats(*token_losses(table[padded["input_ids"]], padded["labels"]))
    meta = packed["hsm_meta"]
    got = packed_sample_stats(*token_losses(table[packed["input_ids"]], packed["labels"]), meta.token_sample, 3)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert got[2].tolist() == [2, 0, 4]  # n_tokens: the middle sample has no supervised token


def test_packed_layout_refuses_a_batch_it_cannot_split():
    batch = {"input_ids": torch.ones((1, 6), dtype=torch.long), "labels": torch.ones((1, 6), dtype=torch.long)}
    with pytest.raises(ValueError, match="no 2-D position_ids"):
        packed_layout(batch, 2)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="1 position-0 restarts"):
        packed_layout(batch, 2)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 0]])  # a third sequence with a supervised label
    with pytest.raises(ValueError, match="3 position-0 restarts"):
        packed_layout(batch, 2)
    batch["labels"][0, 5] = -100
    owners, lengths = packed_layout(batch, 2)
    assert owners.tolist() == [[-1, 0, 0, -1, 1, -1]] and lengths == [3, 2]
