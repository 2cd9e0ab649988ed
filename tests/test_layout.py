"""RunPaths spells the layout the README and docs/design.md §7 publish, and finds what hsm's writers write."""

from __future__ import annotations

import numpy as np

from eventlog import random_rows, write_rows
from hsm.layout import RunPaths


def test_paths_are_the_published_layout(tmp_path):
    paths = RunPaths.of(tmp_path)
    assert paths == RunPaths.at(tmp_path / "hsm") and paths.output_dir == tmp_path
    rel = lambda p: p.relative_to(tmp_path).as_posix()  # noqa: E731
    assert rel(paths.config) == "hsm/config.yaml"
    assert rel(paths.events(3, 1)) == "hsm/events/epoch=3/rank=1"
    assert rel(paths.sample_ids(2)) == "hsm/sample_ids/epoch=2/sample_ids.parquet"
    assert rel(paths.state(4)) == "hsm/state/epoch=4/state.parquet"
    assert rel(paths.plan(5)) == "hsm/plans/epoch=5/plan.parquet"
    assert rel(paths.manifest(5)) == "hsm/plans/epoch=5/manifest.json"


def test_finds_what_the_event_writer_wrote(tmp_path):
    rows = random_rows(np.random.default_rng(0), n_target=8, n_epochs=2, n_ranks=2, max_obs=2)
    write_rows(tmp_path / "hsm", rows)
    paths = RunPaths.of(tmp_path)
    written = sorted(p for p in (tmp_path / "hsm" / "events").rglob("*.parquet"))
    assert paths.event_parts() == written and written
    assert paths.event_parts(rank=1) == [p for p in written if p.parent.name == "rank=1"]
    assert sorted(paths.epochs("events")) == [0, 1]
