"""Bad images: found by ``hsm data validate`` and before step 0, each naming the record's file and line."""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import pytest
from PIL import Image
from typer.testing import CliRunner

from hsm.cli.app import app
from hsm.config import ModelConfig
from hsm.config_load import parse_config
from hsm.data.fusion import FusionDataset
from hsm.data.images import check_record_images, decode_bound, header_problems, image_problems
from hsm.data.records import RecordError, read_jsonl
from hsm.train.model import build_processor


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header declares ``width x height`` and that holds no pixel data: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _record(name: str, width: int = 10, height: int = 8) -> dict:
    return {"image": name, "width": width, "height": height, "objects": [{"label": "x", "bbox": [1, 1, 5, 5]}]}


@pytest.fixture
def bad_images(tmp_path):
    """A JSONL whose line N holds the kind of image named in ``kinds[N - 1]``."""
    Image.new("RGB", (10, 8), (200, 10, 10)).save(tmp_path / "good.png")
    noisy = Image.effect_noise((10, 8), 60).convert("RGB")
    noisy.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    Image.new("RGB", (12, 8)).save(tmp_path / "wider.png")
    side = int(decode_bound() ** 0.5) + 10  # over Pillow's bound, under twice it: only the header can tell
    _png_header_only(tmp_path / "bomb.png", side, side)
    _png_header_only(tmp_path / "huge.png", 100_000, 100_000)  # over twice the bound: Pillow refuses at open
    kinds = ["good", "truncated", "empty", "text", "wider", "bomb", "huge"]
    lines = [_record(f"{k}.png", *((side, side) if k == "bomb" else (100_000, 100_000) if k == "huge" else (10, 8)))
             for k in kinds]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, kinds


EXPECTED = {"truncated": "cannot be decoded", "empty": "is empty (0 bytes)", "text": "cannot be decoded",
            "wider": "is 12x8, the record says 10x8", "bomb": "over the decoding bound", "huge": "decompression bomb"}


def test_validate_names_every_bad_image_by_line(bad_images):
    path, kinds = bad_images
    result = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert f"{len(EXPECTED)} problems in {len(kinds)} readable records" in out
    for line, kind in enumerate(kinds, start=1):
        if kind in EXPECTED:
            assert f"d.jsonl:{line}: image " in out and f"{kind}.png" in out and EXPECTED[kind] in out
    assert "Traceback" not in out


def test_header_check_finds_all_but_truncation_and_decoding_finds_it(bad_images):
    path, kinds = bad_images
    records = read_jsonl(path)
    by_kind = dict(zip(kinds, records))
    for kind, record in by_kind.items():
        found = image_problems(record)
        assert bool(found) == (kind != "good"), (kind, found)
        assert all(p.startswith(f"{path}:{kinds.index(kind) + 1}: ") for p in found)
        header = header_problems(record)
        assert bool(header) == (kind not in ("good", "truncated")), (kind, header)


def test_training_load_of_an_unreadable_image_names_the_record(bad_images):
    path, kinds = bad_images
    keep = ["good", "truncated"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[kinds.index(k)] for k in keep) + "\n")
    cfg = parse_config({"custom": {"fusion_config": {"target": {"name": "t", "train_jsonl": str(path)}}}})
    dataset = FusionDataset(cfg.custom.fusion_config, build_processor(ModelConfig()), cfg.model)
    dataset[(0, 0, False, 0, 0)]
    with pytest.raises(RecordError, match=r"d\.jsonl:2: image .*truncated\.png cannot be decoded"):
        dataset[(0, 1, False, 0, 1)]


@pytest.mark.parametrize("decode", [True, False])
def test_start_up_check_lists_every_bad_image(bad_images, decode):
    # Before step 0 the pixels are decoded (bounded), so a truncated file fails there, not mid-epoch.
    path, kinds = bad_images
    records = read_jsonl(path)
    with pytest.raises(RecordError) as caught:
        check_record_images([records[:3], records[3:]], max_side=None, n_threads=2, decode=decode)
    message = str(caught.value)
    bad = [k for k in kinds if k != "good" and (decode or k != "truncated")]
    assert message.startswith(f"{len(bad)} image problems before training")
    # Only a header-only check sends the user to decode again: a decoding one has read the pixels.
    assert ("hsm data validate" in message) == (not decode)
    for line, kind in enumerate(kinds, start=1):
        assert (f"d.jsonl:{line}: " in message) == (kind in bad)


def test_training_refuses_a_bad_image_before_step_0(make_corpus, demo_config, tmp_path):
    corpus = make_corpus(8, 4, 0)
    data = tmp_path / "data"
    root = corpus["bbu"].parent.parent
    shutil.copytree(root, data)
    copied = {name: data / path.relative_to(root) for name, path in corpus.items()}
    target = copied["bbu"]
    third = json.loads(target.read_text().splitlines()[2])
    (target.parent / third["image"]).write_bytes(b"")
    out = tmp_path / "run"
    cfg = demo_config(copied, out)
    from hsm.run import train

    with pytest.raises(RecordError, match=rf"{target.name}:3: image .* is empty \(0 bytes\)"):
        train(cfg)
    # Nothing left: the hsm/ this start created held only its lock, and goes with the failed start.
    assert not (out / "hsm").exists()
