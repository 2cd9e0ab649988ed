"""The answer text both ways: format -> parse round trips, robust parsing, processor-derived resizing."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from hsm.data.answer import PARSE_STATUSES, answer_boxes_to_pixels, answer_scale, format_answer, parse_answer, resize_factor, resized_size

LABELS = st.text(alphabet=st.characters(blacklist_characters="`", blacklist_categories=("Cs",)), min_size=1, max_size=8)
# Prose around an answer: anything without brackets, braces or backticks.
PROSE = st.text(alphabet=st.characters(blacklist_characters="[]{}`", blacklist_categories=("Cs",)), max_size=20)


@st.composite
def image_and_boxes(draw, max_boxes=6):
    width, height = draw(st.integers(8, 2000)), draw(st.integers(8, 2000))
    n = draw(st.integers(0, max_boxes))
    boxes = []
    for _ in range(n):
        x1 = draw(st.floats(0, width - 2, allow_nan=False))
        y1 = draw(st.floats(0, height - 2, allow_nan=False))
        x2 = draw(st.floats(x1 + 1, width, allow_nan=False))
        y2 = draw(st.floats(y1 + 1, height, allow_nan=False))
        boxes.append((x1, y1, x2, y2))
    labels = [draw(LABELS) for _ in boxes]
    return width, height, boxes, labels


def qwen_image_processor(patch_size: int, min_pixels: int, max_pixels: int):
    """Qwen2.5-VL (patch 14) or Qwen3-VL (patch 16) image processor, merge 2, built in code."""
    return Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=2, merge_size=2,
                                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


PROCESSORS = {
    "qwen2.5-vl": qwen_image_processor(14, 56 * 56, 28 * 28 * 64),
    "qwen3-vl": qwen_image_processor(16, 64 * 64, 32 * 32 * 64),
}


@settings(max_examples=60, deadline=None)
@given(image_and_boxes(), st.sampled_from(["rel1000", "abs"]), st.integers(28, 3000), st.integers(28, 3000))
def test_format_then_parse_round_trips_to_the_pixels(case, coord_format, rw, rh):
    width, height, boxes, labels = case
    resized = (rw, rh) if coord_format == "abs" else None
    text = format_answer(boxes, labels, width, height, coord_format, resized)
    parsed = parse_answer(text)
    written = [o["bbox_2d"] for o in json.loads(text)]
    kept = [i for i, (x1, y1, x2, y2) in enumerate(written) if x2 > x1 and y2 > y1]  # rounding may collapse a box
    assert parsed.status == "ok" and parsed.n_invalid == 0 and parsed.n_degenerate == len(boxes) - len(kept)
    assert list(parsed.labels) == [labels[i] for i in kept]
    assert [list(b) for b in parsed.boxes] == [written[i] for i in kept]
    pixels = answer_boxes_to_pixels(parsed.boxes, width, height, coord_format, resized)
    # Rounding to an integer answer coordinate moves a pixel by at most half a unit of the answer grid.
    unit_x, unit_y = (width / 1000, height / 1000) if coord_format == "rel1000" else (width / rw, height / rh)
    tolerance = np.array([unit_x, unit_y, unit_x, unit_y]) / 2 + 1e-6
    for got, i in zip(pixels, kept):
        assert (np.abs(got - np.array(boxes[i])) <= tolerance).all()


@settings(max_examples=60, deadline=None)
@given(image_and_boxes(), PROSE, PROSE, st.sampled_from(["", "```json\n", "```\n", "```JSON "]), st.booleans())
def test_text_and_fences_around_the_list_change_nothing(case, before, after, fence, close_fence):
    width, height, boxes, labels = case
    answer = format_answer(boxes, labels, width, height, "rel1000")
    wrapped = before + fence + answer + ("\n```" if fence and close_fence else "") + after
    bare, got = parse_answer(answer), parse_answer(wrapped)
    assert (got.boxes, got.labels, got.status, got.n_degenerate) == (bare.boxes, bare.labels, bare.status, bare.n_degenerate)


@settings(max_examples=80, deadline=None)
@given(image_and_boxes(max_boxes=5), st.data())
def test_a_truncated_list_keeps_exactly_the_complete_objects(case, data):
    width, height, boxes, labels = case
    items = json.loads(format_answer(boxes, labels, width, height, "rel1000"))
    pieces = [json.dumps(item, ensure_ascii=False) for item in items]
    text = "[" + ", ".join(pieces) + "]"
    assert text == format_answer(boxes, labels, width, height, "rel1000")  # the layout the oracle assumes
    ends, pos = [], 1
    for piece in pieces:
        ends.append(pos + len(piece))
        pos += len(piece) + 2
    cut = data.draw(st.integers(1, len(text)))
    parsed = parse_answer(text[:cut])
    complete = sum(end <= cut for end in ends)
    assert parsed.n_objects == complete
    assert parsed.status == ("ok" if cut == len(text) else "truncated")


BAD_OBJECTS = [
    {"bbox_2d": [1, 2, "3", 4], "label": "a"},      # non-numeric
    {"bbox_2d": [1, 2, 3], "label": "a"},           # three numbers
    {"bbox_2d": [1, 2, 3, 4]},                      # no label
    {"bbox_2d": [1, 2, 3, 4], "label": 7},          # label not a string
    {"box": [1, 2, 3, 4], "label": "a"},            # no bbox_2d/bbox
    {"bbox_2d": [True, 2, 3, 4], "label": "a"},     # a boolean is not a coordinate
    [1, 2, 3, 4],                                   # not an object
    "bolt",
]
DEGENERATE = [{"bbox_2d": [5, 2, 5, 4], "label": "a"}, {"bbox": [1, 9, 3, 4], "label": "a"}]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("good"), st.sampled_from(["bbox_2d", "bbox"]), st.integers(0, 500), st.integers(0, 500),
              st.integers(1, 500), st.integers(1, 500), LABELS),
    st.tuples(st.just("bad"), st.sampled_from(BAD_OBJECTS)),
    st.tuples(st.just("degenerate"), st.sampled_from(DEGENERATE)),
), max_size=8))
def test_every_bad_object_is_counted_and_good_ones_kept_in_order(objects):
    items, expected = [], []
    for kind, *rest in objects:
        if kind == "good":
            key, x, y, w, h, label = rest
            items.append({key: [x, y, x + w, y + h], "label": label})
            expected.append(((float(x), float(y), float(x + w), float(y + h)), label))
        else:
            items.append(rest[0])
    parsed = parse_answer(json.dumps(items))
    if items and not any(isinstance(item, dict) for item in items):
        # A list holding no object at all reads as prose, not as an answer.
        assert (parsed.status, parsed.n_objects) == ("failed", 0)
        return
    assert parsed.status == "ok"
    assert list(zip(parsed.boxes, parsed.labels)) == expected
    assert parsed.n_invalid == sum(kind == "bad" for kind, *_ in objects)
    assert parsed.n_degenerate == sum(kind == "degenerate" for kind, *_ in objects)


def test_nan_and_infinite_coordinates_are_invalid():
    parsed = parse_answer('[{"bbox_2d": [NaN, 1, 2, 3], "label": "a"}, {"bbox_2d": [0, 1, Infinity, 3], "label": "a"}]')
    assert parsed.boxes == () and parsed.n_invalid == 2 and parsed.status == "ok"


@pytest.mark.parametrize("text, status, n_boxes", [
    ('{"bbox_2d": [1, 2, 3, 4], "label": "a"}', "bare_objects", 1),
    ('Found: {"bbox": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"} done', "bare_objects", 2),
    ('{"bbox_2d": [1, 2, 3, 4], "label": "a"}\n{"bbox_2d": [5, 6, 7, 8], "label": "b"', "truncated", 1),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"} {"bbox_2d": [5, 6, 7, 8], "label": "b"}]', "ok", 2),
    ("[]", "ok", 0),
    ("see [1] and [2, 3] then [{", "truncated", 0),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"},]', "ok", 1),
    ("no boxes here", "failed", 0),
    ("", "failed", 0),
])
def test_single_objects_and_odd_shapes(text, status, n_boxes):
    parsed = parse_answer(text)
    assert (parsed.status, len(parsed.boxes)) == (status, n_boxes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list('[]{},:"0123456789 abx_-.\n`') + ['"bbox_2d"', '"label"', "NaN"]), max_size=60))
def test_parse_never_raises_and_accounts_for_every_object(pieces):
    text = "".join(pieces)
    parsed = parse_answer(text)
    assert parsed.status in PARSE_STATUSES
    assert len(parsed.boxes) == len(parsed.labels)
    assert all(x2 > x1 and y2 > y1 for x1, y1, x2, y2 in parsed.boxes)


def test_boxes_are_clipped_to_the_image():
    pixels = answer_boxes_to_pixels([(-50, 100, 1200, 900)], 200, 100, "rel1000")
    assert pixels.tolist() == [[0.0, 10.0, 200.0, 90.0]]


@pytest.mark.parametrize("kind, factor", [("qwen2.5-vl", 28), ("qwen3-vl", 32)])
def test_resize_factor_and_size_are_the_processors_own(kind, factor):
    processor = PROCESSORS[kind]
    assert resize_factor(processor) == factor
    for width, height in [(64, 48), (333, 97), (500, 700), (31, 29)]:
        rw, rh = resized_size(processor, width, height)
        grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="np")["image_grid_thw"][0]
        assert (rw, rh) == (int(grid[2]) * processor.patch_size, int(grid[1]) * processor.patch_size)
        assert rw % factor == 0 and rh % factor == 0


@settings(max_examples=40, deadline=None)
@given(image_and_boxes(max_boxes=4), st.sampled_from(sorted(PROCESSORS)))
def test_abs_and_rel1000_agree_after_the_round_trip(case, kind):
    width, height, boxes, labels = case
    if max(width, height) / min(width, height) > 150:
        return  # beyond smart_resize's aspect limit
    resized = resized_size(PROCESSORS[kind], width, height)
    back = {}
    for coord_format in ("rel1000", "abs"):
        text = format_answer(boxes, labels, width, height, coord_format, resized if coord_format == "abs" else None)
        parsed = parse_answer(text)
        back[coord_format] = answer_boxes_to_pixels([o["bbox_2d"] for o in json.loads(text)], width, height,
                                                    coord_format, resized if coord_format == "abs" else None)
        assert parsed.n_invalid == 0
    unit = np.array([width / 1000 + width / resized[0], height / 1000 + height / resized[1]] * 2) / 2 + 1e-6
    assert (np.abs(back["rel1000"] - back["abs"]) <= unit).all()


# --- The parser is iterative and linear: an oracle on json's own decoder, adversarial text, timing ---

JSONISH = st.lists(st.sampled_from(list('[]{},:" 0123456789-.eE\\nt\x01') + ['"a"', '"bbox_2d"', '"label"', "true", "null",
                                                                          "NaN", "-Infinity", "\\u00e9", "9" * 5000]),
                   max_size=40)


def _json_raw_decode(text: str, pos: int):
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except ValueError:
        return None


@settings(max_examples=400, deadline=None)
@given(JSONISH, st.data())
def test_value_decoder_equals_json_raw_decode(pieces, data):
    from hsm.data.json_values import decode_value as _decode_value

    text = "".join(pieces)
    pos = data.draw(st.integers(0, len(text)))
    expected, got = _json_raw_decode(text, pos), _decode_value(text, pos, {})
    # json.dumps compares NaN with NaN; both are None or both (value, end).
    assert json.dumps(got) == json.dumps(expected)


def _oracle_find_objects(text: str):
    """The parser's rules spelled out with json.raw_decode tried at every "[" and "{" (quadratic)."""
    fence = re.search(r"```[A-Za-z]*[ \t]*\n?(.*?)(?:```|\Z)", text, re.S)
    text = fence.group(1) if fence else text
    skip = lambda p: len(text) - len(text[p:].lstrip(" \t\r\n"))  # noqa: E731
    for start, char in enumerate(text):
        if char == "[":
            items, pos, ending = [], start + 1, None
            while ending is None:
                pos = skip(pos)
                if pos >= len(text) or text[pos] == "]":
                    ending = "end" if pos >= len(text) else "complete"
                    break
                found = _json_raw_decode(text, pos)
                if found is None:
                    ending = "object" if text[pos] == "{" else "other"
                    break
                items.append(found[0])
                pos = skip(found[1])
                if pos < len(text) and text[pos] == ",":
                    pos += 1
                elif pos < len(text) and text[pos] not in "]{":
                    ending = "other"
            # An empty list answers "no objects" only on its own, not as an element of another list ("[[]]").
            nested = text[:start].rstrip(" \t\r\n").endswith(("[", ","))
            if any(isinstance(i, dict) for i in items) or ending in ("end", "object") or (ending == "complete" and not items and not nested):
                return items, "ok" if ending == "complete" else "truncated"
        elif char == "{":
            items, pos = [], start
            while (found := _json_raw_decode(text, pos)) is not None:
                items.append(found[0])
                pos = skip(found[1])
                pos = skip(pos + 1) if text[pos:pos + 1] == "," else pos
                if text[pos:pos + 1] != "{":
                    return items, "bare_objects"
                found = None
            if items:
                return items, "truncated"
    return [], "failed"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list('[]{},:" 0123456789`\n') + ['"bbox_2d"', '"label"', '"a"', "NaN", "```json\n",
                                                                 '{"bbox_2d": [1, 2, 3, 4], "label": "a"}']), max_size=40))
def test_parser_equals_the_rules_tried_at_every_bracket(pieces):
    from hsm.data.answer import _find_objects

    text = "".join(pieces)
    assert json.dumps(_find_objects(text)) == json.dumps(_oracle_find_objects(text))


ADVERSARIAL = st.one_of(
    st.text(max_size=200),
    st.builds(lambda piece, n: piece * n, st.sampled_from(["[", "{", '["', "[1,", '{"a":', '{"{"', "[{", "\\", '"', "9"]),
              st.integers(0, 3000)),
    st.builds(lambda n, answer: "[" * n + answer, st.integers(0, 3000), st.just('{"bbox_2d": [1, 2, 3, 4], "label": "a"}')),
)


@settings(max_examples=150, deadline=None)
@given(ADVERSARIAL)
def test_parse_never_raises_on_adversarial_text(text):
    parsed = parse_answer(text)
    assert parsed.status in PARSE_STATUSES and len(parsed.boxes) == len(parsed.labels)


@pytest.mark.parametrize("depth", [1, 63, 64, 65, 66, 67, 1000, 100_000])
def test_an_answer_nested_in_lists_at_any_depth_reads_as_the_answer(depth):
    answer = format_answer([(1, 2, 30, 40), (5, 6, 70, 80)], ["a", "b"], 100, 100, "rel1000")
    assert parse_answer("[" * depth + answer + "]" * depth) == parse_answer(answer)


def _best_time(text: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        parse_answer(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("piece, size", [("{", 200_000), ("[", 200_000), ('["', 20_000), ("[1,", 20_000),
                                         ('{"{"', 20_000), ('{"a":', 20_000), ("[ ", 100_000)])
def test_parse_time_is_linear_in_the_text(piece, size):
    # A quadratic parser takes 16x the time on four times the text; a linear one 4x (8x leaves room for a
    # shared machine's noise and cache effects, and still splits the two by 2x each way).
    # Interleaved best-of-5, so a burst of load on a shared machine hits both sizes alike.
    small_text, large_text = piece * (size // len(piece)), piece * (4 * size // len(piece))
    small = large = float("inf")
    for _ in range(5):
        small, large = min(small, _best_time(small_text, 1)), min(large, _best_time(large_text, 1))
    assert large < 8 * small + 0.05


@pytest.mark.parametrize("text", ["[" * 1000, "{" * 1_000_000, "[" * 1_000_000, "[" * 5000 + "]" * 5000])
def test_hostile_answers_parse_quickly(text):
    assert _best_time(text, repeats=1) < 2.0


def test_needs_resized_is_true_only_for_pixel_formats_and_refuses_unknown_ones():
    from hsm.data.answer import COORD_FORMATS, needs_resized

    # abs answers are pixels of the resized image: a 2x resize doubles them, rel1000 ignores it.
    assert [needs_resized(f) for f in COORD_FORMATS] == [
        answer_scale(f, 100, 50, (200, 100)) != answer_scale(f, 100, 50, None) for f in COORD_FORMATS]
    with pytest.raises(ValueError, match="rel100"):
        needs_resized("rel100")


@pytest.mark.parametrize("text", ["[[]]", "[[[]]]", "[ [ ] ]", "[[[...]]]", "[1, []]", 'see [[], []]'])
def test_an_empty_list_nested_in_a_list_is_no_answer(text):
    parsed = parse_answer(text)
    assert (parsed.status, parsed.n_objects) == ("failed", 0)


@pytest.mark.parametrize("text", ["[]", "No objects: []", "```json\n[]\n```", " [ ] "])
def test_an_empty_list_on_its_own_means_no_objects(text):
    parsed = parse_answer(text)
    assert (parsed.status, parsed.n_objects) == ("ok", 0)


def test_boxes_past_the_cap_are_dropped_and_counted():
    from hsm.data.answer import MAX_BOXES

    n_bad = 3  # malformed objects before the cap: they do not use up its room
    objects = [{"label": "x"}] * n_bad + [{"bbox_2d": [i, 0, i + 1, 1], "label": "x"} for i in range(MAX_BOXES + 250)]
    parsed = parse_answer(json.dumps(objects))
    assert len(parsed.boxes) == MAX_BOXES and parsed.boxes[-1] == (MAX_BOXES - 1, 0, MAX_BOXES, 1)
    assert (parsed.n_invalid, parsed.n_over_cap, parsed.n_objects) == (n_bad, 250, len(objects))
