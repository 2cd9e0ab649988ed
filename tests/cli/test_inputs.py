"""Hostile input through the CLI: files that are not UTF-8 give a clear error naming the file and line, exit 2."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from hsm.cli.app import app

runner = CliRunner()
LATIN1 = "é".encode("latin-1")  # b"\xe9": not UTF-8 on its own
GOOD = {"id": "a", "image": "a.png", "width": 10, "height": 8, "objects": [{"label": "bolt", "bbox": [1, 1, 5, 5]}]}


def _jsonl_with_latin1_line(path, n_good: int = 2):
    """``n_good`` good lines, then one whose label is Latin-1: line ``n_good + 1`` is not UTF-8."""
    lines = [json.dumps({**GOOD, "id": f"r{k}"}).encode() for k in range(n_good)]
    bad = json.dumps({**GOOD, "id": "bad"}).encode().replace(b"bolt", b"bo" + LATIN1 + b"t")
    path.write_bytes(b"\n".join(lines + [bad]) + b"\n")
    return path


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "UnicodeDecodeError" not in result.output
    return " ".join(result.output.split())


def test_data_validate_names_the_line_that_is_not_utf8(tmp_path):
    Image.new("RGB", (10, 8)).save(tmp_path / "a.png")
    path = _jsonl_with_latin1_line(tmp_path / "v.jsonl")
    out = _error(runner.invoke(app, ["data", "validate", str(path)]))
    column = path.read_bytes().split(b"\n")[2].index(LATIN1) + 1
    assert f"v.jsonl:3:{column}: not UTF-8 (byte e9" in out and "save the file as UTF-8" in out
    assert "1 problem(s) in 2 readable record(s)" in out  # the other lines are still checked


def test_import_coco_names_the_json_that_is_not_utf8(tmp_path):
    coco = {"images": [], "categories": [{"id": 1, "name": "cat"}], "annotations": []}
    text = json.dumps(coco, indent=1).encode().replace(b'"cat"', b'"c' + LATIN1 + b't"')
    (tmp_path / "c.json").write_bytes(text)
    line = text[:text.index(LATIN1)].count(b"\n") + 1
    out = _error(runner.invoke(app, ["data", "import-coco", str(tmp_path / "c.json"), "--images", str(tmp_path),
                                     "--out", str(tmp_path / "o.jsonl")]))
    assert f"c.json:{line}:" in out and "not UTF-8" in out
    assert not (tmp_path / "o.jsonl").exists()


def test_eval_score_names_the_answers_line_that_is_not_utf8(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps(GOOD) + "\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(json.dumps({"id": "a", "answer": "[]"}).encode().replace(b"[]", b"[" + LATIN1 + b"]") + b"\n")
    out = _error(runner.invoke(app, ["eval", "score", "--records", str(records), "--answers", str(answers),
                                     "--out", str(tmp_path / "out")]))
    assert "answers.jsonl:1:" in out and "not UTF-8" in out


def test_train_names_the_config_that_is_not_utf8(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"model:\n  name_or_path: tiny-qwen3-vl\n# caf" + LATIN1 + b"\n")
    out = _error(runner.invoke(app, ["train", str(config)]))
    assert "c.yaml:3:6: not UTF-8" in out


def test_train_names_the_records_line_that_is_not_utf8(tmp_path):
    Image.new("RGB", (10, 8)).save(tmp_path / "a.png")
    path = _jsonl_with_latin1_line(tmp_path / "t.jsonl")
    out = _error(runner.invoke(app, [
        "train", "configs/demo.yaml", f"custom.fusion_config.target.train_jsonl={path}",
        "custom.fusion_config.target.val_jsonl=null", "custom.fusion_config.sources=[]",
        f"training.output_dir={tmp_path / 'run'}", "training.report_to=[]"]))
    assert "t.jsonl:3:" in out and "not UTF-8" in out


# --- hsm data import-coco: nothing silent ---

def _coco_set(tmp_path, n_images: int = 12, absolute: bool = False):
    """COCO json with ``n_images`` images on disk under img/, annotations with ids, keypoints, segmentations."""
    (tmp_path / "img").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(1, n_images + 1):
        Image.new("RGB", (20, 10)).save(tmp_path / "img" / f"{i}.png")
        name = str((tmp_path / "img" / f"{i}.png").resolve()) if absolute else f"{i}.png"
        images.append({"id": i, "file_name": name, "width": 20, "height": 10})
        annotations.append({"id": 100 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 4, 4],
                            "segmentation": [[1, 1, 5, 1, 5, 5]] if i <= 3 else [],
                            "keypoints": [2, 2, 2] if i <= 2 else []})
    annotations += [{"id": 900, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 4]},
                    {"id": 901, "image_id": 2, "category_id": 1, "bbox": [0, 0, 3, 3], "iscrowd": 1}]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "emu"}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_import_coco_with_a_wrong_images_folder_writes_nothing_and_names_the_missing(tmp_path):
    coco = _coco_set(tmp_path)
    out = tmp_path / "out" / "x.jsonl"
    args = ["data", "import-coco", str(coco), "--images", str(tmp_path / "wrong"), "--out", str(out), "--val-fraction", "0.2"]
    text = _error(runner.invoke(app, args))
    assert "none of its 12 image(s) found under --images" in text and "nothing written" in text
    shown = [f"{tmp_path / 'wrong'}/{i}.png" for i in range(1, 11)]
    assert all(name in text for name in shown) and f"{tmp_path / 'wrong'}/11.png" not in text and "(2 more)" in text
    assert not out.exists() and not out.with_name("x_val.jsonl").exists()
    allowed = runner.invoke(app, args + ["--allow-missing"])
    assert allowed.exit_code == 0, allowed.output
    assert "skipped 12 image(s) whose file is missing" in " ".join(allowed.output.split())
    assert out.read_text() == "" and out.with_name("x_val.jsonl").read_text() == ""


def test_import_coco_names_what_it_drops_and_ignores(tmp_path):
    coco = _coco_set(tmp_path)
    result = runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"),
                                 "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dropped 1 zero-area box(es) (width or height <= 0): annotation ids 900" in text
    assert "dropped 1 crowd annotation(s) (iscrowd=1): annotation ids 901" in text
    assert "ignored the keypoints of 2 annotation(s)" in text
    assert "ignored the segmentation of 3 annotation(s)" in text
    assert "2 categor(y/ies) have no imported box and are not in the records: dog, emu" in text
    assert "absolute file_name" not in text


def test_import_coco_absolute_file_names_are_used_as_written(tmp_path):
    from hsm.data.records import read_jsonl

    coco = _coco_set(tmp_path, n_images=3, absolute=True)
    out = tmp_path / "x.jsonl"
    result = runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "elsewhere"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 image(s) have an absolute file_name: used as written, --images applies only to relative names" in \
        " ".join(result.output.split())
    assert [r.image.resolve() for r in read_jsonl(out)] == [(tmp_path / "img" / f"{i}.png").resolve() for i in (1, 2, 3)]
