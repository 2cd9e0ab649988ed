"""Memory-bounded statistics and answer-token roles for trainers that keep their own loss (TRL, ms-swift)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm.data.encoding import ROLE_COORD, ROLE_LABEL, ROLE_OTHER, grounding_char_roles
from hsm.train.stats import chunked_token_stats, hidden_token_stats, token_losses


def random_batch(seed: int, batch: int, length: int, vocab: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[torch.rand((batch, length), generator=generator) < 0.4] = -100
    return generator, labels


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(2, 19), chunk=st.integers(1, 24))
def test_chunked_statistics_equal_the_one_pass_cross_entropy(seed, batch, length, chunk):
    generator, labels = random_batch(seed, batch, length, vocab=11)
    logits = torch.randn((batch, length, 11), generator=generator).to(torch.bfloat16)
    losses, mask, correct = token_losses(logits, labels)
    got = chunked_token_stats(logits, labels, chunk_tokens=chunk)
    torch.testing.assert_close(got[0], losses.detach(), rtol=0, atol=1e-6)
    assert torch.equal(got[1], mask) and torch.equal(got[2], correct)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(2, 15), chunk=st.integers(1, 16), bias=st.booleans())
def test_hidden_state_statistics_equal_the_materialised_logits(seed, length, chunk, bias):
    generator, labels = random_batch(seed, 2, length, vocab=13)
    hidden = torch.randn((2, length, 8), generator=generator, requires_grad=True)
    torch.manual_seed(seed)
    lm_head = torch.nn.Linear(8, 13, bias=bias)
    losses, mask, correct = token_losses(lm_head(hidden), labels)
    got = hidden_token_stats(hidden, lm_head, labels, chunk_tokens=chunk)
    torch.testing.assert_close(got[0], losses.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], mask) and torch.equal(got[2], correct)
    assert not got[0].requires_grad and hidden.grad is None


_LABEL_TEXT = st.text(alphabet=st.characters(blacklist_characters="<|>\"[]{}", blacklist_categories=("Cs",)), min_size=1,
                      max_size=8)


@settings(max_examples=60, deadline=None)
@given(objects=st.lists(st.tuples(_LABEL_TEXT, st.lists(st.integers(0, 1000), min_size=4, max_size=4)), max_size=4))
def test_grounding_roles_of_qwen_tags_follow_the_written_values(objects):
    # Build ms-swift's legacy Qwen-VL rendering, recording each character's role as it is written.
    text, expected = "", []

    def write(part: str, role: int) -> None:
        nonlocal text
        text += part
        expected.extend([role] * len(part))

    for label, box in objects:
        write("<|object_ref_start|>", ROLE_OTHER)
        write(label, ROLE_LABEL)
        write("<|object_ref_end|><|box_start|>", ROLE_OTHER)
        for k, value in enumerate(box):
            write("(" if k % 2 == 0 else ",", ROLE_OTHER)
            write(str(value), ROLE_COORD)
            if k % 2 == 1:
                write(")" + ("," if k < 3 else ""), ROLE_OTHER)
        write("<|box_end|>", ROLE_OTHER)
    assert grounding_char_roles(text).tolist() == expected


def test_grounding_roles_keep_json_answers():
    answer = '[{"bbox_2d": [12, 3, 40, 50], "label": "red car"}]'
    roles = grounding_char_roles(answer)
    coords = "".join(c for c, r in zip(answer, roles) if r == ROLE_COORD)
    labels = "".join(c for c, r in zip(answer, roles) if r == ROLE_LABEL)
    assert (coords, labels) == ("123" + "4050", "red car")
    assert np.count_nonzero(roles) == len(coords) + len(labels)
