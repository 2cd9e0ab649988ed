"""hsm's one-pass loss against transformers' own causal-LM loss: bit-identical loss and gradient, and per-token
statistics equal to a naive recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.loss.loss_utils import ForCausalLMLoss

from hsm.data.encoding import supervised_positions
from hsm.train.stats import causal_lm_loss


def random_batch(seed: int, batch: int, seq: int, vocab: int, supervised_share: float):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, seq, vocab), generator=generator) * 4
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand((batch, seq), generator=generator) >= supervised_share] = -100
    return logits, labels


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), seq=st.integers(2, 600), share=st.sampled_from([1.0, 0.25, 0.05]),
       num_items=st.one_of(st.none(), st.integers(1, 5000)), bf16=st.booleans())
def test_loss_and_gradient_are_bit_identical_to_transformers(seed, batch, seq, share, num_items, bf16):
    logits, labels = random_batch(seed, batch, seq, 37, share)
    if bf16:
        logits = logits.to(torch.bfloat16)
    items = torch.tensor(num_items) if num_items is not None else None
    plain_logits = logits.clone().requires_grad_(True)
    hsm_logits = logits.clone().requires_grad_(True)
    plain = ForCausalLMLoss(plain_logits, labels, 37, num_items_in_batch=items)
    plain.backward()
    loss, losses, mask, correct = causal_lm_loss(hsm_logits, labels, items, supervised_positions(labels), chunk_tokens=7)
    loss.backward()
    assert torch.equal(loss, plain) or (plain.isnan() and loss.isnan())  # a batch without labels is 0 / 0 in both
    assert torch.equal(hsm_logits.grad, plain_logits.grad)
    # Per-token values against the naive per-position computation.
    shift = labels[:, 1:]
    want = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shift.flatten(), reduction="none", ignore_index=-100)
    assert torch.equal(mask, shift != -100)
    torch.testing.assert_close(losses.flatten(), want, rtol=0, atol=0)
    assert torch.equal(correct, (logits[:, :-1].argmax(-1) == shift) & mask)
    assert not losses.requires_grad
    # An argmax the trainer already took (ms-swift's token accuracy) gives the same flags without another one.
    reused = causal_lm_loss(logits, labels, items, predictions=logits.argmax(-1))[3]
    assert torch.equal(reused, correct)


def test_supervised_positions_follow_the_naive_loop():
    _, labels = random_batch(3, 3, 17, 5, 0.3)
    seq = labels.shape[1]
    naive = [r * seq + t for r in range(labels.shape[0]) for t in range(seq - 1) if labels[r, t + 1] != -100]
    assert supervised_positions(labels).tolist() == naive


def test_the_argmax_reads_only_the_supervised_positions():
    # Positions outside the index never reach the argmax: NaN logits there leave the flags untouched.
    logits, labels = random_batch(5, 2, 12, 9, 0.5)
    unsupervised = F.pad(labels[:, 1:] == -100, (0, 1), value=True)
    logits[unsupervised] = float("nan")
    _, _, mask, correct = causal_lm_loss(logits, labels, supervised=supervised_positions(labels))
    clean = torch.where(unsupervised[..., None], 0.0, logits)
    assert torch.equal(correct, (clean[:, :-1].argmax(-1) == labels[:, 1:]) & mask)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 40), n_samples=st.integers(1, 4), roles=st.booleans())
def test_one_scatter_add_folds_every_sample_role_and_total(seed, tokens, n_samples, roles):
    from hsm.train.stats import fold_tokens

    generator = torch.Generator().manual_seed(seed)
    losses = torch.rand(tokens, generator=generator)
    counted = torch.rand(tokens, generator=generator) < 0.7
    correct = torch.rand(tokens, generator=generator) < 0.5
    owner = torch.randint(-1, n_samples, (tokens,), generator=generator)
    counted &= owner >= 0
    role = torch.randint(0, 3, (tokens,), generator=generator, dtype=torch.int8)
    table = fold_tokens(losses, counted, correct, owner, n_samples, role if roles else None)
    for i in range(n_samples):
        for slot in range(4):
            picked = [t for t in range(tokens) if counted[t] and owner[t] == i
                      and (slot == 3 or (role[t] if roles else 0) == slot)]
            want = [sum(losses[t].item() for t in picked), len(picked), sum(bool(correct[t]) for t in picked)]
            assert table[i, slot].tolist() == pytest.approx(want, rel=1e-6, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host syncs only exist there)")
def test_loss_and_statistics_make_no_host_sync():
    from hsm.train.stats import per_sample_stats

    logits, labels = random_batch(0, 2, 512, 1000, 0.25)
    roles = torch.randint(0, 3, labels.shape, dtype=torch.int8)
    supervised = supervised_positions(labels).pin_memory()
    logits = logits.cuda().to(torch.bfloat16).requires_grad_(True)
    labels, roles = labels.cuda(), roles.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, losses, mask, correct = causal_lm_loss(logits, labels, None, supervised)
        stats = per_sample_stats(losses, mask, correct, roles)
        loss.backward()
        host = stats.to("cpu", non_blocking=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert host.shape == (6, 2)
