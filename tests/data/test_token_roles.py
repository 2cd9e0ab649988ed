"""Answer-token roles and the box-aware statistics (coord_loss, label_loss, loss_sum)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm.config import ModelConfig
from hsm.data.answer import ROLE_COORD, ROLE_LABEL, ROLE_OTHER, answer_char_roles, format_answer
from hsm.data.encoding import IGNORE_INDEX, Template, token_roles_from_offsets
from hsm.mining.event_reader import read_epoch_events
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.schemas import EVENT_SCHEMA
from hsm.train.stats import STAT_ROWS, per_sample_stats, token_losses

labels_st = st.text(min_size=1, max_size=8)
boxes_st = st.lists(
    st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(1, 500), st.integers(1, 500)).map(
        lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])
    ),
    max_size=6,
)


def runs(roles: np.ndarray, role: int) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of ``role``."""
    padded = np.concatenate([[False], roles == role, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


@settings(max_examples=200, deadline=None)
@given(boxes=boxes_st, labels=st.data(), coord_format=st.sampled_from(["rel1000", "abs"]))
def test_char_roles_mark_exactly_the_numbers_and_labels(boxes, labels, coord_format):
    names = [labels.draw(labels_st) for _ in boxes]
    answer = format_answer(boxes, names, 1000, 1000, coord_format)
    roles = answer_char_roles(answer)
    parsed = json.loads(answer)
    coords = [str(c) for item in parsed for c in item["bbox_2d"]]
    assert [answer[s:e] for s, e in runs(roles, ROLE_COORD)] == coords
    # A label run is the JSON-escaped label between its quotes.
    label_runs = [json.loads('"' + answer[s:e] + '"') for s, e in runs(roles, ROLE_LABEL)]
    assert label_runs == [item["label"] for item in parsed]
    # Everything else is structure: removing the marked text leaves the same skeleton for every answer.
    skeleton = "".join(ch for ch, r in zip(answer, roles) if r == ROLE_OTHER)
    assert skeleton == ("[" + ", ".join('{"bbox_2d": [, , , ], "label": ""}' for _ in boxes) + "]")


def test_char_roles_accept_bbox_key_and_ignore_lookalikes():
    answer = 'x ```json\n[{"bbox": [1, 2.5, 3, -4], "label": "a \\"bbox_2d\\": [9]"}, {"note": [7], "label": 5}]'
    roles = answer_char_roles(answer)
    assert [answer[s:e] for s, e in runs(roles, ROLE_COORD)] == ["1", "2.5", "3", "-4"]
    assert [answer[s:e] for s, e in runs(roles, ROLE_LABEL)] == ['a \\"bbox_2d\\": [9]']


@settings(max_examples=200, deadline=None)
@given(char_roles=st.lists(st.sampled_from([0, 1, 2]), max_size=30), cuts=st.lists(st.integers(0, 30), max_size=12))
def test_token_roles_match_naive(char_roles, cuts):
    char_roles = np.asarray(char_roles, dtype=np.int8)
    bounds = sorted({0, len(char_roles), *[min(c, len(char_roles)) for c in cuts]})
    offsets = np.array(list(zip(bounds[:-1], bounds[1:])) + [(0, 0)], dtype=np.int64).reshape(-1, 2)
    naive = [ROLE_COORD if ROLE_COORD in r else ROLE_LABEL if ROLE_LABEL in r else ROLE_OTHER
             for r in (list(char_roles[s:e]) for s, e in offsets)]
    assert token_roles_from_offsets(offsets, char_roles).tolist() == naive


def qwen25_style_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer (digits split one by one), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hsm.train.model import CHAT_TEMPLATE, SPECIAL_TOKENS, _training_corpus

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_corpus() + ["检测图中所有目标，输出 JSON。裂缝 螺栓"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, additional_special_tokens=SPECIAL_TOKENS[1:])


def check_roles_on_tokens(tokenizer, input_ids, labels, roles, answer):
    """Independent check by decoding: coordinate tokens spell the digits, label tokens the labels."""
    parsed = json.loads(answer)
    answer_positions = np.flatnonzero(labels != IGNORE_INDEX)
    assert roles[labels == IGNORE_INDEX].tolist() == [ROLE_OTHER] * int((labels == IGNORE_INDEX).sum())
    pieces = [(tokenizer.decode([int(input_ids[i])]), int(roles[i])) for i in answer_positions]
    coord_text = "".join(text for text, role in pieces if role == ROLE_COORD)
    assert re.sub(r"[^0-9]", "", coord_text) == "".join(str(c) for item in parsed for c in item["bbox_2d"])
    for text, role in pieces:
        if role == ROLE_COORD:
            assert re.fullmatch(r"\s*[0-9]+", text), text
        if role == ROLE_OTHER:
            assert not re.search(r"[0-9]", text) or "bbox_2d" in answer and text in ("2", "_2", "2d", "_2d"), text
    # Decoded together: a byte-level tokenizer may split one CJK character over several tokens.
    label_text = tokenizer.decode([int(input_ids[i]) for i in answer_positions if roles[i] == ROLE_LABEL])
    assert label_text.replace(" ", "") == "".join(item["label"] for item in parsed).replace(" ", "")


@pytest.mark.parametrize("labels", [["bolt", "crack", "screw"], ["螺栓", "裂缝", "crack"]])
def test_roles_on_real_tiny_qwen3vl_tokenization(labels):
    from PIL import Image

    from hsm.train.model import build_processor

    processor = build_processor(ModelConfig())
    template = Template(processor)
    answer = format_answer([(1, 2, 30, 40), (5, 6, 60, 63), (0, 0, 64, 64)], labels, 64, 64, "rel1000")
    encoded = template.encode(Image.new("RGB", (64, 64)), "Detect.", answer)
    check_roles_on_tokens(processor.tokenizer, encoded["input_ids"], encoded["labels"], encoded["token_roles"], answer)
    assert (encoded["token_roles"] == ROLE_COORD).sum() >= 12  # at least one token per coordinate


@pytest.mark.parametrize("labels", [["bolt", "crack"], ["螺栓", "裂缝"]])
def test_roles_on_qwen25vl_style_tokenization(labels):
    """Qwen2.5-VL splits every digit into its own token and writes absolute pixel coordinates."""
    from types import SimpleNamespace

    tokenizer = qwen25_style_tokenizer()
    template = Template(SimpleNamespace(tokenizer=tokenizer))  # answer_token_roles only needs the tokenizer
    answer = format_answer([(10, 20, 300, 412), (5, 6, 1260, 963)], labels, 1280, 980, "abs", resized=(1288, 980))
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect."}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = np.asarray(tokenizer(prompt + answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
    roles = template.answer_token_roles(input_ids, answer)
    labels_arr = np.full_like(input_ids, IGNORE_INDEX)
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels_arr[start:-1] = input_ids[start:-1]
    roles[labels_arr == IGNORE_INDEX] = ROLE_OTHER
    check_roles_on_tokens(tokenizer, input_ids, labels_arr, roles, answer)
    # One token per digit: the coordinate tokens are exactly the digits.
    assert (roles == ROLE_COORD).sum() == sum(len(str(c)) for item in json.loads(answer) for c in item["bbox_2d"])


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), seq=st.integers(2, 12))
def test_per_sample_stats_match_naive_loop(seed, batch, seq):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, 7, generator=g)
    labels = torch.randint(0, 7, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.3] = IGNORE_INDEX
    roles = torch.randint(0, 3, (batch, seq), generator=g, dtype=torch.int8)
    stats = per_sample_stats(*token_losses(logits, labels), roles)
    assert stats.shape == (len(STAT_ROWS), batch)
    for i in range(batch):
        row = {}
        values = [F.cross_entropy(logits[i, t - 1], labels[i, t]).item() for t in range(1, seq)
                  if labels[i, t] != IGNORE_INDEX]
        for name, role in (("coord_loss", ROLE_COORD), ("label_loss", ROLE_LABEL)):
            picked = [F.cross_entropy(logits[i, t - 1], labels[i, t]).item() for t in range(1, seq)
                      if labels[i, t] != IGNORE_INDEX and roles[i, t] == role]
            row[name] = sum(picked) / len(picked) if picked else float("nan")
        row["loss_sum"] = sum(values)
        row["loss"] = sum(values) / len(values) if values else 0.0
        row["n_tokens"] = len(values)
        for name, expected in row.items():
            got = stats[STAT_ROWS.index(name), i].item()
            if np.isnan(expected):
                assert np.isnan(got), name
            else:
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-5), name
    no_roles = per_sample_stats(*token_losses(logits, labels))
    assert torch.isnan(no_roles[3:5]).all() and torch.equal(no_roles[[0, 1, 2, 5]], stats[[0, 1, 2, 5]])


def test_new_event_columns_written_null_for_nan_and_old_logs_still_read(tmp_path):
    base = dict(epoch=0, global_step=0, dataset=["t", "t"], base_idx=[0, 1], sample_id=["a", "b"],
                loss=[1.0, 2.0], token_acc=[0.5, 0.5], n_tokens=[3, 4], aug_seed=[0, 0], drawn_as_hard=[False, False])
    with EventWriter(tmp_path, run_id="r", rank=0) as writer:
        writer.append(EventBatch(**base, metrics={"coord_loss": np.array([0.25, np.nan], np.float32),
                                                  "label_loss": [1.5, 2.5], "loss_sum": [3.0, 8.0]}))
        writer.append(EventBatch(**{**base, "global_step": 1}))  # no box statistics at all
    table = read_epoch_events(tmp_path, 0).table.sort_by([("global_step", "ascending"), ("position", "ascending")])
    assert table.column("coord_loss").to_pylist() == [0.25, None, None, None]
    assert table.column("label_loss").to_pylist() == [1.5, 2.5, None, None]
    assert table.column("loss_sum").to_pylist() == [3.0, 8.0, None, None]
    # A part written before the columns existed: same rows, the new columns read as nulls.
    old_schema = pa.schema([f for f in EVENT_SCHEMA if f.name not in ("coord_loss", "label_loss", "loss_sum")])
    old = pa.Table.from_pylist([{**{k: v for k, v in zip(old_schema.names, [None] * len(old_schema))},
                                 "run_id": "r", "attempt": 0, "epoch": 1, "global_step": 5, "rank": 0, "position": 0,
                                 "dataset": "t", "base_idx": 0, "sample_id": "a", "loss": 1.0, "token_acc": 1.0,
                                 "n_tokens": 2, "aug_seed": 0, "drawn_as_hard": False}], schema=old_schema)
    part = tmp_path / "events/epoch=1/rank=0/part-00000.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(old, part)
    full = read_epoch_events(tmp_path, 1).table
    assert full.column("coord_loss").to_pylist() == [None] and full.column("loss").to_pylist() == [1.0]
    subset = read_epoch_events(tmp_path, 1, columns=["attempt", "epoch", "global_step", "rank", "loss_sum"]).table
    assert subset.column("loss_sum").to_pylist() == [None]


@pytest.mark.slow
def test_training_writes_box_statistics(tmp_path, make_corpus, demo_config):
    from hsm.run import train

    cfg = demo_config(make_corpus(8, 4, 2), tmp_path / "run", "training.num_train_epochs=1",
                      "custom.hard_sample_mining.enabled=true")
    train(cfg)
    events = read_epoch_events(tmp_path / "run" / "hsm", 0).table
    assert events.num_rows >= 8
    for name in ("coord_loss", "label_loss", "loss_sum"):
        assert events.column(name).null_count == 0, name  # every synthetic record has at least one box
    loss = np.asarray(events.column("loss"))
    n_tokens = np.asarray(events.column("n_tokens"))
    np.testing.assert_allclose(np.asarray(events.column("loss_sum")), loss * n_tokens, rtol=1e-4)
    coord, label = np.asarray(events.column("coord_loss")), np.asarray(events.column("label_loss"))
    assert (coord > 0).all() and (label > 0).all() and not np.allclose(coord, loss)


def test_slice_corpus_is_what_its_slices_say(tmp_path):
    from hsm.data.records import read_jsonl
    from hsm.data.synth import RARE_CLASS, SLICES, synthesize_slices

    paths = synthesize_slices(tmp_path, n_train=100, n_val_per_slice=3, n_source=4, size=64, seed=3)
    info = json.loads(paths["slices"].read_text())
    train, val = read_jsonl(paths["bbu"]), read_jsonl(paths["bbu_val"])
    assert len(train) == 100 and len(val) == 3 * len(SLICES) and len(read_jsonl(paths["coco"])) == 4
    counts = {name: list(info["train"].values()).count(name) for name in SLICES}
    assert counts == {"rare": 5, "small": 12, "crowded": 12, "clean": 71}
    assert sorted(info["val"].values()) == sorted(SLICES * 3)
    for records, split in ((train, "train"), (val, "val")):
        for record in records:
            name = info[split][record.id]
            labels = [o.label for o in record.objects]
            sides = [max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) for o in record.objects]
            assert (RARE_CLASS in labels) == (name == "rare")
            assert (len(labels) >= 6) == (name == "crowded")
            assert (max(sides) <= 8) == (name == "small")
