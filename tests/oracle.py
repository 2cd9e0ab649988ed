"""Slow, obvious reimplementation of docs/design.md §4, the oracle for every engine."""

from __future__ import annotations

import hashlib
import math

import numpy as np


def effective_events(rows: list[dict]) -> list[dict]:
    """Keep, per (epoch, global_step, rank), only the rows of the highest attempt."""
    best: dict[tuple, int] = {}
    for r in rows:
        key = (r["epoch"], r["global_step"], r["rank"])
        best[key] = max(best.get(key, r["attempt"]), r["attempt"])
    return [r for r in rows if r["attempt"] == best[(r["epoch"], r["global_step"], r["rank"])]]


def metric_value(r: dict, metric: str) -> float | None:
    """The observation ``x`` of one event, or None when the event carries no value for ``metric``
    or a NaN or infinite one (neither is an observation)."""
    value = r.get(metric)
    if value is None or not math.isfinite(float(value)):
        return None
    if metric in ("token_acc", "det_f1"):  # accuracies and F1: difficulty 1 - value
        return 1.0 - float(value)
    return float(value)


def full_state(rows: list[dict], *, metric: str, decay: float, aggregate: str) -> dict[tuple, dict]:
    """Per (dataset, base_idx): the state recomputed from every observation at once."""
    by_sample: dict[tuple, list[dict]] = {}
    for r in effective_events(rows):
        if metric_value(r, metric) is not None:
            by_sample.setdefault((r["dataset"], r["base_idx"]), []).append(r)
    state = {}
    for key, obs in by_sample.items():
        obs.sort(key=lambda r: (r["epoch"], r["global_step"], r["rank"], r["position"]))
        xs = [metric_value(r, metric) for r in obs]
        ema = xs[0]
        for x in xs[1:]:
            ema = decay * ema + (1 - decay) * x
        mean = sum(xs) / len(xs)
        n = len(xs)
        # Per epoch: the mean of the epoch's observations, then an EMA over the epochs seen, bias-corrected.
        epochs = sorted({r["epoch"] for r in obs})
        epoch_means = [sum(x for x, r in zip(xs, obs) if r["epoch"] == e) / sum(1 for r in obs if r["epoch"] == e)
                       for e in epochs]
        raw = 0.0
        for m in epoch_means:
            raw = decay * raw + (1 - decay) * m
        epoch_ema = raw / (1 - decay ** len(epochs))
        score = {"ema": ema if n >= 3 else mean, "mean": mean, "epoch_ema": epoch_ema, "last": epoch_means[-1]}[aggregate]
        state[key] = {
            "sample_id": obs[0]["sample_id"],
            "n_obs": n,
            "mean": mean,
            "ema": ema,
            "last": xs[-1],
            "last_epoch": obs[-1]["epoch"],
            "score": score,
        }
    return state


def stale_adjusted(state: dict[tuple, dict], target: str, mining, epoch: int) -> dict[tuple, dict]:
    """``stale_policy: decay``: a copy of ``state`` whose stale target scores moved toward their mean."""
    if mining.stale_after is None or mining.stale_policy != "decay":
        return state
    keys = [k for k in state if k[0] == target]
    scores = [state[k]["score"] for k in keys if not math.isnan(state[k]["score"])]
    mu = sum(scores) / len(scores) if scores else 0.0
    out = dict(state)
    for k in keys:
        unseen = (epoch - 1) - state[k]["last_epoch"]
        if unseen >= mining.stale_after:
            factor = mining.ema_decay ** (unseen - mining.stale_after + 1)
            out[k] = dict(state[k], score=mu + (state[k]["score"] - mu) * factor)
    return out


def tie_key(seed: int, sample_id: str) -> str:
    """The first 16 hex digits of ``sha256(f"{seed}:{sample_id}")``."""
    return hashlib.sha256(f"{seed}:{sample_id}".encode("utf-8")).hexdigest()[:16]


def rank(state: dict[tuple, dict], target: str, seed: int) -> list[tuple]:
    """Eligible target keys in rank order: score descending, then the tie key, then sample_id."""
    keys = [k for k in state if k[0] == target]
    return sorted(keys, key=lambda k: (-state[k]["score"], tie_key(seed, state[k]["sample_id"]), state[k]["sample_id"]))


def plan(state: dict[tuple, dict], target: str, mining, epoch: int) -> dict[int, tuple[bool, float]]:
    """base_idx -> (is_hard, weight) for every eligible target sample (``stale_after`` applied)."""
    state = stale_adjusted(state, target, mining, epoch)
    flagged = set()
    if mining.stale_after is not None and mining.stale_policy == "flag":
        flagged = {k for k in state if k[0] == target and (epoch - 1) - state[k]["last_epoch"] >= mining.stale_after}
    every = rank(state, target, mining.seed)
    ranked = [k for k in every if k not in flagged]
    n = len(ranked)
    if len({state[k]["score"] for k in ranked}) == 1:  # no signal: nothing hard, every weight 1
        return {k[1]: (False, 1.0) for k in every}
    if mining.mode == "fixed_set":
        hard = ranked[: min(mining.hard_sample_size, n)]
    elif mining.mode == "dynamic":
        size = mining.hard_pool_k if mining.hard_pool_k is not None else _ceil_decimal(mining.hard_pool_frac, n)
        hard = ranked[: min(size, n)]
    elif mining.selector.mode == "top_k":
        hard = ranked[: min(mining.selector.k, n)]
    elif mining.selector.mode == "percentile":
        hard = ranked[: _ceil_decimal(mining.selector.value, n)]
    else:
        hard = [k for k in ranked if state[k]["score"] >= mining.selector.threshold]
    hard_idx = {k[1] for k in hard}
    out = {}
    ranked = every  # flagged samples are in the plan, never hard
    if mining.mode == "fixed_set":
        rest = sorted(k[1] for k in ranked if k[1] not in hard_idx)
        m = min(mining.regular_sample_size, len(rest))
        rng = np.random.default_rng([mining.seed, epoch, 1])
        chosen = {rest[i] for i in rng.choice(len(rest), size=m, replace=False)}
        for k in ranked:
            out[k[1]] = (k[1] in hard_idx, 1.0 if (k[1] in hard_idx or k[1] in chosen) else 0.0)
    elif mining.mode == "reweight":
        for k in ranked:
            out[k[1]] = (k[1] in hard_idx, mining.hard_weight if k[1] in hard_idx else 1.0)
    else:
        for k in ranked:
            out[k[1]] = (k[1] in hard_idx, 1.0)
    return out


def _ceil_decimal(value: float, n: int) -> int:
    """``ceil(value * n)`` on the decimal the user wrote, through ``decimal`` (not the product of floats)."""
    from decimal import ROUND_CEILING, Decimal

    return int((Decimal(repr(value)) * n).to_integral_value(rounding=ROUND_CEILING))


def plan_from_rows(manifest: dict, base_idx, is_hard, weight, n_target: int):
    """A :class:`hsm.mining.plan.Plan` from rows ``(base_idx, is_hard, weight)`` over ``n_target`` samples
    (a naive scatter, as the planner's dense plan should be)."""
    import numpy as np

    from hsm.mining.plan import Plan

    base_idx = np.asarray(base_idx, dtype=np.int64)
    if len(base_idx) and (base_idx.min() < 0 or base_idx.max() >= n_target):
        raise ValueError(f"base_idx outside [0, {n_target})")
    dense_weight = None if manifest["mode"] == "dynamic" else np.full(n_target, float(manifest["default_weight"]))
    dense_hard = np.zeros(n_target, dtype=bool)
    if dense_weight is not None:
        dense_weight[base_idx] = weight
    dense_hard[base_idx] = is_hard
    return Plan(manifest=manifest, weight=dense_weight, is_hard=dense_hard)


def pack_slots(codes, base_idx, is_hard, dtype, idx_bits: int):
    """Packed schedule slots of ``dtype``: ``code << (idx_bits + 1) | is_hard << idx_bits | base_idx``."""
    import numpy as np

    out = np.asarray(codes).astype(dtype) << (idx_bits + 1)
    out |= np.asarray(is_hard).astype(dtype) << idx_bits
    out |= np.asarray(base_idx).astype(dtype)
    return out
