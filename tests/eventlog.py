"""Random event logs written through the real EventWriter, for planner tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hsm.mining.event_writer import EventBatch, EventWriter

TARGET = "tgt"
SOURCES = ("src_a", "src_b")


def sample_id(dataset: str, idx: int) -> str:
    # Not in base_idx order on purpose, so sample_id ties do not follow base_idx.
    return f"{dataset}-{(idx * 7919) % 1009:04d}-{idx}"


def random_rows(rng: np.random.Generator, *, n_target: int, n_epochs: int, n_ranks: int,
                max_obs: int, resume: bool = False) -> list[dict]:
    """Rows of a multi-epoch, multi-rank log: samples seen 0..max_obs times, dyadic values (ties)."""
    rows = []
    for epoch in range(n_epochs):
        draws = []
        for idx in range(n_target):
            draws += [(TARGET, idx)] * int(rng.integers(0, max_obs + 1))
        for source in SOURCES:
            draws += [(source, int(i)) for i in rng.integers(0, 5, size=int(rng.integers(0, 4)))]
        order = rng.permutation(len(draws))
        step = epoch * 1000
        for start in range(0, len(order), 2 * n_ranks):
            chunk = order[start : start + 2 * n_ranks]
            for rank in range(n_ranks):
                for position, j in enumerate(chunk[rank::n_ranks]):
                    dataset, idx = draws[j]
                    rows.append(_row(rng, epoch, step, rank, position, dataset, idx, attempt=0))
            step += 1
        if resume and len(rows):
            # A resumed attempt re-logs the last steps of this epoch with other values.
            steps = sorted({r["global_step"] for r in rows if r["epoch"] == epoch})
            for r in [r for r in rows if r["epoch"] == epoch and r["global_step"] in steps[len(steps) // 2 :]]:
                rows.append(_row(rng, epoch, r["global_step"], r["rank"], r["position"], r["dataset"], r["base_idx"], attempt=1))
    return rows


def _row(rng, epoch, step, rank, position, dataset, idx, attempt):
    return {
        "attempt": attempt, "epoch": epoch, "global_step": step, "rank": rank, "position": position,
        "dataset": dataset, "base_idx": idx, "sample_id": sample_id(dataset, idx),
        "loss": float(rng.integers(0, 24)) / 8, "token_acc": float(rng.integers(0, 9)) / 8,
        "n_tokens": int(rng.integers(1, 50)), "aug_seed": int(rng.integers(0, 2**31)), "drawn_as_hard": bool(rng.random() < 0.2),
    }


def write_rows(hsm_dir: Path, rows: list[dict], *, flush_rows: int = 7) -> None:
    """Write rows through EventWriter, one writer per (rank, attempt), parts of ``flush_rows``."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rank"], r["attempt"]), []).append(r)
    for (rank, attempt), group in sorted(groups.items()):
        with EventWriter(hsm_dir, run_id="test-run", rank=rank, attempt=attempt, flush_rows=flush_rows) as writer:
            batches: dict[tuple[int, int], list[dict]] = {}
            for r in group:
                batches.setdefault((r["epoch"], r["global_step"]), []).append(r)
            for (epoch, step), batch in sorted(batches.items()):
                batch.sort(key=lambda r: r["position"])
                writer.append(EventBatch(
                    epoch=epoch, global_step=step,
                    dataset=[r["dataset"] for r in batch], base_idx=[r["base_idx"] for r in batch],
                    sample_id=[r["sample_id"] for r in batch], loss=[r["loss"] for r in batch],
                    token_acc=[r["token_acc"] for r in batch], n_tokens=[r["n_tokens"] for r in batch],
                    aug_seed=[r["aug_seed"] for r in batch], drawn_as_hard=[r["drawn_as_hard"] for r in batch],
                ))
