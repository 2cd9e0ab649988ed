"""``hsm report`` on a run built from the real event writer and planner, checked in headless Chromium."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from browser import find_chromium, load_page, page_url
from hsm.cli.app import app
from hsm.config import MiningConfig
from hsm.mining.event_writer import EventBatch, EventWriter
from hsm.mining.planner import PlanRequest, plan_epoch
from hsm.data.records import read_jsonl
from hsm.report import build_report
from hsm.mining.suspects import data_map, read_epoch_metrics
from hsm.data.synth import synthesize

runner = CliRunner()
N_EPOCHS = 4
TOP_K = 6


def write_run(root: Path, *, n_target: int = 40, wrong: int = 3) -> Path:
    """A run directory: synthetic corpus, 4 epochs of events, plans 1..4 and the saved config.

    Losses fall over the epochs for every sample but ``wrong``, which stays high (a sample
    whose label the model cannot learn).
    """
    paths = synthesize(root / "data", n_target=n_target, n_source=8, n_val=2)
    records = read_jsonl(paths["bbu"], check_images=False)
    run = root / "run"
    hsm_dir = run / "hsm"
    rng = np.random.default_rng(0)
    mining = MiningConfig(enabled=True, selector={"mode": "top_k", "k": 5}, hard_weight=3.0)
    config = {"custom": {"hard_sample_mining": mining.model_dump(mode="json"),
                         "fusion_config": {"target": {"name": "bbu", "train_jsonl": str(paths["bbu"])}}}}
    hsm_dir.mkdir(parents=True)
    (hsm_dir / "config.yaml").write_text(yaml.safe_dump(config))
    base_loss = rng.uniform(1.0, 3.0, n_target)
    step = 0
    with EventWriter(hsm_dir, run_id="run", rank=0, attempt=0) as writer:
        for epoch in range(N_EPOCHS):
            order = rng.permutation(n_target)
            for start in range(0, n_target, 8):
                batch = order[start:start + 8]
                loss = [float(base_loss[i] * (0.7 ** epoch) + rng.normal(0, 0.05)) if i != wrong
                        else float(4.0 + rng.normal(0, 0.02)) for i in batch]
                writer.append(EventBatch(
                    epoch=epoch, global_step=step, dataset=["bbu"] * len(batch), base_idx=batch.tolist(),
                    sample_id=[records[i].id for i in batch], loss=loss,
                    token_acc=[float(np.clip(1 - x / 5, 0, 1)) for x in loss], n_tokens=[20] * len(batch),
                    aug_seed=[0] * len(batch), drawn_as_hard=[False] * len(batch),
                ))
                step += 1
            writer.flush()
            plan_epoch(PlanRequest(hsm_dir, epoch + 1, mining, "bbu"))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("report"))


def test_report_page_and_suspects_csv(run_dir, tmp_path):
    result = runner.invoke(app, ["report", "--run-dir", str(run_dir), "--out", str(tmp_path / "r.html"),
                                 "--top", str(TOP_K)])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text()
    assert html.count('class="card"') >= 2 * TOP_K
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    rows = list(csv.DictReader((tmp_path / "suspects.csv").open(newline="")))
    assert (tmp_path / "suspects.csv").read_bytes().count(b"\r") == 0
    dm = data_map(read_epoch_metrics(run_dir / "hsm", range(N_EPOCHS), "bbu", "loss"))
    assert {int(r["base_idx"]) for r in rows} == set(dm.base_idx[dm.is_suspect].tolist())
    assert 3 in {int(r["base_idx"]) for r in rows}  # the planted sample
    # The loss per epoch in a caption is labelled by epoch: e0..e3 for the hardest card.
    assert all(f"e{e}: " in html for e in range(N_EPOCHS))


def test_galleries_decode_only_the_images_they_show(run_dir, tmp_path):
    first = build_report(run_dir, tmp_path / "a.html", top_k=TOP_K)
    shown = set()
    for line in first.html.read_text().splitlines():
        if 'data-sample-id="' in line:
            shown.add(line.split('data-sample-id="')[1].split('"')[0])
    records = read_jsonl(Path(yaml.safe_load((run_dir / "hsm" / "config.yaml").read_text())
                              ["custom"]["fusion_config"]["target"]["train_jsonl"]), check_images=False)
    hidden = [r for r in records if r.id not in shown]
    assert hidden
    moved = []
    for record in hidden:  # images no card shows are made unreadable; the page must not notice
        target = record.image.with_suffix(".hidden")
        record.image.rename(target)
        moved.append((target, record.image))
    try:
        second = build_report(run_dir, tmp_path / "b.html", top_k=TOP_K)
        assert "image not found" not in second.html.read_text()
    finally:
        for target, original in moved:
            target.rename(original)


def test_a_shown_image_that_cannot_be_decoded_is_a_card_note_not_a_traceback(run_dir, tmp_path):
    first = build_report(run_dir, tmp_path / "a.html", top_k=TOP_K)
    shown = _shown_ids(first.html.read_text(), "hardest")[0]
    records = read_jsonl(Path(yaml.safe_load((run_dir / "hsm" / "config.yaml").read_text())
                              ["custom"]["fusion_config"]["target"]["train_jsonl"]), check_images=False)
    image = next(r.image for r in records if r.id == shown)
    good = image.read_bytes()
    try:
        image.write_bytes(good[: len(good) // 3])  # truncated mid-file
        result = runner.invoke(app, ["report", "--run-dir", str(run_dir), "--out", str(tmp_path / "b.html"),
                                     "--top", str(TOP_K)])
        assert result.exit_code == 0, result.output
        html = (tmp_path / "b.html").read_text()
        assert f"image cannot be decoded: {image}" in html
    finally:
        image.write_bytes(good)


def test_report_errors_name_the_problem(tmp_path):
    result = runner.invoke(app, ["report", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no hsm/ directory" in result.output
    (tmp_path / "hsm").mkdir()
    (tmp_path / "hsm" / "config.yaml").write_text("custom: {hard_sample_mining: {enabled: true}}\n")
    result = runner.invoke(app, ["report", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no plans yet" in result.output


@pytest.mark.parametrize("mining", ["custom: {}", "custom: {hard_sample_mining: null}",
                                    "custom: {hard_sample_mining: {enabled: false}}"])
def test_report_on_a_mining_off_run_says_mining_is_off(tmp_path, mining):
    (tmp_path / "hsm").mkdir()
    (tmp_path / "hsm" / "config.yaml").write_text(mining + "\n")
    result = runner.invoke(app, ["report", "--run-dir", str(tmp_path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "mining is off in this run" in text
    assert "hsm plan" not in text  # which would refuse: mining is off


PROBE = """(() => {
  const imgs = Array.from(document.images);
  return {
    images: imgs.map(i => ({id: i.id, alt: i.alt, complete: i.complete, width: i.naturalWidth})),
    hardest: document.querySelectorAll('#hardest-gallery .card').length,
    easiest: document.querySelectorAll('#easiest-gallery .card').length,
    dataMap: (() => { const m = document.getElementById('data-map'); return m ? m.naturalWidth : -1; })(),
  };
})()"""


def test_report_in_headless_chromium(run_dir, tmp_path):
    assert find_chromium(), "chromium is not installed: make test-deps installs it (apt-get install chromium)"
    report = build_report(run_dir, tmp_path / "report.html", top_k=TOP_K)
    page = load_page(page_url(report.html), PROBE)
    (tmp_path / "screenshot.png").write_bytes(page.screenshot)
    assert page.errors == []
    probe = page.probe
    assert probe["images"] and all(i["complete"] and i["width"] > 0 for i in probe["images"]), probe["images"]
    assert probe["hardest"] == TOP_K and probe["easiest"] == TOP_K
    assert probe["dataMap"] > 0
    assert page.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(tmp_path / "screenshot.png") as shot:
        assert shot.size == (1280, 1000)
        # Not a blank page: the screenshot has many distinct colours (plots, thumbnails).
        assert len(shot.convert("RGB").getcolors(maxcolors=1 << 20)) > 100


def test_eval_output_beside_the_ground_truth(run_dir, tmp_path):
    """``hsm eval score`` over the training records: its per-sample TP/FP/FN and the answer's boxes show."""
    from hsm.data.answer import format_answer

    first = build_report(run_dir, tmp_path / "a.html", top_k=TOP_K)
    hardest_id = first.html.read_text().split('data-sample-id="')[1].split('"')[0]
    train_jsonl = Path(yaml.safe_load((run_dir / "hsm" / "config.yaml").read_text())
                       ["custom"]["fusion_config"]["target"]["train_jsonl"])
    records = {r.id: r for r in read_jsonl(train_jsonl, check_images=False)}
    record = records[hardest_id]
    # Every object found, plus one box of a known label where there is nothing: TP = n, FP = 1, FN = 0.
    boxes = [o.bbox for o in record.objects] + [(0.0, 0.0, 3.0, 3.0)]
    labels = [o.label for o in record.objects] + [record.objects[0].label]
    answer = format_answer(boxes, labels, record.width, record.height, "rel1000")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": hardest_id, "answer": answer}) + "\n")
    eval_dir = run_dir / "eval"
    try:
        result = runner.invoke(app, ["eval", "score", "--records", str(train_jsonl), "--answers", str(answers),
                                     "--name", "bbu", "--out", str(eval_dir)])
        assert result.exit_code == 0, result.output
        (eval_dir / "bbu" / "answers.jsonl").write_text(answers.read_text())  # as hsm eval run leaves it
        html = build_report(run_dir, tmp_path / "b.html", top_k=TOP_K).html.read_text()
    finally:
        import shutil

        shutil.rmtree(eval_dir, ignore_errors=True)
    card = html.split(f'data-sample-id="{hardest_id}"')[1].split('class="card"')[0]
    assert card.count("<img ") == 2 and "predicted boxes" in card
    assert f"<dd>{len(record.objects)}/1/0</dd>" in card
    # Each box's label: the ground truth's and the answer's, numbered as on the thumbnails.
    numbered = lambda names: ", ".join(f"{k} {name}" for k, name in enumerate(names, start=1))  # noqa: E731
    assert f'<dd class="labels">{numbered(o.label for o in record.objects)}</dd>' in card
    assert f'<dd class="predicted-labels">{numbered(labels)}</dd>' in card
    assert 'class="predicted-labels"' not in first.html.read_text()  # no eval output, no predicted labels


@settings(max_examples=50, deadline=None)
@given(scores=st.lists(st.one_of(st.sampled_from([0.0, 1.0, 2.5, float("nan")]), st.floats(-5, 5)), max_size=12),
       hardest=st.booleans())
def test_report_order_is_the_planners_rank_order_with_nan_last(scores, hardest):
    from hsm.report.data import order_by_score

    ids = [f"s{(7 * i) % 13:02d}" for i in range(len(scores))]  # ties broken by id, not by row
    plan = pa.table({"score": pa.array(scores, pa.float64()), "sample_id": ids})
    observed = [i for i in range(len(scores)) if scores[i] == scores[i]]
    naive = sorted(observed, key=lambda i: ((-scores[i] if hardest else scores[i]), ids[i]))
    naive += sorted((i for i in range(len(scores)) if i not in observed), key=lambda i: ids[i])
    assert order_by_score(plan, hardest=hardest).tolist() == naive


def _eval_answer_for(run_dir: Path, sample_id: str) -> Path:
    """``hsm eval score`` output under ``run_dir/eval`` answering ``sample_id`` with its own boxes plus a
    stray one (the caller removes the folder)."""
    from hsm.data.answer import format_answer

    train_jsonl = Path(yaml.safe_load((run_dir / "hsm" / "config.yaml").read_text())
                       ["custom"]["fusion_config"]["target"]["train_jsonl"])
    record = {r.id: r for r in read_jsonl(train_jsonl, check_images=False)}[sample_id]
    boxes = [o.bbox for o in record.objects] + [(0.0, 0.0, 3.0, 3.0)]
    labels = [o.label for o in record.objects] + [record.objects[0].label]
    eval_dir = run_dir / "eval"
    eval_dir.mkdir()
    answers = eval_dir / "answers.jsonl"
    answers.write_text(json.dumps({"id": sample_id, "answer": format_answer(boxes, labels, record.width,
                                                                            record.height, "rel1000")}) + "\n")
    result = runner.invoke(app, ["eval", "score", "--records", str(train_jsonl), "--answers", str(answers),
                                 "--name", "bbu", "--out", str(eval_dir)])
    assert result.exit_code == 0, result.output
    (eval_dir / "bbu" / "answers.jsonl").write_text(answers.read_text())  # as hsm eval run leaves it
    return eval_dir


def _shown_ids(html: str, gallery: str) -> list[str]:
    part = html.split(f'id="{gallery}-gallery"')[1].split("</section>")[0]
    return [chunk.split('"')[0] for chunk in part.split('data-sample-id="')[1:]]


def test_red_predictions_are_announced_only_when_a_shown_card_has_them(run_dir, tmp_path):
    import shutil

    html = build_report(run_dir, tmp_path / "a.html", top_k=2).html.read_text()
    shown = set(_shown_ids(html, "hardest")) | set(_shown_ids(html, "easiest")) | set(_shown_ids(html, "suspects"))
    train_jsonl = yaml.safe_load((run_dir / "hsm" / "config.yaml").read_text())["custom"]["fusion_config"]["target"]
    unseen = next(r.id for r in read_jsonl(train_jsonl["train_jsonl"], check_images=False)
                  if r.id not in shown and r.objects)
    for sample_id, announced in ((unseen, False), (_shown_ids(html, "hardest")[0], True)):
        eval_dir = _eval_answer_for(run_dir, sample_id)
        try:
            page = build_report(run_dir, tmp_path / "b.html", top_k=2).html.read_text()
        finally:
            shutil.rmtree(eval_dir, ignore_errors=True)
        assert ("predictions from hsm eval in red" in page) == announced, sample_id
        assert ("predicted boxes" in page) == announced


def test_selector_shows_its_mode_and_the_one_setting_it_uses(run_dir, tmp_path):
    from hsm.config import describe_selector

    html = build_report(run_dir, tmp_path / "a.html", top_k=2).html.read_text()
    assert '<td class="l">top_k 5</td>' in html and "{&#39;mode&#39;" not in html and "{'mode'" not in html
    assert describe_selector({"mode": "percentile", "k": 500, "value": 0.2, "threshold": None}) == "percentile 0.2"
    assert describe_selector({"mode": "threshold", "k": 500, "value": 0.1, "threshold": 1.5}) == "threshold 1.5"
    assert describe_selector(None) is None


def test_empty_answers_are_flagged_not_sent_for_relabelling(tmp_path):
    """The sample that stays hardest has no objects (answer ``[]``): its card and the section say so."""
    run = write_run(tmp_path, n_target=24, wrong=3)
    train_jsonl = Path(yaml.safe_load((run / "hsm" / "config.yaml").read_text())
                       ["custom"]["fusion_config"]["target"]["train_jsonl"])
    lines = [json.loads(line) for line in train_jsonl.read_text().splitlines()]
    lines[3]["objects"] = []
    train_jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    html = build_report(run, tmp_path / "r.html", top_k=4).html.read_text()
    hardest = html.split('id="hardest-gallery"')[1].split("</section>")[0]
    first_card = hardest.split('class="card"')[1]
    assert f'data-sample-id="{lines[3]["id"]}"' in first_card and "empty answer (no objects)" in first_card
    assert hardest.count("empty answer (no objects)") == 1
    section = html.split('id="hardest"')[1].split('id="hardest-gallery"')[0]
    assert "1 of these is an image with no objects" in section and "correct negatives rank hard" in section


CARD_PROBE = """(() => Array.from(document.querySelectorAll('.card')).map(card => {
  const box = card.getBoundingClientRect();
  return Array.from(card.querySelectorAll('img')).map(img => {
    const r = img.getBoundingClientRect();
    return {left: r.left - box.left, right: box.right - r.right, width: r.width};
  });
}))()"""


@pytest.mark.parametrize("width", [1300])
def test_predicted_thumbnail_stays_inside_its_card(run_dir, tmp_path, width):
    import shutil

    assert find_chromium(), "chromium is not installed: make test-deps installs it (apt-get install chromium)"
    first = build_report(run_dir, tmp_path / "a.html", top_k=TOP_K).html.read_text()
    eval_dir = _eval_answer_for(run_dir, _shown_ids(first, "hardest")[0])
    try:
        report = build_report(run_dir, tmp_path / "b.html", top_k=TOP_K)
    finally:
        shutil.rmtree(eval_dir, ignore_errors=True)
    page = load_page(page_url(report.html), CARD_PROBE, width=width)
    assert page.errors == []
    pairs = [imgs for imgs in page.probe if len(imgs) == 2]
    assert pairs, "no card with a predicted thumbnail"
    for imgs in page.probe:
        for img in imgs:
            assert img["left"] >= 0 and img["right"] >= 0 and img["width"] > 20, (width, imgs)
    for left, right in pairs:  # both thumbnails get the same share of the card
        assert abs(left["width"] - right["width"]) <= 1, (width, pairs)
