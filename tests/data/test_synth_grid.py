"""The mining-effect grid corpus is what its slices say it is."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from hsm.data.records import read_jsonl
from hsm.data.synth import GRID_CELL, GRID_CLASSES, GRID_RARE, GRID_SLICES, synthesize_generic, synthesize_grid


def test_grid_slices_are_built_as_documented(tmp_path):
    paths = synthesize_grid(tmp_path, n_train=200, n_val_per_slice=3, seed=1)
    info = json.loads(paths["slices"].read_text())
    train, val = read_jsonl(paths["bbu"]), read_jsonl(paths["bbu_val"])
    counts = {name: list(info["train"].values()).count(name) for name in GRID_SLICES}
    assert counts == {"clean": 148, "rare": 8, "small": 12, "crowded": 12, "low_contrast": 12, "noise": 8}
    assert sorted(info["val"].values()) == sorted([s for s in GRID_SLICES if s != "noise"] * 3)
    for record in train + val:
        name = info["train" if "train" in record.id else "val"][record.id]
        boxes = [obj.bbox for obj in record.objects]
        sides = {int(b[2] - b[0]) for b in boxes} | {int(b[3] - b[1]) for b in boxes}
        unit = GRID_CELL // 2 if name == "small" else GRID_CELL
        assert all(v % unit == 0 for b in boxes for v in b)  # snapped to the slice's grid
        labels = [obj.label for obj in record.objects]
        assert ("crack" in labels) == (name == "rare")
        if name == "crowded":
            assert 5 <= len(boxes) <= 7 and sides == {GRID_CELL}
        elif name == "small":
            assert 1 <= len(boxes) <= 3 and sides == {GRID_CELL // 2}
        elif name != "noise":
            assert 1 <= len(boxes) <= 3 and sides <= {GRID_CELL, 2 * GRID_CELL}
        if name != "noise":
            assert [(b[1], b[0]) for b in boxes] == sorted((b[1], b[0]) for b in boxes)  # raster order
            cells = np.zeros((8, 8), int)  # half-cell resolution
            for b in boxes:
                cells[int(b[1]) // 8:int(b[3]) // 8, int(b[0]) // 8:int(b[2]) // 8] += 1
            assert cells.max() == 1  # no overlap


def test_noise_labels_differ_from_the_truth_and_low_contrast_is_faint(tmp_path):
    paths = synthesize_grid(tmp_path, n_train=200, n_val_per_slice=1, seed=2)
    info = json.loads(paths["slices"].read_text())
    train = {r.id: r for r in read_jsonl(paths["bbu"])}
    assert set(info["noise"]) == {k for k, v in info["train"].items() if v == "noise"}
    for record_id, truth in info["noise"].items():
        shown = [[obj.label, [int(v) for v in obj.bbox]] for obj in train[record_id].objects]
        assert sum(a != b for a, b in zip(shown, truth)) == 1  # exactly one object corrupted
    for record_id, name in info["train"].items():
        record = train[record_id]
        pixels = np.asarray(Image.open(record.image), dtype=float)
        x1, y1, x2, y2 = (int(v) for v in record.objects[0].bbox)
        inside = pixels[y1 + (y2 - y1) // 2, x1 + (x2 - x1) // 2]
        colour = np.array(GRID_CLASSES[record.objects[0].label][0], dtype=float)
        distance = np.abs(inside - 128).max() / np.abs(colour - 128).max()
        if name == "low_contrast":
            assert 0.25 < distance < 0.45
        elif name == "clean":
            assert distance > 0.9


def test_generic_corpus_is_clean_common_classes_only_and_seeded(tmp_path):
    paths = synthesize_generic(tmp_path / "a", n_train=60, n_val=10, seed=3)
    again = synthesize_generic(tmp_path / "b", n_train=60, n_val=10, seed=3)
    other = synthesize_generic(tmp_path / "c", n_train=60, n_val=10, seed=4)
    assert paths["train"].read_text() == again["train"].read_text()
    assert paths["train"].read_text() != other["train"].read_text()
    for split, count in (("train", 60), ("val", 10)):
        records = read_jsonl(paths[split])
        assert len(records) == count
        for record in records:
            labels = [obj.label for obj in record.objects]
            boxes = [obj.bbox for obj in record.objects]
            assert 1 <= len(labels) <= 3 and GRID_RARE not in labels  # no crack, no crowd
            assert {int(b[2] - b[0]) for b in boxes} <= {GRID_CELL, 2 * GRID_CELL}  # no small objects
            pixels = np.asarray(Image.open(record.image), dtype=float)
            x1, y1, x2, y2 = (int(v) for v in boxes[0])
            inside = pixels[y1 + (y2 - y1) // 2, x1 + (x2 - x1) // 2]
            colour = np.array(GRID_CLASSES[labels[0]][0], dtype=float)
            assert np.abs(inside - colour).max() < 30  # full contrast
    assert "val" not in synthesize_generic(tmp_path / "d", n_train=5, n_val=0, seed=3)
