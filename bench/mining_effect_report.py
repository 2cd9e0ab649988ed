"""Tables, verdicts and the plot of ``bench/mining_effect.py`` from the run files a work directory holds.

    python bench/mining_effect.py --from-dir DIR --doc docs/mining_effect.md

Every number is over the seeds an arm finished; paired differences use the seeds both
the arm and uniform finished (same corpus, init and schedule seed).
"""

from __future__ import annotations

import hashlib
import json
import re
import math
import statistics
from pathlib import Path

import numpy as np

__all__ = ["load_runs", "summarize", "paired_test", "holm", "verdict_test", "verdict_markdown",
           "seeds_for_power", "crossing", "match_share", "markdown", "plot", "render", "main"]

METRICS = (("AP50", "mAP50"), ("mAP", "mAP@[.5:.95]"), ("recall50", "recall@0.5"), ("F1_50", "F1@0.5"))
HARD = ("rare", "small", "crowded", "low_contrast")
# The test fixed in advance (issue 29): endpoints, level, non-inferiority margin on overall mAP50.
ENDPOINTS = ("small", "crowded", "rare", "low_contrast", "overall")
ALPHA = 0.05
NON_INFERIORITY = -0.02
# Compute-saving arms: judged by non-inferiority to full-length uniform on every endpoint, not by a gain.
SAVING_ARMS = ("fixed_set_60",)
# The arms at uniform_60's reduced step count, each also read against it: the planned one and the one added after it
# was read (fixed_set_60_cover: its plans start once the epochs before them have covered the target; not judged).
REDUCED_ARMS = ("fixed_set_60", "fixed_set_60_cover")
# The arms of the full experiment whose cells form the Holm family (the compute-saving arm is judged by its CIs).
PLANNED_ARMS = ("uniform_replicate", "dynamic", "oracle", "loss", "label_loss", "coord_loss", "det_f1")
# Seeds per arm, from the pilot's power calculation (docs/mining_effect.md, "How many seeds"): no arm is read before
# all of them, its own and uniform's, are in.
PLANNED_SEEDS = 16


def host_tag(cpu: str) -> str:
    """A CPU model's folder name ("AMD EPYC" -> ``amd-epyc``): a run is paired with uniform's run on the same model.

    The pinned vector ISA makes a run repeat on one CPU model, not across vendors: seed 3's runs on an Intel Xeon and
    an AMD EPYC, both pinned to AVX2, log the same training loss at step 50 and part in the 7th digit by step 75.
    """
    text = re.sub(r"\((r|tm)\)", "", cpu.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown-cpu"


def this_host() -> str:
    """:func:`host_tag` of the machine this runs on (``/proc/cpuinfo``'s model name, as runs record it)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return host_tag(next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), ""))


def unit(run: dict) -> tuple[int, str]:
    """What a run is paired on: its seed and the CPU model it ran on (uniform may have a run on several)."""
    return run["seed"], host_tag((run.get("isa") or {}).get("cpu") or "")


def check_pairing(runs: list[dict], where: Path) -> None:
    """One run per (arm, seed) across CPU models, uniform aside (one per seed and model); else an error naming them."""
    seen: dict[tuple, list[str]] = {}
    for run in runs:
        key = (run["arm"], *unit(run)) if run["arm"] == "uniform" else (run["arm"], run["seed"])
        seen.setdefault(key, []).append(f"seed-{run['seed']}-{run['arm']} on {unit(run)[1]}")
    twice = [names for names in seen.values() if len(names) > 1]
    if twice:
        raise ValueError(f"{where}: an arm has two runs of one seed (only uniform, the control, may have one per CPU "
                         "model); move one out: " + "; ".join(", ".join(n) for n in twice))

# A kept run carries the sha256 of its content, so a file changed after it was kept is refused by name (a cut file
# fails to parse; this catches a change that leaves valid JSON of the same size).
DIGEST_KEY = "sha256"


def run_digest(run: dict) -> str:
    """The sha256 of ``run``'s canonical JSON (sorted keys, compact; floats round-trip exactly), its digest aside."""
    body = {k: v for k, v in run.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed_bytes(run: dict) -> bytes:
    """A kept run file's bytes: ``run`` with its :func:`run_digest` last."""
    body = {k: v for k, v in run.items() if k != DIGEST_KEY}
    return json.dumps({**body, DIGEST_KEY: run_digest(body)}, separators=(",", ":")).encode()


def is_kept(path: Path) -> bool:
    """Whether ``path`` is in a kept runs folder (``runs/<cpu model>/``), where every run must carry its digest."""
    return Path(path).parent.name != "runs"


def read_run(path: Path, sealed: bool = False) -> dict:
    """One run file, its digest checked and taken off; a cut or garbled one is an error naming it (rerun that run:
    remove the file), and so is one whose content no longer has its digest or, when ``sealed``, has none."""
    try:
        run = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a whole run file ({e}); remove it and rerun that seed and arm") from None
    if not isinstance(run, dict) or not {"seed", "arm", "val"} <= set(run):
        raise ValueError(f"{path}: not a run file (no seed, arm and val); remove it and rerun that seed and arm")
    digest = run.pop(DIGEST_KEY, None)
    if digest is None and sealed:
        raise ValueError(f"{path}: a kept run without its {DIGEST_KEY}; keep it again (--keep) from its work "
                         "directory, or restore it from git")
    if digest is not None and digest != run_digest(run):
        raise ValueError(f"{path}: changed since it was kept (its content no longer has its {DIGEST_KEY}); restore "
                         "it from git, or remove it and rerun that seed and arm")
    return run


def load_runs(out: Path) -> list[dict]:
    """Every finished run of ``out/runs``, ordered by seed then arm file name.

    Curves written before they recorded tokens get them from the run's event log: the
    ``n_tokens`` of the training events before each point's step (their total equals the
    trainer's supervised-token count).
    """
    runs = [read_run(p, sealed=is_kept(p)) for p in run_files(Path(out))]
    for run in runs:
        hsm_dir = Path(out) / f"run-{run['seed']}-{run['arm']}" / "hsm"
        if any(len(point) == 3 for point in run.get("curve") or []) and (hsm_dir / "events").is_dir():
            run["curve"] = [[*point[:3], tokens_before(hsm_dir, run["preset"]["epochs"], point[0])]
                            for point in run["curve"]]
        if "hard_set_mix" not in run:
            run["hard_set_mix"] = hard_set_mix(Path(out), run)
    check_comparable(runs, Path(out) / "runs")
    check_pairing(runs, Path(out) / "runs")
    return runs


def run_files(out: Path) -> list[Path]:
    """``out/runs/seed-*.json`` and ``out/runs/<cpu model>/seed-*.json`` (the kept runs, one folder per CPU model)."""
    return sorted((Path(out) / "runs").rglob("seed-*.json"), key=lambda p: (p.name, str(p)))


# What makes two runs' numbers comparable: the same libraries, kernels and preset (not the commit, whose
# training path the determinism tests hold, nor the host, which the pinned ISA takes out).
def _conditions(run: dict) -> str:
    isa = run.get("isa") or {}
    return json.dumps({"versions": run.get("versions"), "preset": run.get("preset"),
                       "isa": {k: isa.get(k) for k in ("cpu_capability", "ATEN_CPU_CAPABILITY", "MKL_CBWR",
                                                       "ONEDNN_MAX_CPU_ISA")}}, sort_keys=True)


def check_comparable(runs: list[dict], where: Path) -> None:
    """Refuse runs made under different libraries, CPU kernels or presets: their differences are not the arms'.

    Raises ValueError naming, per group of conditions, the runs that hold it.
    """
    groups: dict[str, list[str]] = {}
    for run in runs:
        groups.setdefault(_conditions(run), []).append(f"seed-{run['seed']}-{run['arm']}")
    if len(groups) > 1:
        lines = [f"  {json.loads(c)}: {', '.join(names)}" for c, names in groups.items()]
        raise ValueError(f"{where}: runs made under different libraries, CPU kernels or presets cannot be "
                         "compared; move one group out:\n" + "\n".join(lines))


def status_lines(runs: list[dict], seeds: int = PLANNED_SEEDS) -> list[str]:
    """How far the experiment is, blinded: per arm, the seeds finished and the thread time; no metric."""
    lines = ["| arm | seeds done | of | which | runs per CPU model | run time (thread-hours) |",
             "|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in sorted(runs, key=lambda r: r["arm"])):
        mine = sorted({r["seed"] for r in runs if r["arm"] == arm})
        hosts = sorted(unit(r)[1] for r in runs if r["arm"] == arm)
        per_host = ", ".join(f"{h} {hosts.count(h)}" for h in dict.fromkeys(hosts))
        hours = sum(r["seconds"] for r in runs if r["arm"] == arm) / 3600
        lines.append(f"| {arm} | {len(mine)} | {seeds} | {', '.join(map(str, mine))} | {per_host} | {hours:.2f} |")
    return lines


def hard_set_mix(out: Path, run: dict) -> dict[str, dict[str, float]] | None:
    """Share of each train slice in the hard set of the run's last used plan, and in train (``None`` without a plan)."""
    from bench.mining_effect import last_hard_ids

    slices = out / f"data-{run['seed']}" / "bbu" / "slices.json"
    hard_ids = last_hard_ids(out / f"run-{run['seed']}-{run['arm']}" / "hsm", run["preset"]["epochs"])
    if hard_ids is None or not slices.is_file():
        return None
    slice_of = json.loads(slices.read_text())["train"]
    hard = [slice_of[i] for i in hard_ids]
    names = sorted(set(slice_of.values()))
    train = list(slice_of.values())
    return {"hard": {n: hard.count(n) / len(hard) for n in names}, "train": {n: train.count(n) / len(train) for n in names}}


def keep_runs(work: Path, keep: Path) -> list[str]:
    """Copy ``work``'s finished runs into ``keep`` compact, with the slice mix of their last hard set and their
    digest (:func:`sealed_bytes`).

    The mix is read from the run's plans (:func:`hard_set_mix`) while its work directory has them, so the
    committed run keeps what its signal found after the work directory is gone. A kept run is rewritten only
    when that adds something (a mix it lacked, its digest); it is read, and its digest checked, first. Each file
    is written whole, then renamed. Returns the names written.
    """
    from hsm.io import write_bytes_atomic

    keep.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted((Path(work) / "runs").glob("seed-*.json")):
        kept = keep / path.name
        run = read_run(kept if kept.is_file() else path)
        if run.get("hard_set_mix") is None:
            run["hard_set_mix"] = hard_set_mix(Path(work), run)
        data = sealed_bytes(run)
        if kept.is_file() and kept.read_bytes() == data:
            continue
        # A temp name of its own, fsync, rename: two workers keeping at once each leave a whole file.
        write_bytes_atomic(data, kept)
        written.append(path.name)
    return written


def tokens_before(hsm_dir: Path, epochs: int, step: int) -> int:
    """Supervised tokens of the training events logged before optimizer step ``step`` (hsm's verified event reader)."""
    from hsm.mining.event_reader import read_epoch_events

    total = 0
    for epoch in range(epochs):
        table = read_epoch_events(hsm_dir, epoch, columns=["attempt", "epoch", "global_step", "rank", "n_tokens"]).table
        steps = table.column("global_step").to_numpy()
        total += int(table.column("n_tokens").to_numpy()[steps < step].sum())
    return total


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(runs: list[dict], arm_order: list[str] | None = None) -> dict:
    """``table[(arm, slice, metric)]`` = mean, std, paired diff to uniform and its std, seeds."""
    arms = list(dict.fromkeys([a for a in (arm_order or []) if any(r["arm"] == a for r in runs)]
                              + [r["arm"] for r in runs]))
    slices = list(runs[0]["val"]) if runs else []
    # Metrics every run has (F1@0.5 is newer than the from-scratch runs).
    metrics = [(k, t) for k, t in METRICS if all(k in v for r in runs for v in r["val"].values())]
    base = {unit(r): r for r in runs if r["arm"] == "uniform"}
    table = {}
    for arm in arms:
        mine = {unit(r): r for r in runs if r["arm"] == arm}
        for name in slices:
            for key, _ in metrics:
                mean, std = _mean_std([r["val"][name][key] for r in mine.values()])
                diff, diff_std = _mean_std([mine[s]["val"][name][key] - base[s]["val"][name][key] for s in mine if s in base])
                table[(arm, name, key)] = {"mean": mean, "std": std, "diff": diff, "diff_std": diff_std,
                                           "n": len(mine), "n_paired": len([s for s in mine if s in base])}
    return {"arms": arms, "slices": slices, "table": table, "metrics": metrics}


def paired_test(diffs: list[float], alpha: float = ALPHA) -> dict:
    """Paired t-test of ``diffs`` (arm minus control, one per seed) against 0, and the ``1 - alpha`` CI of their mean.

    ``t = mean / (sd / sqrt(n))`` with ``sd`` the sample std (n - 1), two-sided ``p = 2 * (1 - F_{n-1}(|t|))``,
    CI ``mean -+ t_{n-1, 1 - alpha/2} * sd / sqrt(n)``. Fewer than 2 differences: NaN p and CI.
    With ``sd = 0``: p is 0 for a non-zero mean and 1 for a zero one, and the CI is the point.
    """
    from scipy import stats

    x = np.asarray(diffs, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "t": math.nan, "p": math.nan, "ci": (math.nan, math.nan)}
    sd = float(x.std(ddof=1))
    se = sd / math.sqrt(n)
    if np.ptp(x) == 0:  # all equal (the float std may be a rounding residue, not 0)
        return {"n": n, "mean": mean, "sd": 0.0, "t": math.copysign(math.inf, mean) if mean else 0.0,
                "p": 0.0 if mean else 1.0, "ci": (mean, mean)}
    t = mean / se
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * se
    return {"n": n, "mean": mean, "sd": sd, "t": t, "p": float(2 * stats.t.sf(abs(t), n - 1)),
            "ci": (mean - half, mean + half)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not counted).

    Sorted ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) * p_(j))`` over the ``m`` finite p-values;
    a hypothesis is rejected at level alpha when its adjusted p is below alpha.
    """
    finite = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(finite)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def rejected(cell: dict, alpha: float = ALPHA) -> bool:
    """Whether a :func:`verdict_test` cell is rejected at ``alpha``: its Holm-adjusted p, or while the family is
    short, the upper end of the interval that p will fall in (decided only where that bound settles it)."""
    return (cell["p_bounds"][1] if "p_bounds" in cell else cell["p_holm"]) < alpha


def verdict_test(runs: list[dict], key: str = "AP50", control: str = "uniform", endpoints=ENDPOINTS,
                 alpha: float = ALPHA, margin: float = NON_INFERIORITY, saving_arms=SAVING_ARMS,
                 family: tuple[str, ...] | None = None, planned_seeds: int | None = None) -> dict:
    """The verdict fixed in advance, per arm x endpoint, on the paired differences to ``control``.

    Per cell: the paired t-test and 95% CI over the seeds both arms finished (:func:`paired_test`);
    Holm across every (arm, endpoint) cell of every arm but the control and the compute-saving arms. An arm **helps** an
    endpoint when its Holm-adjusted p < ``alpha`` with a positive Δ and the lower CI bound of its
    Δ overall is above ``margin`` (non-inferior overall); it **hurts** one when adjusted p <
    ``alpha`` with a negative Δ. A compute-saving arm **saves** when the lower CI bound is above
    ``margin`` on every endpoint. Otherwise "no effect" (the replicate control must read so).
    With ``family`` (the planned arms), an arm in neither ``family`` nor ``saving_arms`` (a reference such
    as ``uniform_60``, an arm run beside the plan) stays out of the Holm family and is not judged: its
    cells keep their unadjusted p, so it cannot change a planned arm's adjusted p.

    With ``planned_seeds`` (and ``family``) the experiment is read as it comes in: an arm with fewer paired seeds
    than planned is **not read** (its cells are withheld, ``"withheld": True``). While some arm of the family is
    not complete, Holm's adjusted p of a complete arm's cell is not known yet, but it is bounded whatever the
    missing cells hold: ``p <= p_holm <= m * p``, ``m`` the full family's cell count (Holm's adjusted p is at
    least the raw one, and at most Bonferroni's). A cell is decided when the bound settles it (``m * p <
    alpha``: rejected; ``p >= alpha``: not), else it is **pending** the rest of the family; ``"p_bounds"`` holds
    the interval and ``"interim"`` is True. A verdict read this way never changes when the family completes.

    Returns ``{"cells": {(arm, endpoint): test + "p_holm"}, "verdicts": {arm: text}, "arms": [...]}``.
    """
    control_runs = {unit(r): r for r in runs if r["arm"] == control}
    arms = [a for a in dict.fromkeys(r["arm"] for r in runs) if a != control]
    cells: dict = {}
    for arm in arms:
        mine = {unit(r): r for r in runs if r["arm"] == arm}
        seeds = sorted(s for s in mine if s in control_runs)
        for endpoint in endpoints:
            diffs = [mine[s]["val"][endpoint][key] - control_runs[s]["val"][endpoint][key] for s in seeds
                     if endpoint in mine[s]["val"] and endpoint in control_runs[s]["val"]]
            cells[(arm, endpoint)] = paired_test(diffs, alpha)
    complete = {a for a in arms if planned_seeds is None
                or min(cells[(a, e)]["n"] for e in endpoints) >= planned_seeds}
    interim = planned_seeds is not None and family is not None and not set(family) <= complete
    # Compute-saving arms are judged by their CIs alone: they stay out of the Holm family.
    order = [c for c in cells if c[0] not in saving_arms and (family is None or c[0] in family)]
    if interim:
        m = len(family) * len(endpoints)
        for cell in order:
            if cell[0] in complete:
                p = cells[cell]["p"]
                cells[cell]["p_bounds"] = (p, min(1.0, m * p))
    else:
        for cell, adjusted in zip(order, holm([cells[c]["p"] for c in order])):
            cells[cell]["p_holm"] = adjusted
    for cell in cells:
        cells[cell].setdefault("p_holm", math.nan)
        cells[cell]["withheld"] = cell[0] not in complete
    verdicts = {}
    for arm in arms:
        mine = {e: cells[(arm, e)] for e in endpoints}
        if arm not in complete:
            verdicts[arm] = f"not read ({min(c['n'] for c in mine.values())} of {planned_seeds} seeds)"
            continue
        if any(c["n"] < 2 for c in mine.values()):
            verdicts[arm] = f"undecided ({min(c['n'] for c in mine.values())} paired seed(s))"
            continue
        if family is not None and arm not in family and arm not in saving_arms:
            verdicts[arm] = "not judged (outside the planned family)"
            continue
        if arm in saving_arms:
            short = [e for e, c in mine.items() if not c["ci"][0] > margin]
            verdicts[arm] = "saves (non-inferior on every endpoint)" if not short else \
                "does not save (not non-inferior on " + ", ".join(short) + ")"
            continue
        overall_ok = "overall" in mine and mine["overall"]["ci"][0] > margin
        decided = {e for e, c in mine.items() if rejected(c, alpha)}  # interim: by the bounds alone
        pending = [e for e, c in mine.items() if interim and c["p_bounds"][0] < alpha and e not in decided]
        up = [e for e, c in mine.items() if e in decided and c["mean"] > 0]
        down = [e for e, c in mine.items() if e in decided and c["mean"] < 0]
        parts = []
        if up and overall_ok:
            parts.append("helps " + ", ".join(up))
        elif up:
            parts.append("gains on " + ", ".join(up) + " but not non-inferior overall")
        if down:
            parts.append("hurts " + ", ".join(down))
        if pending:
            parts.append("pending the family on " + ", ".join(f"{e} ({'+' if mine[e]['mean'] > 0 else '-'})"
                                                              for e in pending))
        verdicts[arm] = "; ".join(parts) or "no effect"
    return {"cells": cells, "verdicts": verdicts, "arms": arms, "endpoints": list(endpoints), "interim": interim,
            "family_cells": len(family) * len(endpoints) if family is not None else len(order)}


def verdict_markdown(test: dict, title: str = "mAP50") -> list[str]:
    """The verdict table: per arm x endpoint, Δ [95% CI] and Holm-adjusted p; then each arm's verdict."""
    endpoints = test["endpoints"]
    if test.get("interim"):
        head = (f"**Interim verdict** ({title}; paired Δ to uniform, [95% CI]; the family of {test['family_cells']} "
                f"cells is not complete, so each cell shows the interval its Holm-adjusted p will fall in, [p, "
                f"{test['family_cells']} p], and is decided only where that interval settles it; arms short of their "
                f"seeds are not read)")
    else:
        head = (f"**Verdict** ({title}; paired Δ to uniform, [95% CI], Holm-adjusted p over every arm x endpoint; "
                f"helps = adjusted p < {ALPHA} with Δ > 0 and the lower CI bound of Δ overall > {NON_INFERIORITY})")
    lines = [head, "", "| arm | seeds | " + " | ".join(endpoints) + " | verdict |", "|---" * (len(endpoints) + 3) + "|"]
    for arm in test["arms"]:
        cells = [test["cells"][(arm, e)] for e in endpoints]
        if cells[0]["withheld"]:
            lines.append(f"| {arm} | {cells[0]['n']} | " + " | ".join("not read" for _ in cells)
                         + f" | {test['verdicts'][arm]} |")
            continue

        def p_text(c: dict) -> str:
            if "p_bounds" in c:
                return f"<br>p_Holm in [{c['p_bounds'][0]:.3f}, {c['p_bounds'][1]:.3f}]"
            return f"<br>p {c['p_holm']:.3f}" if not math.isnan(c["p_holm"]) else ""

        text = [f"{c['mean']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" + p_text(c)
                if not math.isnan(c["p"]) else (f"{c['mean']:+.3f}" if c["n"] else "-") for c in cells]
        lines.append(f"| {arm} | {cells[0]['n']} | " + " | ".join(text) + f" | {test['verdicts'][arm]} |")
    return lines + [""]


def seeds_for_power(sd: float, delta: float, alpha: float, power: float = 0.8, max_seeds: int = 200) -> int:
    """Fewest seeds n for which a two-sided paired t-test at level ``alpha`` detects a true mean
    difference ``delta`` with probability >= ``power``, when the paired differences have std ``sd``.

    Power = ``P(|T| > t_{n-1, 1-alpha/2})`` with ``T`` noncentral t (``n - 1`` df, noncentrality
    ``delta / (sd / sqrt(n))``). The normal approximation is ``n ~ ((z_{1-alpha/2} + z_power) * sd / delta)^2``.
    """
    from scipy import stats

    for n in range(2, max_seeds + 1):
        critical = stats.t.ppf(1 - alpha / 2, n - 1)
        nc = delta / (sd / math.sqrt(n))
        # The far tail underflows to NaN in scipy's noncentral t at large noncentrality; it is 0 there.
        achieved = stats.nct.sf(critical, n - 1, nc) + np.nan_to_num(stats.nct.cdf(-critical, n - 1, nc))
        if achieved >= power:
            return n
    return max_seeds + 1


def _cell(c: dict, paired: bool) -> str:
    text = f"{c['mean']:.3f} ± {c['std']:.3f}" if not math.isnan(c["std"]) else f"{c['mean']:.3f}"
    if paired and c["n_paired"]:
        text += f"<br>Δ {c['diff']:+.3f}" + (f" ± {c['diff_std']:.3f}" if not math.isnan(c["diff_std"]) else "")
    return text


def markdown(runs: list[dict], summary: dict) -> str:
    """The metric tables, verdicts, compute and suspects as markdown."""
    table, slices = summary["table"], summary["slices"]
    lines = verdict_markdown(verdict_test(runs, family=PLANNED_ARMS)) if any(r["arm"] == "uniform" for r in runs) else []
    for key, title in summary["metrics"]:
        lines += [f"**val {title}** per slice: mean ± std over seeds; Δ = paired difference to uniform (mean ± std)", "",
                  "| arm | seeds | " + " | ".join(slices) + " |", "|---" * (len(slices) + 2) + "|"]
        for arm in summary["arms"]:
            n = table[(arm, slices[0], key)]["n"]
            lines.append(f"| {arm} | {n} | " + " | ".join(_cell(table[(arm, s, key)], arm != "uniform") for s in slices) + " |")
        lines.append("")
    lines += compute_table(runs, summary["arms"])
    lines += steps_to_match(runs, summary["arms"])
    lines += equal_tokens(runs, summary["arms"])
    lines += mix_table(runs, summary["arms"])
    return "\n".join(lines) + "\n"


def crossing(steps: list[int], values: np.ndarray, target: float) -> float:
    """The step at which a curve first reaches ``target``, linear between its points; ``inf`` if it never does.

    A curve already at ``target`` at its first point reads that point's step (nothing earlier was scored).
    """
    above = np.flatnonzero(np.asarray(values) >= target)
    if not len(above):
        return math.inf
    i = int(above[0])
    if i == 0:
        return float(steps[0])
    (s0, s1), (v0, v1) = steps[i - 1: i + 1], values[i - 1: i + 1]
    return s1 - (s1 - s0) * (v1 - target) / (v1 - v0)  # exactly s1 when the curve meets the target there


def _curves(runs: list[dict], arm: str, endpoint: str, key: str) -> tuple[list[int], dict[int, np.ndarray]]:
    """An arm's epoch-end curve per seed (``curves``), on the step grid every seed of it shares."""
    mine = {unit(r): r for r in runs if r["arm"] == arm and r.get("curves")}
    grids = {tuple(c["step"] for c in r["curves"]) for r in mine.values()}
    if len(grids) != 1:
        return [], {}
    return list(next(iter(grids))), {s: np.array([c["val"][endpoint][key] for c in r["curves"]]) for s, r in mine.items()}


def match_share(runs: list[dict], arm: str, endpoint: str = "overall", key: str = "AP50", n_boot: int = 2000,
                seed: int = 0) -> dict | None:
    """Where ``arm``'s seed-mean curve reaches uniform's seed-mean final value, as a share of uniform's steps.

    Both arms are smoothed alike (the mean over the seeds both finished, at every epoch end), so an arm identical to
    uniform reads 100%, not an early noisy crossing. The 95% interval resamples seeds (paired: the same seeds for
    both arms) ``n_boot`` times; a resample whose curve never reaches the target counts as ``inf`` (not reached).
    Returns ``{"share", "low", "high", "seeds", "target", "grid", "mean"}``, or None without paired curves.
    """
    grid_u, uniform = _curves(runs, "uniform", endpoint, key)
    grid, mine = _curves(runs, arm, endpoint, key)
    seeds = sorted(set(mine) & set(uniform))
    if not seeds:
        return None
    U, A = np.stack([uniform[s] for s in seeds]), np.stack([mine[s] for s in seeds])
    share = crossing(grid, A.mean(0), U.mean(0)[-1]) / grid_u[-1]  # one reduction for both curves
    low = high = math.nan
    if len(seeds) > 1:
        draws = np.random.default_rng(seed).integers(0, len(seeds), (n_boot, len(seeds)))
        boot = np.array([crossing(grid, A[d].mean(0), U[d].mean(0)[-1]) / grid_u[-1] for d in draws])
        low, high = np.percentile(boot, [2.5, 97.5], method="inverted_cdf")
    return {"share": share, "low": float(low), "high": float(high), "seeds": len(seeds), "target": U.mean(0)[-1],
            "grid": grid, "mean": A.mean(0)}


def steps_to_match(runs: list[dict], arms: list[str], endpoint: str = "overall", key: str = "AP50") -> list[str]:
    """The :func:`match_share` table of every arm but uniform."""

    def pct(x: float) -> str:
        return "not reached" if math.isinf(x) else "-" if math.isnan(x) else f"{x:.0%}"

    rows = []
    for arm in arms:
        m = match_share(runs, arm, endpoint, key) if arm != "uniform" else None
        if m is None:
            continue
        points = ", ".join(f"{st}: {v:.3f}" for st, v in zip(m["grid"], m["mean"]))
        rows.append(f"| {arm} | {m['seeds']} | {m['target']:.3f} | {pct(m['share'])} | "
                    f"[{pct(m['low'])}, {pct(m['high'])}] | {points} |")
    if not rows:
        return []
    return [f"**Steps to reach uniform's final {endpoint} mAP50** (the mean curve over seeds of each arm, uniform's "
            "included, linear between epoch ends; as a share of uniform's steps, with a 95% paired bootstrap interval "
            "over seeds)", "",
            "| arm | seeds | uniform's final (mean) | reached at | 95% interval | the arm's mean curve by step |",
            "|---|---|---|---|---|---|", *rows, ""]


def mix_table(runs: list[dict], arms: list[str]) -> list[str]:
    """Per arm, the mean share of each train slice in the last hard set, against the slice's share of train."""
    mixes = {arm: [r["hard_set_mix"]["hard"] for r in runs if r["arm"] == arm and r.get("hard_set_mix")] for arm in arms}
    mixes = {arm: m for arm, m in mixes.items() if m}
    if not mixes:
        return []
    train = next(r["hard_set_mix"]["train"] for r in runs if r.get("hard_set_mix"))
    names = sorted(train)
    lines = ["**What each signal calls hard**: slice shares of the last hard set (the top 20%), mean over seeds", "",
             "| arm | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|",
             "| (share of train) | | " + " | ".join(f"{train[n]:.3f}" for n in names) + " |"]
    for arm, m in mixes.items():
        lines.append(f"| {arm} | {len(m)} | " + " | ".join(f"{statistics.fmean(x.get(n, 0.0) for x in m):.3f}"
                                                      for n in names) + " |")
    return lines + [""]


# The signals, each read as a share of the oracle's gain: not the controls (the replicate, the placebo `dynamic`).
SIGNAL_ARMS = ("loss", "label_loss", "coord_loss", "det_f1")


def oracle_share(runs: list[dict], arm: str, endpoint: str, key: str = "AP50", n_boot: int = 4000,
                 seed: int = 0) -> dict:
    """An arm's gain on ``endpoint`` as a share of the oracle's: ``mean Δ_arm / mean Δ_oracle`` over the seeds both
    ran, each Δ a run's value minus uniform's of the same seed on the same CPU model (:func:`unit`; the arm and the
    oracle of one seed may have run on two models, each against its own model's uniform).

    The 95% interval is a percentile bootstrap over those seeds, resampled together (a seed's uniform noise enters
    both means); ``"unbounded"`` is True when more than 2.5% of the resamples have an oracle gain <= 0, where the
    share has no meaning (then the interval is not given).
    """
    uniform = {unit(r): r["val"][endpoint][key] for r in runs if r["arm"] == "uniform" and endpoint in r["val"]}

    def deltas(name: str) -> dict[int, float]:
        return {r["seed"]: r["val"][endpoint][key] - uniform[unit(r)] for r in runs
                if r["arm"] == name and endpoint in r["val"] and unit(r) in uniform}

    arm_d, oracle_d = deltas(arm), deltas("oracle")
    seeds = sorted(set(arm_d) & set(oracle_d))
    mine = np.array([arm_d[s] for s in seeds])
    oracle = np.array([oracle_d[s] for s in seeds])
    if not seeds or oracle.mean() <= 0:
        return {"n": len(seeds), "share": math.nan, "ci": (math.nan, math.nan), "unbounded": True}
    pick = np.random.default_rng(seed).integers(0, len(seeds), size=(n_boot, len(seeds)))
    num, den = mine[pick].mean(axis=1), oracle[pick].mean(axis=1)
    shares = num[den > 0] / den[den > 0]
    unbounded = (den <= 0).mean() > 0.025
    ci = (math.nan, math.nan) if unbounded else tuple(float(q) for q in np.quantile(shares, [0.025, 0.975]))
    return {"n": len(seeds), "share": float(mine.mean() / oracle.mean()), "ci": ci, "unbounded": bool(unbounded)}


def read_arms(test: dict) -> list[str]:
    """The arms of a :func:`verdict_test` that are read (all their planned seeds in), in its order."""
    return [a for a in test["arms"] if not test["cells"][(a, test["endpoints"][0])]["withheld"]]


def oracle_share_lines(runs: list[dict], test: dict) -> list[str]:
    """Each read signal's gain as a share of the oracle's, on the hard endpoints where the oracle's gain is decided
    (its cell rejected with Δ > 0 in ``test``, a :func:`verdict_test`): elsewhere the oracle lifts nothing to share."""
    def decided_gain(cell: dict) -> bool:
        return not cell["withheld"] and rejected(cell) and cell["mean"] > 0

    read = read_arms(test)
    if "oracle" not in read:
        return []
    lifted = [e for e in ENDPOINTS if e in HARD and decided_gain(test["cells"][("oracle", e)])]
    arms = [a for a in SIGNAL_ARMS if a in read]
    if not lifted or not arms:
        return []
    lines = ["**Each signal's gain as a share of the oracle's** (mean Δ mAP50 of the arm / mean Δ of the oracle, both "
             "to uniform on the same seeds; [95% paired bootstrap interval over seeds]; on the slices the oracle is "
             "decided to lift: " + ", ".join(lifted) + ")", "",
             "| arm | seeds | " + " | ".join(lifted) + " |", "|---" * (len(lifted) + 2) + "|"]
    for arm in arms:
        cells = [oracle_share(runs, arm, e) for e in lifted]
        text = [f"{c['share']:.2f}" + (" [unbounded]" if c["unbounded"] else f" [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]")
                for c in cells]
        lines.append(f"| {arm} | {cells[0]['n']} | " + " | ".join(text) + " |")
    return lines + [""]


def equal_tokens(runs: list[dict], arms: list[str], over: float = 1.02) -> list[str]:
    """Arms that train on more supervised tokens than uniform: their overall mAP50 at uniform's final token count.

    The value is the last epoch-end curve point whose tokens do not exceed uniform's (curves record
    the tokens trained on so far); ``-`` where the curve starts later than that.
    """
    uniform = {unit(r): r for r in runs if r["arm"] == "uniform"}
    rows = []
    for arm in arms:
        for r in sorted((r for r in runs if r["arm"] == arm and unit(r) in uniform), key=unit):
            base = uniform[unit(r)]
            if r["supervised_tokens"] <= over * base["supervised_tokens"]:
                continue
            points = [p for p in r.get("curve") or [] if len(p) > 3 and p[3] <= base["supervised_tokens"]]
            at = f"{points[-1][1]:.3f} (step {points[-1][0]})" if points else "-"
            rows.append(f"| {arm} | {r['seed']} | {r['supervised_tokens'] / base['supervised_tokens']:.3f} "
                        f"| {base['val']['overall']['AP50']:.3f} | {r['val']['overall']['AP50']:.3f} | {at} |")
    if not rows:
        return []
    return [f"**At equal supervised tokens** (arms training on more than {over:g}x uniform's tokens)", "",
            "| arm | seed | tokens vs uniform | uniform's final overall mAP50 | arm's final | arm's at uniform's tokens |",
            "|---|---|---|---|---|---|", *rows, ""]


def compute_table(runs: list[dict], arms: list[str]) -> list[str]:
    """Steps, supervised tokens relative to uniform, seconds, det_f1 cost, suspects vs the injected noise."""
    tokens_uniform = {unit(r): r["supervised_tokens"] for r in runs if r["arm"] == "uniform"}
    lines = ["| arm | optimizer steps | supervised tokens vs uniform | seconds per run | det_f1 pass seconds (total) "
             "| suspects: n / precision / recall vs injected noise | noise share of the last hard set |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        ratio = [r["supervised_tokens"] / tokens_uniform[unit(r)] for r in mine if unit(r) in tokens_uniform]
        det = [r["det_f1_seconds"] for r in mine if r.get("det_f1_seconds")]
        sus = [r["suspects"] for r in mine if r.get("suspects")]
        sus_text = (f"{statistics.fmean(s['n_suspects'] for s in sus):.0f} / {statistics.fmean(s['precision'] for s in sus):.2f}"
                    f" / {statistics.fmean(s['recall'] for s in sus):.2f}") if sus else "-"
        hard = [s["hard_set_noise_share"] for s in sus if "hard_set_noise_share" in s]
        cells = [str(sorted({r["global_step"] for r in mine})), f"{statistics.fmean(ratio):.3f}" if ratio else "-",
                 f"{statistics.fmean(r['seconds'] for r in mine):.0f}", f"{statistics.fmean(det):.0f}" if det else "-",
                 sus_text, f"{statistics.fmean(hard):.3f}" if hard else "-"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(summary: dict, path: Path, title: str) -> None:
    """Per-slice mAP50 difference to uniform, mean ± paired std over seeds, one bar per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, slices = summary["table"], summary["slices"]
    arms = [a for a in summary["arms"] if a != "uniform"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(len(arms), 1)
    for k, arm in enumerate(arms):
        means = [table[(arm, s, "AP50")]["diff"] for s in slices]
        stds = [np.nan_to_num(table[(arm, s, "AP50")]["diff_std"]) for s in slices]
        ax.bar(np.arange(len(slices)) + k * width, means, width, yerr=stds, label=arm, capsize=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(slices)) + 0.4 - width / 2, slices)
    ax.set_ylabel("Δ val mAP50 vs uniform")
    ax.legend(fontsize=8, ncol=4)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(out: Path, doc: Path | None) -> None:
    """Print the tables of ``out``'s runs; with ``doc``, also write them there, the plot and the raw JSON beside it."""
    from bench.mining_effect import DEFAULT_ARMS

    runs = load_runs(out)
    if not runs:
        print(f"{out}: no finished runs")
        return
    summary = summarize(runs, DEFAULT_ARMS)
    text = markdown(runs, summary)
    print(text)
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        stem = doc.with_suffix("")
        (stem.parent / (stem.name + "_table.md")).write_text(text)
        (stem.parent / (stem.name + "_runs.json")).write_text(json.dumps(runs, indent=1))
        preset = runs[0].get("preset", {})
        seeds = sorted({r["seed"] for r in runs})
        plot(summary, stem.parent / (stem.name + ".png"),
             f"{preset.get('name', '?')} preset: {runs[0]['global_step']} steps, seeds {seeds}; "
             "paired Δ mAP50 to uniform, mean ± std over seeds")



def eval_sd(run: dict, shares: dict[str, float], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """How much of a run's val score is the draw of its val images: a bootstrap of its per-image rows.

    Images are resampled within each slice (the slices keep their sizes); per slice recall@0.5 = TP / (TP + FN)
    and F1@0.5 = 2 TP / (2 TP + FP + FN) over the resampled rows, overall weighted by the train ``shares`` as the
    bench weights it (noise images are clean ones on val). mAP50 needs the scored boxes, which the rows do not
    keep; F1@0.5 and recall@0.5 stand in for it. The point values are checked against the run's own val (they
    must agree: the rows and the weights are the ones the eval used). Returns ``{key: {"value", "sd"}}``.
    """
    rows = run["images"]
    tp, fp, fn = (np.asarray(rows[k], dtype=np.float64) for k in ("tp", "fp", "fn"))
    slice_of = np.asarray(rows["slice"])
    names = [s for s in dict.fromkeys(rows["slice"])]
    weights = np.array([shares.get(s, 0.0) + (shares.get("noise", 0.0) if s == "clean" else 0.0) for s in names])
    weights = weights / weights.sum()
    members = [np.flatnonzero(slice_of == s) for s in names]

    def scores(picks: list[np.ndarray]) -> dict[str, float]:
        t = np.array([tp[i].sum() for i in picks])
        f_p, f_n = np.array([fp[i].sum() for i in picks]), np.array([fn[i].sum() for i in picks])
        recall = np.divide(t, t + f_n, out=np.zeros_like(t), where=t + f_n > 0)
        f1 = np.divide(2 * t, 2 * t + f_p + f_n, out=np.zeros_like(t), where=2 * t + f_p + f_n > 0)
        return {"recall50": float(weights @ recall), "F1_50": float(weights @ f1)}

    point = scores(members)
    for key, value in point.items():
        if not math.isclose(value, run["val"]["overall"][key], rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"seed-{run['seed']}-{run['arm']}: overall {key} from the image rows is {value}, the "
                             f"run's val says {run['val']['overall'][key]}: the rows or the shares are not the eval's")
    rng = np.random.default_rng(seed)
    boot = [scores([m[rng.integers(0, len(m), len(m))] for m in members]) for _ in range(n_boot)]
    return {key: {"value": point[key], "sd": float(np.std([b[key] for b in boot], ddof=1))} for key in point}


def pilot_lines(runs: list[dict], delta: float = 0.05, power: float = 0.8, key: str = "AP50") -> list[str]:
    """Each run's per-slice values, the paired sd per slice of each arm against uniform, and the seeds
    needed for ``power`` on a ``delta`` effect at the Bonferroni level of the planned Holm family
    (``ALPHA / (len(PLANNED_ARMS) * len(ENDPOINTS))``: Holm's first step, so the count is conservative)."""
    slices = [e for e in (*HARD, "clean", "overall") if runs and e in runs[0]["val"]]
    lines = [f"| seed | arm | steps | seconds | " + " | ".join(slices) + " |", "|---" * (len(slices) + 4) + "|"]
    for r in sorted(runs, key=lambda r: (r["seed"], r["arm"])):
        lines.append(f"| {r['seed']} | {r['arm']} | {r['global_step']} | {r['seconds']:.0f} | "
                     + " | ".join(f"{r['val'][s][key]:.3f}" for s in slices) + " |")
    uniform = {unit(r): r for r in runs if r["arm"] == "uniform"}
    arms = [a for a in dict.fromkeys(r["arm"] for r in runs) if a != "uniform"]
    level = ALPHA / (len(PLANNED_ARMS) * len(ENDPOINTS))
    lines += ["", f"Paired sd of Δ {key} to uniform per slice (seeds both finished), pooled over the arms, and the "
              f"seeds for {power:.0%} power on Δ = {delta} at α = {ALPHA}/{len(PLANNED_ARMS) * len(ENDPOINTS)} "
              f"= {level:.5f} (two-sided paired t)", "",
              "| slice | " + " | ".join(f"sd {a}" for a in arms) + " | pooled sd | seeds needed |",
              "|---" * (len(arms) + 3) + "|"]
    for s in slices:
        variances, cells = [], []
        for a in arms:
            diffs = [r["val"][s][key] - uniform[unit(r)]["val"][s][key] for r in runs
                     if r["arm"] == a and unit(r) in uniform]
            sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
            cells.append(f"{sd:.3f} (n={len(diffs)})" if len(diffs) > 1 else "-")
            if len(diffs) > 1:
                variances.append(sd ** 2)
        pooled = math.sqrt(statistics.fmean(variances)) if variances else math.nan
        need = seeds_for_power(pooled, delta, level, power) if variances and pooled > 0 else "-"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {pooled:.3f} | {need} |")
    return lines + [""]


DOC_BEGIN = "<!-- verdict: written by `python bench/mining_effect_report.py docs/mining_effect_part2 --doc " \
    "docs/mining_effect.md`; do not edit by hand -->"
DOC_END = "<!-- verdict: end -->"


def delta_markdown(test: dict, title: str, control: str = "uniform") -> list[str]:
    """Δ [95% CI] per arm x endpoint of a :func:`verdict_test`, reported and not judged (no p, no verdict)."""
    endpoints = test["endpoints"]
    lines = [f"**{title}** (reported, not judged: paired Δ to {control}, [95% CI])", "",
             "| arm | seeds | " + " | ".join(endpoints) + " |", "|---" * (len(endpoints) + 2) + "|"]
    for arm in test["arms"]:
        cells = [test["cells"][(arm, e)] for e in endpoints]
        if not cells[0]["withheld"]:
            lines.append(f"| {arm} | {cells[0]['n']} | " + " | ".join(
                f"{c['mean']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" for c in cells) + " |")
    return lines + [""]


# Whose epoch 0 an arm's must equal: uniform's (no plan before epoch 1), the 60% pair each other's (their
# epochs draw target_epoch_size); the replicate's differs by design (another data order).
EPOCH0_REFERENCE = {"fixed_set_60": "uniform_60", "uniform_60": "fixed_set_60", "fixed_set_60_cover": "uniform_60",
                    "uniform_replicate": None}


def epoch0_lines(runs: list[dict]) -> list[str]:
    """Per arm, on how many seeds the training losses logged in epoch 0 equal its reference's, bit for bit."""
    by = {(r["arm"], *unit(r)): r for r in runs}

    def first_epoch(run: dict) -> list:
        per_epoch = run["global_step"] / run["preset"]["epochs"]
        return [point for point in run.get("logged_losses") or [] if point[0] <= per_epoch]

    rows = []
    for arm in sorted({r["arm"] for r in runs} - {"uniform"}):
        reference = EPOCH0_REFERENCE.get(arm, "uniform")
        pairs = [(by[(arm, *u)], by[(reference, *u)]) for a, *u in by if a == arm and (reference, *u) in by]
        if reference is None or not pairs:
            continue
        same = sum(bool(first_epoch(a)) and first_epoch(a) == first_epoch(b) for a, b in pairs)
        points = {len(first_epoch(a)) for a, _ in pairs}
        rows.append(f"| {arm} | {reference} | {same} of {len(pairs)} | {', '.join(map(str, sorted(points)))} |")
    if not rows:
        return []
    return ["**Epoch 0 is the reference's**: seeds on which every training loss logged in epoch 0 equals the "
            "reference arm's, bit for bit (the replicate's differs by design)", "",
            "| arm | reference | seeds equal | losses logged in epoch 0 |", "|---|---|---|---|", *rows, ""]


def host_lines(runs: list[dict], key: str = "AP50") -> list[str]:
    """Host noise: per seed with uniform run on two CPU models, the difference of their val (same code, data, seed)."""
    by_seed: dict[int, list[dict]] = {}
    for run in runs:
        if run["arm"] == "uniform":
            by_seed.setdefault(run["seed"], []).append(run)
    rows = []
    for seed, pair in sorted(by_seed.items()):
        if len(pair) < 2:
            continue
        first, second = sorted(pair, key=lambda r: unit(r)[1])[:2]
        rows.append(f"| {seed} | {unit(second)[1]} - {unit(first)[1]} | "
                    + " | ".join(f"{second['val'][e][key] - first['val'][e][key]:+.3f}" for e in ENDPOINTS) + " |")
    if not rows:
        return []
    return ["**Host noise**: uniform's val mAP50 on one seed run on two CPU models (the same code, data, seed and pin), "
            "the difference", "", "| seed | models | " + " | ".join(ENDPOINTS) + " |", "|---" * (len(ENDPOINTS) + 2) + "|",
            *rows, ""]


def doc_block(runs: list[dict]) -> str:
    """What the doc leads with: the verdict of ``runs`` (interim while the family is short), then, for the arms read
    (all their seeds in), recall@0.5 and F1@0.5, each signal's gain as a share of the oracle's, steps to match,
    what each signal's hard set holds, the compute-saving arm against uniform at its own step count; last,
    blinded, the seeds in per arm."""
    commits = sorted({r.get("commit", "?")[:7] for r in runs})
    test = verdict_test(runs, family=PLANNED_ARMS, planned_seeds=PLANNED_SEEDS)
    read = read_arms(test)
    lines = verdict_markdown(test)
    if read:
        for key, title in (("recall50", "recall@0.5"), ("F1_50", "F1@0.5")):
            lines += delta_markdown(verdict_test(runs, key=key, family=PLANNED_ARMS, planned_seeds=PLANNED_SEEDS),
                                    f"val {title}")
        shown = [r for r in runs if r["arm"] in read or r["arm"] == "uniform"]
        lines += oracle_share_lines(runs, test)
        lines += steps_to_match(shown, read)
        lines += mix_table(shown, [a for a in read if a in PLANNED_ARMS or a in SAVING_ARMS])
        for arm in (a for a in REDUCED_ARMS if {a, "uniform_60"} <= set(read)):
            same = verdict_test([{**r, "arm": "uniform"} if r["arm"] == "uniform_60" else r for r in runs
                                 if r["arm"] in (arm, "uniform_60")])
            lines += delta_markdown(same, f"{arm} at uniform's reduced step count, val mAP50", "uniform_60")
    lines += epoch0_lines(runs)
    lines += host_lines(runs)
    lines += [f"Runs in: {len(runs)} (commits {', '.join(commits)}); seeds per arm:", "", *status_lines(runs)]
    return "\n".join(lines) + "\n"


def write_doc_block(doc: Path, block: str) -> None:
    """Replace the text between :data:`DOC_BEGIN` and :data:`DOC_END` in ``doc`` (written whole, then renamed)."""
    text = doc.read_text()
    if text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1 or text.index(DOC_BEGIN) > text.index(DOC_END):
        raise ValueError(f"{doc}: needs one line {DOC_BEGIN!r} followed by one line {DOC_END!r}")
    head, rest = text.split(DOC_BEGIN)
    tail = rest.split(DOC_END)[1]
    from hsm.io import write_bytes_atomic

    write_bytes_atomic(f"{head}{DOC_BEGIN}\n\n{block}\n{DOC_END}{tail}".encode(), doc)


def read_doc_block(doc: Path) -> str:
    """The text :func:`write_doc_block` wrote into ``doc``."""
    text = doc.read_text()
    return text.split(DOC_BEGIN)[1].split(DOC_END)[0].strip("\n") + "\n"


def main() -> None:
    """``python bench/mining_effect_report.py DIR [--pilot | --status | --doc DOC]``: the verdict test of DIR's runs,
    or the pilot tables, or (blinded: no metric) how many seeds each arm has finished; ``--doc`` writes the
    verdict and the seeds in at the head of DOC (between its verdict markers)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path, help="a work directory of bench/mining_effect.py (its runs/*.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pilot", action="store_true", help="per-run values, paired sd per slice and the power calculation")
    mode.add_argument("--status", action="store_true", help="seeds finished per arm and thread time, no metric")
    mode.add_argument("--doc", type=Path, default=None, help="write the verdict block into this markdown file")
    mode.add_argument("--host", action="store_true", help="print this machine's CPU model tag (its runs' folder)")
    mode.add_argument("--eval-sd", action="store_true",
                      help="per uniform run, the sd of overall recall@0.5 and F1@0.5 over a bootstrap of val images")
    mode.add_argument("--keep", type=Path, default=None,
                      help="copy DIR's finished runs into this folder, compact, with their hard sets' slice mix")
    args = parser.parse_args()
    if args.host:
        print(this_host())
        return
    if args.keep is not None:
        try:
            names = keep_runs(args.out, args.keep)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(f"{args.keep}: {len(names)} run(s) written" + (f" ({', '.join(names)})" if names else ""))
        return
    try:
        runs = [read_run(p, sealed=is_kept(p)) for p in run_files(args.out)]
        if not runs:
            raise SystemExit(f"{args.out / 'runs'}: no finished runs (seed-*.json)")
        check_comparable(runs, args.out / "runs")
        check_pairing(runs, args.out / "runs")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.status:
        print("\n".join(status_lines(runs)))
        return
    if args.eval_sd:
        from hsm.data.synth import GRID_SHARES

        shares = {**GRID_SHARES, "clean": 1.0 - sum(GRID_SHARES.values())}
        print("| seed | overall recall@0.5 | sd (images) | overall F1@0.5 | sd (images) |\n|---|---|---|---|---|")
        for run in (r for r in runs if r["arm"] == "uniform"):
            sd = eval_sd(run, shares)
            print(f"| {run['seed']} | {sd['recall50']['value']:.3f} | {sd['recall50']['sd']:.4f} | "
                  f"{sd['F1_50']['value']:.3f} | {sd['F1_50']['sd']:.4f} |")
        return
    if args.doc is not None:
        try:
            write_doc_block(args.doc, doc_block(runs))
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(f"{args.doc}: verdict block written from {len(runs)} runs")
        return
    print("\n".join(pilot_lines(runs) if args.pilot else
                    verdict_markdown(verdict_test(runs, family=PLANNED_ARMS, planned_seeds=PLANNED_SEEDS))))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
