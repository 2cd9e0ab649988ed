"""``hsm eval``: metrics of a hand-made answer set against pycocotools, the CLI, and the tiny
Qwen3-VL generating through ``hsm eval run`` and through the training callback."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hsm.data.answer import parse_answer
from hsm.cli.app import app
from hsm.eval.evaluate import merge_shards, shard

runner = CliRunner()

# Hand-made records: (id, image as written, width, height, [(label, pixel box)]).
RECORDS = [
    ("a", "imgs/a.png", 500, 1000, [("cat", (50, 100, 150, 300)), ("dog", (200, 400, 300, 500)), ("cat", (300, 600, 450, 900))]),
    (None, "./imgs/b.png", 1000, 500, [("bird", (100, 100, 400, 300))]),
    ("c", "imgs/c.png", 200, 200, [("dog", (20, 20, 100, 100)), ("dog", (120, 120, 180, 180))]),
    ("d", "imgs/d.png", 100, 100, [("cat", (10, 10, 50, 50))]),
    ("e", "imgs/e.png", 100, 100, [("bird", (0, 0, 50, 50))]),
    ("f", "imgs/f.png", 100, 100, [("cat", (20, 20, 60, 60))]),
]
# rel1000 answers; record "d" has none. Pixels: x = v * width / 1000, y = v * height / 1000.
ANSWERS = {
    "a": 'Sure.\n```json\n[{"bbox_2d": [100, 100, 300, 300], "label": "cat"}, {"bbox_2d": [100, 100, 300, 300], "label": "cat"}, '
         '{"bbox_2d": [420, 400, 620, 500], "label": "dog"}, {"bbox_2d": [0, 0, 100, 100], "label": "cow"}, '
         '{"bbox": [600, 600, 900, 800], "label": "cat"}]\n```',
    1: '[{"bbox_2d": [100, 200, 400, 600], "label": "bird"}, {"bbox_2d": [5',
    "c": '[{"bbox_2d": [100, 100, 500, 500], "label": "dog"}, {"bbox_2d": [1100, 1100, 1200, 1200], "label": "dog"}, '
         '{"bbox_2d": [900, 900, 1100, 1100], "label": "cat"}]',
    "e": 'Here: {"bbox_2d": [0, 0, 500, 500], "label": "bird"}',
    "f": "I cannot see anything.",
}
# The detections by hand, in answer order, [x, y, w, h] pixels (cow: unknown; the 1100.. dog: outside the image).
EXPECTED_DETECTIONS = [
    (0, "cat", [50, 100, 100, 200]), (0, "cat", [50, 100, 100, 200]), (0, "dog", [210, 400, 100, 100]),
    (0, "cat", [300, 600, 150, 200]), (1, "bird", [100, 100, 300, 200]), (2, "dog", [20, 20, 80, 80]),
    (2, "cat", [180, 180, 20, 20]), (4, "bird", [0, 0, 50, 50]),
]
# Per sample at IoU 0.5, by hand: status, n_pred, tp, fp, fn, duplicates, degenerate, unknown_label, mean IoU.
EXPECTED_ROWS = [
    ("a", "ok", 4, 3, 2, 0, 1, 0, 1, (1 + 90 / 110 + 2 / 3) / 3),
    ("1", "truncated", 1, 1, 0, 0, 0, 0, 0, 1.0),
    ("c", "ok", 2, 1, 1, 1, 0, 1, 0, 1.0),
    ("d", "missing", 0, 0, 0, 1, 0, 0, 0, None),
    ("e", "bare_objects", 1, 1, 0, 0, 0, 0, 0, 1.0),
    ("f", "failed", 0, 0, 0, 1, 0, 0, 0, None),
]


def write_case(tmp_path):
    records = tmp_path / "val.jsonl"
    lines = []
    for rid, image, w, h, objects in RECORDS:
        line = {"image": image, "width": w, "height": h, "objects": [{"label": lab, "bbox": list(b)} for lab, b in objects]}
        if rid is not None:
            line["id"] = rid
        lines.append(json.dumps(line))
    records.write_text("\n".join(lines) + "\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": k, "answer": v}) + "\n" for k, v in ANSWERS.items()))
    return records, answers


def pycocotools_oracle():
    """COCO metrics of the hand-made set by pycocotools, from dicts built here (own category ids)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = {"cat": 7, "dog": 11, "bird": 3}
    images, annotations = [], []
    for i, (_, _, w, h, objects) in enumerate(RECORDS):
        images.append({"id": i, "width": w, "height": h})
        for label, (x1, y1, x2, y2) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat_ids[label],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": v, "name": k} for k, v in cat_ids.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([{"image_id": i, "category_id": cat_ids[label], "bbox": box, "score": 1.0}
                         for i, label, box in EXPECTED_DETECTIONS])
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        name = next(n for n, v in cat_ids.items() if v == cat_id)
        values = evaluator.eval["precision"][:, :, k, 0, -1]
        per_class[name] = float(values[values > -1].mean())
    s = evaluator.stats
    return {"mAP": s[0], "AP50": s[1], "AP75": s[2], "AR100": s[8], "per_class": per_class}


def test_score_hand_made_answers_against_pycocotools(tmp_path):
    records, answers = write_case(tmp_path)
    result = runner.invoke(app, ["eval", "score", "--records", str(records), "--answers", str(answers),
                                 "--out", str(tmp_path / "out"), "--name", "hand"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "hand"
    metrics = json.loads((folder / "metrics.json").read_text())["hand"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"hand": metrics}
    oracle = pycocotools_oracle()
    for key in ("mAP", "AP50", "AP75", "AR100"):
        assert metrics[key] == pytest.approx(oracle[key], abs=1e-9), key
    assert metrics["per_class"] == pytest.approx(oracle["per_class"], abs=1e-9)
    assert 0 < metrics["mAP"] < metrics["AP50"] < 1  # the case is not trivially perfect or empty
    # Counts, by hand.
    assert (metrics["parse_failures"], metrics["truncated"], metrics["bare_objects"], metrics["missing_answers"]) == (1, 1, 1, 1)
    assert (metrics["unknown_labels"], metrics["degenerate_boxes"], metrics["duplicates"], metrics["n_pred"]) == (1, 1, 1, 8)
    assert metrics["duplicate_rate"] == pytest.approx(1 / 8)
    assert (metrics["tp50"], metrics["fp50"], metrics["fn50"]) == (6, 3, 3)
    assert metrics["mean_best_iou"] == pytest.approx((1 + 90 / 110 + 2 / 3 + 1 + 1 + 1) / 6)
    # COCO files: image ids are line indices, file names exactly as written, boxes in original pixels.
    gt = json.loads((folder / "gt.json").read_text())
    assert [(i["id"], i["file_name"]) for i in gt["images"]] == [(i, r[1]) for i, r in enumerate(RECORDS)]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    detections = json.loads((folder / "detections.json").read_text())
    assert [(d["image_id"], names[d["category_id"]], d["bbox"]) for d in detections] == EXPECTED_DETECTIONS
    assert {d["score"] for d in detections} == {1.0}
    rows = pq.read_table(folder / "per_sample.parquet").to_pylist()
    for row, (rid, status, n_pred, tp, fp, fn, dup, degenerate, unknown, iou) in zip(rows, EXPECTED_ROWS):
        assert (row["id"], row["status"], row["n_pred"], row["tp"], row["fp"], row["fn"]) == (rid, status, n_pred, tp, fp, fn)
        assert (row["duplicates"], row["degenerate"], row["unknown_label"]) == (dup, degenerate, unknown)
        assert np.isnan(row["mean_iou"]) if iou is None else row["mean_iou"] == pytest.approx(iou)
    assert "mAP" in result.output and "hand" in result.output


@pytest.mark.parametrize("line, message", [
    ('{"id": "zz", "answer": "[]"}', r"answers\.jsonl:2: id 'zz' names no record"),
    ('{"id": "a", "answer": "[]"}', r"answers\.jsonl:2: duplicate id 'a' \(first at line 1\)"),
    ('{"id": "c"}', r"answers\.jsonl:2: expected"),
    ("{oops", r"answers\.jsonl:2: malformed JSON"),
])
def test_bad_answers_file_names_file_and_line(tmp_path, line, message):
    records, answers = write_case(tmp_path)
    answers.write_text('{"id": "a", "answer": "[]"}\n' + line + "\n")
    result = runner.invoke(app, ["eval", "score", "--records", str(records), "--answers", str(answers),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    import re

    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "out").exists()


def test_abs_needs_the_processor(tmp_path):
    records, answers = write_case(tmp_path)
    result = runner.invoke(app, ["eval", "score", "--records", str(records), "--answers", str(answers), "--coord-format", "abs"])
    assert result.exit_code == 2 and "--processor" in result.output


# --- the tiny Qwen3-VL: training callback, then hsm eval run on the saved model ------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_corpus, demo_config):
    from hsm.run import train

    root = tmp_path_factory.mktemp("eval_run")
    corpus = make_corpus(8, 4, 3)
    cfg = demo_config(corpus, root / "run", "training.num_train_epochs=1", "training.logging_steps=1",
                      "training.report_to=[tensorboard]", "custom.hard_sample_mining.enabled=false",
                      "custom.detection_eval={enabled: true, every: 1, max_samples: 2, max_new_tokens: 4, batch_size: 2}",
                      val=True)
    (root / "val.jsonl").symlink_to(corpus["bbu"].with_name("val.jsonl"))
    summary = train(cfg)
    summary["trainer"].save_model(str(root / "ckpt"))
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return root, summary


@pytest.mark.slow
def test_training_callback_writes_and_logs_detection_metrics(trained):
    root, summary = trained
    steps = summary["global_step"]
    assert steps >= 2
    for step in range(1, steps + 1):
        assert (root / "run" / "eval" / f"step={step}" / "bbu" / "per_sample.parquet").is_file()
    metrics = json.loads((root / "run" / "eval" / f"step={steps}" / "metrics.json").read_text())["bbu"]
    logged = [entry for entry in summary["trainer"].state.log_history if "eval/bbu/parse_failures" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, steps + 1))
    assert logged[-1]["eval/bbu/parse_failures"] == metrics["parse_failures"]
    assert logged[-1]["eval/bbu/mAP"] == metrics["mAP"]
    assert metrics["n_images"] == 2


@pytest.mark.slow
def test_eval_run_generates_then_scores_with_the_same_code(trained):
    root, _ = trained
    out = root / "eval_cli"
    result = runner.invoke(app, ["eval", "run", str(root / "cfg.yaml"), "--checkpoint", str(root / "ckpt"),
                                 "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    val = root / "val.jsonl"
    ids = [json.loads(line)["id"] for line in val.read_text().splitlines()]
    lines = [json.loads(line) for line in (out / "bbu" / "answers.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ids
    rows = pq.read_table(out / "bbu" / "per_sample.parquet").to_pylist()
    assert [r["status"] for r in rows] == [parse_answer(line["answer"]).status for line in lines]
    metrics = json.loads((out / "metrics.json").read_text())["bbu"]
    assert metrics["parse_failures"] == sum(r["status"] == "failed" for r in rows)
    # Scoring the written answers again gives the same numbers: one code path.
    again = runner.invoke(app, ["eval", "score", "--records", str(val), "--answers", str(out / "bbu" / "answers.jsonl"),
                                "--out", str(root / "rescored"), "--name", "bbu"])
    assert again.exit_code == 0, again.output
    assert json.loads((root / "rescored" / "metrics.json").read_text()) == {"bbu": metrics}


@pytest.mark.slow
def test_eval_run_writes_beside_the_checkpoint_by_default(trained):
    root, _ = trained
    result = runner.invoke(app, ["eval", "run", str(root / "cfg.yaml"), "--checkpoint", str(root / "ckpt"),
                                 "--max-new-tokens", "4", "--batch-size", "1", "--max-samples", "1"])
    assert result.exit_code == 0, result.output
    # Not inside the checkpoint, which checkpoint rotation deletes whole.
    assert (root / "eval" / "ckpt" / "bbu" / "per_sample.parquet").is_file()
    assert not (root / "ckpt" / "eval").exists()


@pytest.mark.slow
def test_eval_run_rejects_a_dataset_without_val_split(trained):
    root, _ = trained
    result = runner.invoke(app, ["eval", "run", str(root / "cfg.yaml"), "--checkpoint", str(root / "ckpt"),
                                 "--datasets", "lvis"])
    assert result.exit_code == 2
    assert "custom.fusion_config.sources.0.val_jsonl: not set" in " ".join(result.output.split())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(), max_size=30), st.integers(1, 8))
def test_merge_shards_undoes_shard(items, world_size):
    assert merge_shards([shard(items, rank, world_size) for rank in range(world_size)]) == items


@pytest.mark.slow
def test_eval_run_on_two_ranks_equals_one_process(trained, tmp_path):
    """`torchrun --nproc_per_node 2 -m hsm.cli.app eval run ...` (gloo): each rank generates its shard, rank 0
    gathers, scores and writes; the files equal a single process's, and the summary is printed once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _ = trained
    args = ["eval", "run", str(root / "cfg.yaml"), "--checkpoint", str(root / "ckpt"), "--max-new-tokens", "6",
            "--batch-size", "1", "--max-samples", "3"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "hsm.cli.app", *args, "--out", str(tmp_path / "two")],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "terminate called" not in done.stderr
    answers = (tmp_path / "two" / "bbu" / "answers.jsonl").read_text()
    assert answers == (tmp_path / "one" / "bbu" / "answers.jsonl").read_text() and answers.count("\n") == 3
    for name in ("metrics.json", "bbu/detections.json", "bbu/gt.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["bbu"]["n_images"] == 3


def test_evaluation_under_a_launcher_without_a_process_group_is_refused(tmp_path, monkeypatch):
    """WORLD_SIZE=2 without a process group would let rank 0 score half the val set as if it were all of it."""
    from hsm.config import FusionConfig
    from hsm.eval.evaluate import EvalSplit, evaluate_model

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    fusion = FusionConfig.model_validate({"target": {"name": "bbu"}})
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .* no torch.distributed process group"):
        evaluate_model(None, None, fusion, [EvalSplit("bbu", tmp_path / "val.jsonl")], tmp_path / "out", "rel1000",
                       max_new_tokens=1, batch_size=1)
    assert not (tmp_path / "out").exists()


def test_evaluation_schedule():
    from hsm.eval.callback import should_evaluate

    assert [s for s in range(1, 10) if should_evaluate(3, s, epoch_end=False)] == [3, 6, 9]
    assert not should_evaluate(3, 6, epoch_end=True)  # step mode never fires on the epoch hook
    assert should_evaluate("epoch", 7, epoch_end=True) and not should_evaluate("epoch", 7, epoch_end=False)


@pytest.mark.parametrize("section, message", [
    ({"every": 0}, "custom.detection_eval.every: must be 'epoch' or a number of optimizer steps >= 1"),
    ({"datasets": ["bbu", "nope"]}, "custom.detection_eval.datasets: ['nope'] not in the fusion"),
    ({"max_samples": 0}, "custom.detection_eval.max_samples"),
])
def test_detection_eval_config_errors_name_the_key(section, message):
    from hsm.config import ConfigError
    from hsm.config_load import parse_config

    with pytest.raises(ConfigError) as error:
        parse_config({"custom": {"fusion_config": {"target": {"name": "bbu"}}, "detection_eval": {"enabled": True, **section}}})
    assert message in str(error.value)


def test_abs_answers_score_through_the_processors_resize(tmp_path):
    from hsm.data.answer import format_answer, resized_size
    from hsm.config import ModelConfig
    from hsm.train.model import build_processor

    records, _ = write_case(tmp_path)
    processor = build_processor(ModelConfig())
    answers = tmp_path / "abs.jsonl"
    lines = []
    for i, (rid, _, w, h, objects) in enumerate(RECORDS):
        text = format_answer([b for _, b in objects], [lab for lab, _ in objects], w, h, "abs", resized_size(processor, w, h))
        lines.append(json.dumps({"id": rid if rid is not None else i, "answer": text}))
    answers.write_text("\n".join(lines) + "\n")
    scored = {}
    for coord_format in ("abs", "rel1000"):
        result = runner.invoke(app, ["eval", "score", "--records", str(records), "--answers", str(answers), "--coord-format",
                                     coord_format, "--processor", "tiny-qwen3-vl", "--out", str(tmp_path / coord_format)])
        assert result.exit_code == 0, result.output
        scored[coord_format] = json.loads((tmp_path / coord_format / "metrics.json").read_text())["val"]
    assert scored["abs"]["AP50"] == 1.0 and scored["abs"]["tp50"] == sum(len(r[4]) for r in RECORDS)
    assert scored["rel1000"]["AP50"] < 0.5  # the same text read in the wrong format misses


def test_an_answer_of_20000_boxes_scores_in_bounded_memory():
    import tracemalloc
    from pathlib import Path

    from hsm.data.answer import MAX_BOXES
    from hsm.data.records import DetectionObject, Record
    from hsm.eval.metrics import score_dataset

    record = Record(image=Path("a.png"), width=1000, height=1000, id="a", where="r.jsonl:1",
                    objects=(DetectionObject("x", (0.0, 0.0, 10.0, 10.0)), DetectionObject("x", (20.0, 20.0, 30.0, 30.0))))
    n = 20_000
    answer = json.dumps([{"bbox_2d": [0, 0, 10, 10], "label": "x"}] * n)  # rel1000 on 1000 px: the first GT box
    tracemalloc.start()
    try:
        score = score_dataset([record], ["a.png"], [answer], "rel1000")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One n x n IoU matrix would be 3.2 GB; the answer text and its parsed objects are what remains.
    assert peak < 200 * 2**20, peak
    assert score.per_sample["over_cap"] == [n - MAX_BOXES]
    assert score.metrics["boxes_over_cap"] == n - MAX_BOXES
    assert (score.metrics["n_pred"], score.metrics["tp50"], score.metrics["fn50"]) == (MAX_BOXES, 1, 1)
