"""docs/mining_effect.md leads with the verdict, and that block is what the committed runs give.

The runs of part 2 are kept in docs/mining_effect_part2/runs; the doc's verdict block is written from them by
``python bench/mining_effect_report.py docs/mining_effect_part2 --doc docs/mining_effect.md``. A run committed
without rewriting the block (or a number edited by hand) fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.mining_effect_report import (  # noqa: E402
    DOC_BEGIN, DOC_END, ENDPOINTS, doc_block, load_runs, read_doc_block, write_doc_block)


def test_the_docs_verdict_block_is_what_the_committed_runs_give():
    doc = ROOT / "docs" / "mining_effect.md"
    runs = load_runs(ROOT / "docs" / "mining_effect_part2")
    assert runs, "no committed runs in docs/mining_effect_part2/runs"
    assert read_doc_block(doc) == doc_block(runs), (
        "docs/mining_effect.md's verdict block is stale: run `python bench/mining_effect_report.py "
        "docs/mining_effect_part2 --doc docs/mining_effect.md`")
    # It leads the doc: nothing but the title and one paragraph before it.
    assert doc.read_text().index(DOC_BEGIN) < doc.read_text().index("## ")


def test_a_doc_without_its_markers_is_refused_by_name_and_left_as_it_was(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text(f"# notes\n\n{DOC_END}\n\n{DOC_BEGIN}\n")  # both, in the wrong order
    with pytest.raises(ValueError, match="notes.md"):
        write_doc_block(doc, "| a | b |\n")
    assert doc.read_text() == f"# notes\n\n{DOC_END}\n\n{DOC_BEGIN}\n"
    assert list(tmp_path.iterdir()) == [doc]
    doc.write_text(f"# notes\n\n{DOC_BEGIN}\nold\n{DOC_END}\n\nrest\n")
    write_doc_block(doc, "new\n")
    assert read_doc_block(doc) == "new\n" and doc.read_text().endswith(f"{DOC_END}\n\nrest\n")


def _synthetic(n_seeds: dict[str, int], shift: float = 0.0) -> list[dict]:
    """Runs with every metric the block reads; ``shift`` moves every value of the arms short of 16 seeds."""
    rng = np.random.default_rng(0)
    runs = []
    for arm, n in n_seeds.items():
        for seed in range(n):
            move = shift if n < 16 else 0.0
            val = {e: {k: float(rng.uniform(0.1, 0.9)) + move for k in ("AP50", "recall50", "F1_50")}
                   for e in ENDPOINTS}
            # Logged every 25 of 628 steps over 4 epochs; epoch 0 (steps <= 157) the same in every arm of a seed.
            losses = [[step, 1.0 / (step + seed) if step <= 157 else float(rng.uniform())] for step in range(25, 629, 25)]
            runs.append({"seed": seed, "arm": arm, "val": val, "seconds": 300.0, "commit": "c0ffee0" * 6,
                         "global_step": 628, "preset": {"epochs": 4}, "logged_losses": losses})
    return runs


def test_an_unread_arm_cannot_move_a_single_character_of_the_block():
    """Blinding as a property: the block is the same whatever the values of the arms short of their seeds."""
    seeds = {"uniform": 16, "uniform_replicate": 16, "oracle": 16, "loss": 9, "fixed_set_60": 16, "uniform_60": 12}
    block = doc_block(_synthetic(seeds))
    assert block == doc_block(_synthetic(seeds, shift=0.05)) == doc_block(_synthetic(seeds, shift=-0.3))
    assert "Interim verdict" in block and "val recall@0.5" in block and "val F1@0.5" in block
    assert "| loss | 9 | not read" in block and "not read (12 of 16 seeds)" in block
    # A read arm is shown, and moving it moves the block.
    moved = [{**r, "val": {**r["val"], "rare": {k: v + 0.1 for k, v in r["val"]["rare"].items()}}}
             if r["arm"] == "oracle" else r for r in _synthetic(seeds)]
    assert doc_block(moved) != block
    # Both compute-saving arms read: fixed_set_60 against uniform_60 as well; the added arm once it has its seeds.
    seeds["uniform_60"] = 16
    assert "fixed_set_60 at uniform's reduced step count" in doc_block(_synthetic(seeds))
    seeds["fixed_set_60_cover"] = 15
    assert "fixed_set_60_cover at uniform's" not in doc_block(_synthetic(seeds))
    seeds["fixed_set_60_cover"] = 16
    block = doc_block(_synthetic(seeds))
    assert "fixed_set_60_cover at uniform's reduced step count" in block
    assert "not judged (outside the planned family)" in block.split("| fixed_set_60_cover |")[1].split("\n")[0]


def test_the_epoch_0_check_counts_the_seeds_whose_first_epoch_losses_equal_the_reference():
    runs = _synthetic({"uniform": 4, "oracle": 4, "uniform_replicate": 4, "fixed_set_60": 3, "uniform_60": 3})
    oracle_1 = next(r for r in runs if r["arm"] == "oracle" and r["seed"] == 1)
    oracle_1["logged_losses"][5][1] += 1e-9  # step 150, still epoch 0
    later = next(r for r in runs if r["arm"] == "oracle" and r["seed"] == 2)
    later["logged_losses"][6][1] += 1.0  # step 175: epoch 1, where the arms part
    block = doc_block(runs)
    assert "| oracle | uniform | 3 of 4 | 6 |" in block
    assert "| fixed_set_60 | uniform_60 | 3 of 3 | 6 |" in block and "| uniform_60 | fixed_set_60 | 3 of 3 | 6 |" in block
    assert "| uniform_replicate | uniform" not in block  # another data order by design
