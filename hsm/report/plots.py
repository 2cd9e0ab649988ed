"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes."""

from __future__ import annotations

import io

import numpy as np

from hsm.mining.suspects import metric_label
from hsm.report.data import RunData

__all__ = ["difficulty_figure", "weights_figure", "data_map_figure", "REGION_COLORS"]

REGION_COLORS = {"easy": "#2a9d8f", "medium": "#8d99ae", "hard": "#e76f51", "ambiguous": "#e9c46a"}


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96)
    plt.close(fig)
    return buffer.getvalue()


def _figure(ncols: int, width: float = 5.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, layout="constrained")
    return fig, axes[0]


def _legend(ax, **options) -> None:
    """``ax.legend(**options)`` when something on ``ax`` carries a label: an empty legend is a
    matplotlib warning that ``hsm report`` would print (a data map before 3 epochs has no point)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def difficulty_figure(run: RunData) -> bytes:
    """Hard vs regular score distributions per plan epoch, mean train loss per dataset, hard-set churn."""
    fig, (ax_scores, ax_loss, ax_churn) = _figure(3)
    epochs = sorted(run.plans)
    hard, regular, positions = [], [], []
    for k, e in enumerate(epochs):
        plan = run.plans[e]
        scores = plan.column("score").to_numpy()
        is_hard = plan.column("is_hard").to_numpy(zero_copy_only=False)
        hard.append(scores[is_hard] if is_hard.any() else np.array([np.nan]))
        regular.append(scores[~is_hard] if (~is_hard).any() else np.array([np.nan]))
        positions.append(k)
    positions = np.array(positions, dtype=float)
    for values, offset, color, label in ((regular, -0.18, "#8d99ae", "regular"), (hard, 0.18, "#e76f51", "hard")):
        clean = [v[~np.isnan(v)] if (~np.isnan(v)).any() else np.array([0.0]) for v in values]
        parts = ax_scores.boxplot(clean, positions=positions + offset, widths=0.3, patch_artist=True,
                                  showfliers=False, manage_ticks=False)
        for box in parts["boxes"]:
            box.set_facecolor(color)
        ax_scores.plot([], [], color=color, linewidth=8, label=label)
    ax_scores.set_xticks(positions, [str(e) for e in epochs])
    ax_scores.set_xlabel("plan epoch")
    ax_scores.set_ylabel(f"score ({run.metric})")
    ax_scores.set_title("hard vs regular scores")
    _legend(ax_scores, fontsize=8)
    for dataset, by_epoch in sorted(run.dataset_loss.items()):
        xs = sorted(by_epoch)
        ax_loss.plot(xs, [by_epoch[x] for x in xs], marker="o", label=dataset,
                     linewidth=2.5 if dataset == run.target else 1.2)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean train loss")
    ax_loss.set_title("train loss per dataset")
    _legend(ax_loss, fontsize=8)
    jaccard, kept, added, removed = [], [], [], []
    for previous, e in zip(epochs, epochs[1:]):
        before = _hard_ids(run, previous)
        after = _hard_ids(run, e)
        union = before | after
        jaccard.append(len(before & after) / len(union) if union else 1.0)
        kept.append(len(before & after))
        added.append(len(after - before))
        removed.append(len(before - after))
    xs = np.arange(len(jaccard))
    if len(xs):
        ax_churn.bar(xs - 0.25, kept, 0.25, label="kept", color="#2a9d8f")
        ax_churn.bar(xs, added, 0.25, label="added", color="#e76f51")
        ax_churn.bar(xs + 0.25, removed, 0.25, label="removed", color="#8d99ae")
        twin = ax_churn.twinx()
        twin.plot(xs, jaccard, color="black", marker="o", label="jaccard")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("jaccard")
        ax_churn.set_xticks(xs, [f"{a}->{b}" for a, b in zip(epochs, epochs[1:])])
        ax_churn.legend(fontsize=8, loc="upper left")
    else:
        ax_churn.text(0.5, 0.5, "one plan: no churn yet", ha="center", va="center", transform=ax_churn.transAxes)
    ax_churn.set_xlabel("plan epochs")
    ax_churn.set_ylabel("hard samples")
    ax_churn.set_title("hard-set churn")
    return _png(fig)


def _hard_ids(run: RunData, epoch: int) -> set[int]:
    plan = run.plans[epoch]
    mask = plan.column("is_hard").to_numpy(zero_copy_only=False)
    return set(plan.column("base_idx").to_numpy()[mask].tolist())


def weights_figure(run: RunData) -> bytes:
    """Weight histogram of the shown plan; mean target draws vs the draws its plan weight asks for."""
    fig, (ax_hist, ax_draws) = _figure(2)
    weights = run.plans[run.epoch].column("weight").to_numpy()
    values, counts = np.unique(weights, return_counts=True)
    if len(values) <= 12:
        ax_hist.bar([f"{v:g}" for v in values], counts, color="#457b9d")
    else:
        ax_hist.hist(weights, bins=30, color="#457b9d")
    ax_hist.set_xlabel("plan weight")
    ax_hist.set_ylabel("target samples")
    ax_hist.set_title(f"weights, plan epoch {run.epoch}")
    # Expected draws of sample i in epoch e: weight_i / sum(weight) * target draws in e (a triggered plan).
    lim = 0.0
    labelled: set[float] = set()
    for e in sorted(run.plans):
        manifest = run.manifests[e]
        if not manifest.get("triggered") or manifest.get("no_signal") or e not in run.draws:
            continue
        plan = run.plans[e]
        idx = plan.column("base_idx").to_numpy()
        weight = plan.column("weight").to_numpy()
        drawn = run.draws[e]
        actual = np.array([drawn.get(int(i), 0) for i in idx], dtype=float)
        total = actual.sum()
        if weight.sum() <= 0 or total == 0:
            continue
        expected = weight / weight.sum() * total
        groups = np.unique(weight)
        xs = [expected[weight == w].mean() for w in groups]
        ys = [actual[weight == w].mean() for w in groups]
        ax_draws.scatter(xs, ys, s=60, label=f"epoch {e}")
        for x, y, w in zip(xs, ys, groups):
            if w not in labelled:  # one label per weight; later epochs sit at the same place
                labelled.add(w)
                ax_draws.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
        lim = max(lim, max(xs), max(ys))
    if lim > 0:
        ax_draws.plot([0, lim * 1.1], [0, lim * 1.1], color="gray", linestyle="--", linewidth=1, label="draws = plan")
        ax_draws.legend(fontsize=8)
    else:
        ax_draws.text(0.5, 0.5, "no triggered plan has been trained on yet", ha="center", va="center",
                      transform=ax_draws.transAxes)
    ax_draws.set_xlabel("draws per sample the plan asks for")
    ax_draws.set_ylabel("mean draws per sample (events)")
    ax_draws.set_title("target draws vs plan weights")
    return _png(fig)


def data_map_figure(run: RunData) -> bytes:
    """Dataset Cartography: mean vs variability of the per-epoch metric, regions and suspects marked."""
    fig, (ax,) = _figure(1, width=7.0, height=5.0)
    dm = run.data_map
    # Samples drawn in fewer than min_epochs epochs have no meaningful variability: not plotted.
    regions = np.array([r or "unmapped" for r in dm.region])
    for region, color in REGION_COLORS.items():
        mask = regions == region
        if mask.any():
            ax.scatter(dm.variability[mask], dm.mean[mask], s=10, alpha=0.7, color=color,
                       label=f"{region} ({int(mask.sum())})", rasterized=True)
    if dm.is_suspect.any():
        ax.scatter(dm.variability[dm.is_suspect], dm.mean[dm.is_suspect], s=70, marker="x", color="#c1121f",
                   linewidths=2, label=f"suspects ({int(dm.is_suspect.sum())})")
    t = dm.thresholds
    if t["mean_high"] is not None:
        ax.axhline(t["mean_high"], color="#e76f51", linestyle="--", linewidth=1)
        ax.axhline(t["mean_low"], color="#2a9d8f", linestyle="--", linewidth=1)
        ax.axvline(t["variability_high"], color="#e9c46a", linestyle="--", linewidth=1)
        ax.axvline(t["variability_median"], color="#c1121f", linestyle=":", linewidth=1)
    if not (regions != "unmapped").any():
        ax.text(0.5, 0.5, "no sample drawn in 3+ epochs yet", ha="center", va="center", transform=ax.transAxes)
    metric = metric_label(run.metric)
    ax.set_xlabel(f"variability (std of per-epoch {metric})")
    ax.set_ylabel(f"mean per-epoch {metric}")
    ax.set_title("data map (hard = top, ambiguous = right)")
    _legend(ax, fontsize=8, loc="best")
    return _png(fig)
