"""docs/mining_effect.md leads with the verdict, and that block is what the committed runs give.

The runs of part 2 are kept in docs/mining_effect_part2/runs; the doc's verdict block is written from them by
``python bench/mining_effect_report.py docs/mining_effect_part2 --doc docs/mining_effect.md``. A run committed
without rewriting the block (or a number edited by hand) fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.mining_effect_report import (  # noqa: E402
    DOC_BEGIN, DOC_END, doc_block, load_runs, read_doc_block, write_doc_block)


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
