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
