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
    assert "1 problem in 2 readable records" in out  # the other lines are still checked


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
                    {"id": 901, "image_id": 2, "category_id": 1, "bbox": [0, 0, 3, 3], "iscrowd": 1},
                    {"id": 902, "image_id": 2, "category_id": 1, "bbox": [5, 5, -2, 3]},
                    {"id": 903, "image_id": 3, "category_id": 1, "bbox": [5, 5, 2, -3]}]
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
    assert "skipped 12 images whose file is missing" in " ".join(allowed.output.split())
    assert out.read_text() == "" and out.with_name("x_val.jsonl").read_text() == ""


def test_import_coco_names_what_it_drops_and_ignores(tmp_path):
    coco = _coco_set(tmp_path)
    result = runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"),
                                 "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dropped 1 zero-area box (width or height 0): annotation ids 900" in text
    assert "dropped 1 box with a negative size (width or height < 0): annotation ids 902, 903" not in text
    assert "dropped 2 boxes with a negative size (width or height < 0): annotation ids 902, 903" in text
    assert "dropped 1 crowd annotation (iscrowd=1): annotation ids 901" in text
    assert "ignored the keypoints of 2 annotations" in text
    assert "ignored the segmentation of 3 annotations" in text
    assert "2 categories have no imported box and are not in the records: dog, emu" in text
    assert "(y/ies)" not in text and "(s)" not in text
    assert "absolute file_name" not in text


def test_import_coco_absolute_file_names_are_used_and_written_as_written(tmp_path):
    from hsm.data.records import read_jsonl

    coco = _coco_set(tmp_path, n_images=3, absolute=True)
    out = tmp_path / "deep" / "er" / "x.jsonl"
    result = runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "elsewhere"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 images have an absolute file_name: written as it is (absolute), --images applies only to relative " \
           "names" in " ".join(result.output.split())
    written = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert written == [str((tmp_path / "img" / f"{i}.png").resolve()) for i in (1, 2, 3)]
    moved = tmp_path / "moved.jsonl"  # the JSONL moves; its absolute paths still name the images
    out.rename(moved)
    assert [r.image for r in read_jsonl(moved)] == [(tmp_path / "img" / f"{i}.png").resolve() for i in (1, 2, 3)]


def test_import_coco_relative_file_names_are_written_relative_to_the_jsonl(tmp_path):
    coco = _coco_set(tmp_path, n_images=2)
    out = tmp_path / "x.jsonl"
    assert runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"),
                               "--out", str(out)]).exit_code == 0
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ["img/1.png", "img/2.png"]


def test_import_coco_refuses_a_repeated_image_id_and_names_it(tmp_path):
    coco = _coco_set(tmp_path, n_images=4)
    data = json.loads(coco.read_text())
    data["images"][2]["id"] = 1  # images[0] and images[2] both claim id 1
    coco.write_text(json.dumps(data))
    out = tmp_path / "x.jsonl"
    text = _error(runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"),
                                      "--out", str(out)]))
    assert "1 image id is repeated: 1 (images[0, 2])" in text and "nothing written" in text
    assert not out.exists()


def test_import_coco_names_annotations_of_unknown_images(tmp_path):
    coco = _coco_set(tmp_path, n_images=3)
    data = json.loads(coco.read_text())
    data["annotations"] += [{"id": 700, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]},
                            {"id": 701, "image_id": "1", "category_id": 1, "bbox": [1, 1, 2, 2]}]
    coco.write_text(json.dumps(data))
    out = tmp_path / "x.jsonl"
    result = runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("dropped 2 annotations of unknown images (image_id not among the images): annotation ids 700, 701"
            in text)
    boxes = sum(len(json.loads(line)["objects"]) for line in out.read_text().splitlines())
    assert boxes == 3  # one kept box per image; the two strays went nowhere


def test_import_coco_refuses_an_image_id_that_is_not_an_integer(tmp_path):
    """COCO's index would read the id "2" as 2 (and fail on "b"): refused, naming the image, nothing written."""
    coco = _coco_set(tmp_path, n_images=3)
    data = json.loads(coco.read_text())
    data["images"][1]["id"] = "2"
    coco.write_text(json.dumps(data))
    out = tmp_path / "x.jsonl"
    text = _error(runner.invoke(app, ["data", "import-coco", str(coco), "--images", str(tmp_path / "img"),
                                      "--out", str(out)]))
    assert f"{coco}: images[1] has id '2'; COCO image ids are integers" in text
    assert not out.exists()


def test_import_coco_keeps_every_box_whatever_its_annotation_id(tmp_path):
    """Annotation ids 0, repeated or absent: every box lands on its image, in file order, and no warning about id 0."""
    import warnings

    from hsm.data.coco import import_coco

    coco = _coco_set(tmp_path, n_images=2)
    data = json.loads(coco.read_text())
    data["annotations"] = [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
                           {"id": 0, "image_id": 1, "category_id": 2, "bbox": [2, 2, 2, 2]},
                           {"image_id": 2, "category_id": 3, "bbox": [3, 3, 2, 2]},
                           {"image_id": 2, "category_id": 1, "bbox": [4, 4, 2, 2]}]
    coco.write_text(json.dumps(data))
    out = tmp_path / "x.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = import_coco(coco, tmp_path / "img", out)
    assert result.records == 2 and result.warnings() == []
    objects = [json.loads(line)["objects"] for line in out.read_text().splitlines()]
    assert objects == [[{"label": "cat", "bbox": [1.0, 1.0, 3.0, 3.0]}, {"label": "dog", "bbox": [2.0, 2.0, 4.0, 4.0]}],
                       [{"label": "emu", "bbox": [3.0, 3.0, 5.0, 5.0]}, {"label": "cat", "bbox": [4.0, 4.0, 6.0, 6.0]}]]
