"""The mining-effect verdict test (bench/mining_effect_report.py) against hand computations.

Oracles: for 2 degrees of freedom Student's t has a closed form, ``F(t) = 1/2 + t / (2 sqrt(2 + t^2))``
and quantile ``t_q = (2q - 1) / sqrt(2 q (1 - q))``; Holm's adjusted p-values are worked by hand.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.mining_effect_report import (  # noqa: E402
    ENDPOINTS, holm, paired_test, seeds_for_power, verdict_markdown, verdict_test)


def test_paired_t_on_three_seeds_matches_the_closed_form():
    result = paired_test([0.1, 0.2, 0.3])
    t = 0.2 / (0.1 / math.sqrt(3))
    assert result["t"] == pytest.approx(t)
    assert result["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # 2 * (1 - F(t)), df 2
    q = 0.975
    half = (2 * q - 1) / math.sqrt(2 * q * (1 - q)) * 0.1 / math.sqrt(3)  # t_{2, 0.975} = 4.3027
    assert result["ci"] == pytest.approx((0.2 - half, 0.2 + half))
    assert paired_test([0.05, 0.05, 0.05])["p"] == 0.0 and paired_test([0.05, 0.05, 0.05])["ci"] == pytest.approx((0.05, 0.05)) and paired_test([0.0, 0.0])["p"] == 1.0
    assert math.isnan(paired_test([0.3])["p"])


def test_holm_adjusts_step_down_by_hand():
    # sorted: 0.01 * 4 = 0.04; 0.03 * 3 = 0.09; 0.04 * 2 = 0.08 -> 0.09 (monotone); 0.5 * 1 = 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    adjusted = holm([0.2, math.nan, 0.6])  # NaN is not counted: m = 2
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 0.8 * 2 capped at 1; then max(1, 0.9 * 1)


def _runs(effects: dict[str, dict[str, float]], n_seeds: int, noise: float, seed: int = 0) -> list[dict]:
    """Synthetic runs: uniform at 0.5 on every endpoint plus seed noise; each arm adds its effect and its own noise."""
    rng = np.random.default_rng(seed)
    endpoints = ("small", "crowded", "rare", "low_contrast", "overall")
    runs = []
    for s in range(n_seeds):
        base = {e: 0.5 + rng.normal(0, 0.05) for e in endpoints}
        runs.append({"seed": s, "arm": "uniform", "val": {e: {"AP50": base[e]} for e in endpoints}})
        for arm, effect in effects.items():
            runs.append({"seed": s, "arm": arm, "val": {e: {"AP50": base[e] + effect.get(e, 0.0) + rng.normal(0, noise)}
                                                      for e in endpoints}})
    return runs


def test_verdicts_follow_the_rule_fixed_in_advance():
    runs = _runs({"uniform_replicate": {}, "good": {"small": 0.1}, "costly": {"small": 0.1, "overall": -0.1},
                  "fixed_set_60": {"small": 0.001}}, n_seeds=8, noise=0.005)
    test = verdict_test(runs)
    assert test["verdicts"]["uniform_replicate"] == "no effect"
    assert test["verdicts"]["good"] == "helps small"
    assert test["verdicts"]["costly"].startswith("gains on small but not non-inferior overall")
    assert "hurts overall" in test["verdicts"]["costly"]
    assert test["verdicts"]["fixed_set_60"] == "saves (non-inferior on every endpoint)"
    # The Holm family: 3 arms x 5 endpoints (the saving arm is judged by its CIs alone).
    cell = test["cells"][("good", "small")]
    others = sorted(c["p"] for k, c in test["cells"].items() if k[0] != "fixed_set_60")
    assert cell["p"] == others[0] and cell["p_holm"] == pytest.approx(min(1.0, 15 * cell["p"]))
    assert math.isnan(test["cells"][("fixed_set_60", "small")]["p_holm"])
    # Independent check of one cell: scipy's paired t-test on the same numbers.
    from scipy import stats

    uniform = [r["val"]["small"]["AP50"] for r in runs if r["arm"] == "uniform"]
    good = [r["val"]["small"]["AP50"] for r in runs if r["arm"] == "good"]
    assert cell["p"] == pytest.approx(stats.ttest_rel(good, uniform).pvalue)


def test_an_arm_outside_the_planned_family_changes_no_adjusted_p_and_is_not_judged():
    effects = {"loss": {"small": 0.03}, "uniform_replicate": {}}
    runs = _runs(effects, n_seeds=8, noise=0.01)
    planned = verdict_test(runs, family=("loss", "uniform_replicate"))
    reference = [{**r, "arm": "uniform_60"} for r in _runs({"x": {"small": 0.2}}, n_seeds=8, noise=0.01, seed=1)
                 if r["arm"] == "x"]
    extra = runs + reference
    with_reference = verdict_test(extra, family=("loss", "uniform_replicate"))
    assert with_reference["verdicts"]["uniform_60"] == "not judged (outside the planned family)"
    assert math.isnan(with_reference["cells"][("uniform_60", "small")]["p_holm"])
    for cell, c in planned["cells"].items():
        assert with_reference["cells"][cell]["p_holm"] == c["p_holm"]
    # Without a family the reference joins the Holm family: ten more cells, larger adjusted p.
    pooled = verdict_test(extra)
    assert pooled["cells"][("loss", "small")]["p_holm"] > planned["cells"][("loss", "small")]["p_holm"]


def test_a_saving_arm_short_on_one_endpoint_does_not_save_and_few_seeds_are_undecided():
    runs = _runs({"fixed_set_60": {"crowded": -0.1}}, n_seeds=6, noise=0.005)
    assert verdict_test(runs)["verdicts"]["fixed_set_60"] == "does not save (not non-inferior on crowded)"
    assert verdict_test(_runs({"loss": {"small": 0.1}}, n_seeds=1, noise=0.0))["verdicts"]["loss"].startswith("undecided")


def test_seeds_for_power_is_the_smallest_count_reaching_the_power():
    from scipy import stats

    sd, delta, alpha = 0.06, 0.05, 0.05 / 35
    n = seeds_for_power(sd, delta, alpha, 0.8)

    def power(k: int) -> float:  # by simulation: the share of paired t-tests that reject
        rng = np.random.default_rng(k)
        diffs = rng.normal(delta, sd, (20000, k))
        t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(k))
        return float((np.abs(t) > stats.t.ppf(1 - alpha / 2, k - 1)).mean())

    assert power(n) >= 0.79 and power(n - 1) < 0.8
    z_alpha, z_power = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(0.8)
    guenther = ((z_alpha + z_power) * sd / delta) ** 2 + z_alpha ** 2 / 2  # normal approximation + t correction
    assert abs(n - guenther) <= 1


def test_every_arm_shares_uniforms_epoch_0_and_the_replicate_only_changes_the_data_order(tmp_path):
    """Epoch 0 has no plan; its schedule is a function of the fusion seed and target_epoch_size alone
    (hsm.data.schedule.build_schedule), so an arm with uniform's fusion seed and no target_epoch_size
    draws uniform's epoch 0. The replicate keeps the init (training seed) and moves the data order."""
    from bench.mining_effect import ARMS, PRESETS, run_config

    from hsm.config_load import parse_config

    corpus = {"bbu": tmp_path / "train.jsonl", "generic": tmp_path / "generic.jsonl"}
    preset = PRESETS["finetune"]
    for arm, mining in ARMS.items():
        order_seed = 7 + (1000 if arm == "uniform_replicate" else 0)
        cfg = parse_config(run_config(corpus, tmp_path / arm, mining, preset, 7, False, order_seed), arm)
        assert cfg.training["seed"] == 7 and cfg.training["data_seed"] == 7
        assert cfg.custom.fusion_config.seed == (1007 if arm == "uniform_replicate" else 7)
        assert [s.ratio for s in cfg.custom.fusion_config.sources] == [preset["source_ratio"]]
        if arm in ("fixed_set_60", "uniform_60", "fixed_set_60_cover"):  # 60% epochs, epoch 0 shared by the three
            assert cfg.mining.target_epoch_size == 1200
            assert cfg.mining.start_epoch == {"fixed_set_60": 1, "uniform_60": 10_000, "fixed_set_60_cover": 2}[arm]
            # Epochs before the first plan draw 1,200 each, cycling: only from 2 on do they cover the 2,000.
            assert (cfg.mining.start_epoch * 1200 >= 2000) == (arm != "fixed_set_60")
        elif cfg.mining is not None:
            assert cfg.mining.target_epoch_size is None and cfg.mining.start_epoch == 1
    fixed = parse_config(run_config(corpus, tmp_path / "f", ARMS["fixed_set"], preset, 7, False), "fixed_set").mining
    assert (fixed.hard_sample_size, fixed.regular_sample_size) == (400, 800)  # 20% + 40% of 2,000


def test_seeds_for_power_never_asks_fewer_seeds_for_more_noise():
    counts = [seeds_for_power(sd, 0.05, 0.05 / 35) for sd in (0.01, 0.02, 0.03, 0.05, 0.07, 0.1)]
    # sd 0.02 at 0.05 / 35: power 0.758 at 7 seeds, 0.900 at 8 (simulated: 0.758, 0.900); scipy's far tail is NaN there
    assert counts == sorted(counts) and counts[1] == 8


def _curve_runs(curves: dict[str, list[list[float]]], steps: dict[str, list[int]]) -> list[dict]:
    """Runs whose overall mAP50 curve per seed is given (``curves[arm][seed]``), on ``steps[arm]``."""
    return [{"seed": s, "arm": arm, "val": {"overall": {"AP50": values[-1]}},
             "curves": [{"step": st, "val": {"overall": {"AP50": v}}} for st, v in zip(steps[arm], values)]}
            for arm, per_seed in curves.items() for s, values in enumerate(per_seed)]


def test_crossing_is_linear_between_epoch_ends():
    from bench.mining_effect_report import crossing

    steps, values = [100, 200, 300, 400], np.array([0.1, 0.3, 0.5, 0.7])
    assert crossing(steps, values, 0.4) == pytest.approx(250.0)  # halfway from 0.3 (step 200) to 0.5 (step 300)
    assert crossing(steps, values, 0.05) == 100.0 and crossing(steps, values, 0.7) == 400.0
    assert math.isinf(crossing(steps, values, 0.71))


def test_steps_to_match_reads_100_percent_for_uniform_itself_and_the_shift_it_was_given():
    from bench.mining_effect_report import match_share

    rng = np.random.default_rng(3)
    base = np.array([0.2, 0.4, 0.6, 0.8])
    noise = rng.normal(0, 0.03, (8, 1))
    uniform = (base + noise).tolist()
    early = (np.array([0.4, 0.6, 0.8, 0.8]) + noise).tolist()  # uniform's curve one epoch early, per seed
    grid = [157, 314, 471, 628]
    runs = _curve_runs({"uniform": uniform, "same": uniform, "early": early}, {a: grid for a in ("uniform", "same", "early")})
    same = match_share(runs, "same")
    assert same["share"] == 1.0 and same["low"] == same["high"] == 1.0 and same["seeds"] == 8
    # The early arm's mean curve meets uniform's mean final value exactly at its third epoch end: 471 / 628.
    assert match_share(runs, "early")["share"] == pytest.approx(471 / 628)
    # A shorter arm (the compute-saving pair) is measured on its own steps against uniform's.
    short = _curve_runs({"uniform": uniform, "short": (base[[1, 3]] + noise).tolist()},
                        {"uniform": grid, "short": [188, 376]})
    assert match_share(short, "short")["share"] == pytest.approx(376 / 628)


def test_a_placebo_does_not_save_steps_by_a_noisy_first_crossing():
    """The old measure (each seed's first crossing of uniform's single endpoint) let an arm equal to uniform but for
    eval noise "save" steps on many seeds; the smoothed, paired one keeps 100% inside its interval."""
    from bench.mining_effect_report import match_share

    rng = np.random.default_rng(11)
    base = np.array([0.55, 0.62, 0.66, 0.68])
    seed_level = rng.normal(0, 0.03, (16, 1))
    uniform = base + seed_level + rng.normal(0, 0.02, (16, 4))
    placebo = base + seed_level + rng.normal(0, 0.02, (16, 4))
    grid = [157, 314, 471, 628]
    runs = _curve_runs({"uniform": uniform.tolist(), "placebo": placebo.tolist()}, {"uniform": grid, "placebo": grid})
    old_saves = sum(any(v >= u[-1] for v in p[:-1]) for u, p in zip(uniform, placebo))
    assert old_saves >= 3  # the defect the issue describes: early "crossings" of noise
    m = match_share(runs, "placebo")
    assert m["low"] <= 1.0 <= m["high"]


def test_runs_under_other_kernels_or_libraries_are_refused_by_name(tmp_path):
    """A run on the host's own ISA beside pinned ones (or under another torch) differs for a reason that is not the
    arm; the report refuses the mix and names the runs of each group."""
    import json as json_

    from bench.mining_effect_report import load_runs

    pinned = {"cpu_capability": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    (tmp_path / "runs").mkdir()
    for seed, arm, isa in ((0, "uniform", pinned), (0, "loss", pinned), (1, "uniform", {"cpu_capability": "AVX512"})):
        run = {"seed": seed, "arm": arm, "val": {"overall": {"AP50": 0.5}}, "versions": {"torch": "2.13.0+cpu"},
               "preset": {"name": "finetune"}, "isa": isa, "hard_set_mix": None}
        (tmp_path / "runs" / f"seed-{seed}-{arm}.json").write_text(json_.dumps(run))
    with pytest.raises(ValueError, match="different libraries, CPU kernels or presets") as refused:
        load_runs(tmp_path)
    assert "seed-0-loss, seed-0-uniform" in str(refused.value) and "seed-1-uniform" in str(refused.value)
    (tmp_path / "runs" / "seed-1-uniform.json").unlink()
    assert [r["arm"] for r in load_runs(tmp_path)] == ["loss", "uniform"]


def test_a_cut_run_file_is_an_error_naming_it(tmp_path):
    from bench.mining_effect_report import load_runs

    (tmp_path / "runs").mkdir()
    whole = '{"seed": 0, "arm": "uniform", "val": {"overall": {"AP50": 0.5}}, "hard_set_mix": null}'
    (tmp_path / "runs" / "seed-0-uniform.json").write_text(whole)
    (tmp_path / "runs" / "seed-0-loss.json").write_text(whole.replace("uniform", "loss")[:40])
    with pytest.raises(ValueError, match="seed-0-loss.json: not a whole run file"):
        load_runs(tmp_path)


def test_a_kept_run_changed_in_place_is_refused_by_name_whatever_digit_changed(tmp_path):
    """Every one-digit change of a kept run file that changes what it holds (same size; valid JSON or not, in a
    value, a key or the digest itself) is an error naming the file; the oracle is the file's own text, changed by
    hand here. (The 17th significant digit of 0.30000000000000004 can change without changing the float.)"""
    import re

    from bench.mining_effect_report import load_runs, sealed_bytes

    kept = tmp_path / "runs" / "amd-epyc"
    kept.mkdir(parents=True)
    run = {"seed": 3, "arm": "loss", "val": {"overall": {"AP50": 0.625, "recall50": 0.1 + 0.2}}, "seconds": 412.5,
           "hard_set_mix": None}
    path = kept / "seed-3-loss.json"
    text = sealed_bytes(run).decode()
    path.write_text(text)
    assert load_runs(tmp_path) == [run]  # the digest checked and taken off; floats back bit for bit
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    valid = 0
    for i in digits:
        changed = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]
        path.write_text(changed)
        try:
            if json.loads(changed) == json.loads(text):
                continue  # the same values, written another way: nothing changed
            valid += 1
            expected = "(changed since it was kept|a kept run without its sha256)"  # the latter: in its key
        except ValueError:
            expected = "not a whole run file"
        with pytest.raises(ValueError, match=re.escape(f"{path}: ") + expected):
            load_runs(tmp_path)
    assert valid > 64  # the digest's digits and the values' at least
    path.write_text(text)
    assert load_runs(tmp_path) == [run]


def test_a_kept_run_without_its_digest_is_refused_and_keeping_it_again_seals_it(tmp_path):
    """A run file in the work directory has no digest (it is not kept yet); in a kept folder one without it is
    refused by name, and ``--keep`` from its work directory writes it sealed, once."""
    from bench.mining_effect_report import DIGEST_KEY, keep_runs, load_runs

    run = {"seed": 0, "arm": "uniform", "val": {"overall": {"AP50": 0.5}}, "preset": {"epochs": 4},
           "hard_set_mix": None}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed-0-uniform.json").write_text(json.dumps(run))
    assert load_runs(tmp_path) == [run]
    keep = tmp_path / "kept" / "runs" / "amd-epyc"
    keep.mkdir(parents=True)
    (keep / "seed-0-uniform.json").write_text(json.dumps(run))  # kept before runs carried a digest
    with pytest.raises(ValueError, match=f"seed-0-uniform.json: a kept run without its {DIGEST_KEY}"):
        load_runs(tmp_path / "kept")
    assert keep_runs(tmp_path, keep) == ["seed-0-uniform.json"]
    assert json.loads((keep / "seed-0-uniform.json").read_text())[DIGEST_KEY]
    assert load_runs(tmp_path / "kept") == [run]
    assert keep_runs(tmp_path, keep) == []  # sealed: nothing to add


FAMILY = ("uniform_replicate", "oracle", "loss", "det_f1")


def test_an_arm_short_of_its_planned_seeds_is_not_read_and_shows_no_number():
    runs = _runs({"uniform_replicate": {}, "loss": {"rare": 0.3}}, n_seeds=6, noise=0.01)
    runs = [r for r in runs if not (r["arm"] == "uniform_replicate" and r["seed"] >= 4)]
    test = verdict_test(runs, family=FAMILY, planned_seeds=6)
    assert test["interim"] and test["verdicts"]["uniform_replicate"] == "not read (4 of 6 seeds)"
    assert test["cells"][("uniform_replicate", "rare")]["withheld"]
    row = next(line for line in verdict_markdown(test) if line.startswith("| uniform_replicate "))
    assert row.count("not read") == len(ENDPOINTS) + 1 and "[" not in row and "+0." not in row and "-0." not in row
    # loss is complete: its huge effect is decided already, at Bonferroni over the whole family of 4 x 5 cells.
    cell = test["cells"][("loss", "rare")]
    assert cell["p_bounds"] == pytest.approx((cell["p"], min(1.0, 20 * cell["p"])))
    assert test["verdicts"]["loss"] == "helps rare"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(effects=st.lists(st.sampled_from([0.0, 0.004, 0.008, 0.015, 0.03, -0.015]), min_size=4 * 5, max_size=4 * 5),
       noise=st.sampled_from([0.005, 0.01, 0.02]), read=st.integers(1, 3), data_seed=st.integers(0, 10_000))
def test_a_verdict_read_before_the_family_is_complete_never_changes_when_it_completes(effects, noise, read, data_seed):
    """Oracle: the final Holm verdict on the whole family. Every interim cell decided must agree with it, and every
    interim verdict with nothing pending must be the final verdict word for word, whatever the unread arms hold."""
    arm_effects = {arm: dict(zip(ENDPOINTS, effects[5 * i:5 * i + 5])) for i, arm in enumerate(FAMILY)}
    runs = _runs(arm_effects, n_seeds=8, noise=noise, seed=data_seed)
    unread = FAMILY[read:]
    early = [r for r in runs if not (r["arm"] in unread and r["seed"] >= 5)]  # the unread arms: 5 of 8 seeds so far
    interim = verdict_test(early, family=FAMILY, planned_seeds=8)
    final = verdict_test(runs, family=FAMILY, planned_seeds=8)
    assert interim["interim"] and not final["interim"]
    for arm in FAMILY[:read]:
        for endpoint in ENDPOINTS:
            low, high = interim["cells"][(arm, endpoint)]["p_bounds"]
            p_holm = final["cells"][(arm, endpoint)]["p_holm"]
            assert low <= p_holm + 1e-12 and p_holm <= high + 1e-12
        if "pending" not in interim["verdicts"][arm]:
            assert interim["verdicts"][arm] == final["verdicts"][arm]
    for arm in unread:
        assert interim["verdicts"][arm] == "not read (5 of 8 seeds)"


def _rows_run(per_slice: dict[str, list[tuple[int, int, int]]], shares: dict[str, float]) -> dict:
    """A run whose val is scored from its image rows by hand, overall by the bench's own weighting."""
    from bench.mining_effect import overall

    rows = {"slice": [], "tp": [], "fp": [], "fn": []}
    val = {}
    for name, images in per_slice.items():
        for tp, fp, fn in images:
            rows["slice"].append(name), rows["tp"].append(tp), rows["fp"].append(fp), rows["fn"].append(fn)
        t, f_p, f_n = (sum(x[i] for x in images) for i in range(3))
        val[name] = {"recall50": t / (t + f_n), "F1_50": 2 * t / (2 * t + f_p + f_n), "AP50": 0.0, "mAP": 0.0}
    val["overall"] = overall(val, shares)
    return {"seed": 0, "arm": "uniform", "images": rows, "val": val}


def test_the_eval_sd_is_a_bootstrap_of_the_val_images_checked_against_the_runs_own_scores():
    from bench.mining_effect_report import eval_sd

    rng = np.random.default_rng(3)
    hits = rng.random(400) < 0.3
    shares = {"clean": 0.9, "noise": 0.1}  # one val slice: noise images are clean ones on val
    run = _rows_run({"clean": [(int(h), 0, 1 - int(h)) for h in hits]}, shares)
    sd = eval_sd(run, shares, n_boot=4000)
    p = hits.mean()
    assert sd["recall50"]["value"] == pytest.approx(p)
    assert sd["recall50"]["sd"] == pytest.approx(math.sqrt(p * (1 - p) / 400), rel=0.06)  # binomial sd of a mean
    # Two slices, weighted as the bench weights them; weights that are not the eval's are refused by name.
    two = {"clean": 0.7, "small": 0.2, "noise": 0.1}
    run = _rows_run({"clean": [(2, 1, 0), (1, 0, 1)] * 20, "small": [(0, 1, 2), (1, 0, 0)] * 20}, two)
    assert eval_sd(run, two)["F1_50"]["value"] == pytest.approx(run["val"]["overall"]["F1_50"])
    with pytest.raises(ValueError, match="seed-0-uniform"):
        eval_sd(run, {"clean": 0.5, "small": 0.5})


def _on(run: dict, cpu: str) -> dict:
    return {**run, "isa": {"cpu": cpu}}


def test_an_arm_is_paired_with_uniforms_run_on_its_own_cpu_model():
    """A pinned run repeats on one CPU model, not across vendors: each arm's Δ is taken against uniform on its model."""
    from bench.mining_effect_report import check_pairing, host_tag, unit

    assert host_tag("Intel(R) Xeon(R) Processor") == "intel-xeon-processor" and host_tag("AMD EPYC") == "amd-epyc"
    assert host_tag("") == "unknown-cpu"
    runs = _runs({"loss": {"rare": 0.05}}, n_seeds=6, noise=0.0)
    intel = [_on(r, "Intel(R) Xeon(R) Processor") for r in runs]
    # Seeds 4 and 5: loss ran on an AMD host, with uniform rerun there 0.1 higher on every endpoint.
    moved = []
    for r in intel:
        if r["seed"] >= 4:
            if r["arm"] == "uniform":
                moved.append(_on({**r, "val": {e: {"AP50": v["AP50"] + 0.1} for e, v in r["val"].items()}}, "AMD EPYC"))
            else:
                r = _on({**r, "val": {e: {"AP50": v["AP50"] + 0.1} for e, v in r["val"].items()}}, "AMD EPYC")
        moved.append(r)
    check_pairing(moved, Path("runs"))
    test = verdict_test(moved)
    assert test["cells"][("loss", "rare")]["n"] == 6
    assert test["cells"][("loss", "rare")]["mean"] == pytest.approx(0.05)  # not 0.05 + 0.1 on two seeds
    assert test["cells"][("loss", "small")]["mean"] == pytest.approx(0.0)
    assert {unit(r) for r in moved if r["arm"] == "uniform"} >= {(4, "amd-epyc"), (4, "intel-xeon-processor")}
    # An arm run twice for one seed (on two models) is refused by name; uniform may have one run per model.
    with pytest.raises(ValueError, match="seed-4-loss on amd-epyc, seed-4-loss on intel-xeon-processor"):
        check_pairing(moved + [next(r for r in intel if r["arm"] == "loss" and r["seed"] == 4)], Path("runs"))
    # The seeds with uniform on both models measure host noise: the block lists their difference per endpoint.
    from bench.mining_effect_report import host_lines

    lines = host_lines(moved)
    assert [line.split(" | ")[0] for line in lines if line.startswith("| 4 ") or line.startswith("| 5 ")] == ["| 4", "| 5"]
    assert "| 4 | intel-xeon-processor - amd-epyc | -0.100 | -0.100 | -0.100 | -0.100 | -0.100 |" in lines


def test_a_signals_share_of_the_oracles_gain_is_the_ratio_of_mean_gains_each_against_its_own_models_uniform():
    from bench.mining_effect_report import oracle_share

    runs = _runs({"oracle": {"rare": 0.08}, "loss": {"rare": 0.03}}, n_seeds=10, noise=0.01, seed=3)
    # Seed 9's loss and its uniform ran on another model, 0.2 higher: that shift is the host's, not the arm's.
    runs = [_on({**r, "val": {e: {"AP50": v["AP50"] + 0.2} for e, v in r["val"].items()}}, "AMD EPYC")
            if r["seed"] == 9 and r["arm"] == "loss" else r for r in runs]
    runs.append(_on({**next(r for r in runs if r["seed"] == 9 and r["arm"] == "uniform"),
                     "val": {e: {"AP50": v["AP50"] + 0.2} for e, v in next(
                         r for r in runs if r["seed"] == 9 and r["arm"] == "uniform")["val"].items()}}, "AMD EPYC"))
    # The obvious computation, by hand: per seed, each arm minus uniform of its own host.
    val = {(r["arm"], r["seed"], (r.get("isa") or {}).get("cpu")): r["val"]["rare"]["AP50"] for r in runs}
    loss = [val[("loss", s, "AMD EPYC" if s == 9 else None)] - val[("uniform", s, "AMD EPYC" if s == 9 else None)]
            for s in range(10)]
    oracle = [val[("oracle", s, None)] - val[("uniform", s, None)] for s in range(10)]
    got = oracle_share(runs, "loss", "rare")
    assert got["n"] == 10 and got["share"] == pytest.approx(sum(loss) / sum(oracle))
    assert got["ci"][0] < got["share"] < got["ci"][1] and not got["unbounded"]
    # No oracle gain: no share, and an interval that is not given.
    flat = oracle_share(_runs({"oracle": {}, "loss": {}}, n_seeds=10, noise=0.01), "loss", "rare")
    assert flat["unbounded"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.floats(-1.0, 2.0), gains=st.lists(st.floats(0.001, 0.2), min_size=3, max_size=12))
def test_a_signal_gaining_k_times_the_oracle_on_every_seed_reads_k_with_a_point_interval(k, gains):
    from bench.mining_effect_report import oracle_share

    runs = []
    for seed, gain in enumerate(gains):
        base = 0.3 + 0.01 * seed
        for arm, value in (("uniform", base), ("oracle", base + gain), ("loss", base + k * gain)):
            runs.append({"seed": seed, "arm": arm, "val": {"rare": {"AP50": value}}})
    got = oracle_share(runs, "loss", "rare", n_boot=200)
    assert got["share"] == pytest.approx(k, abs=1e-6)
    assert got["ci"] == pytest.approx((k, k), abs=1e-6)


def test_the_block_shows_shares_only_on_slices_the_oracle_is_decided_to_lift():
    from bench.mining_effect_report import doc_block

    runs = _runs({"uniform_replicate": {}, "oracle": {"rare": 0.1}, "loss": {"rare": 0.05},
                  "label_loss": {}}, n_seeds=16, noise=0.01)
    for r in runs:  # the block's other tables read these too
        r.update(commit="c0ffee0", seconds=1.0, global_step=4, preset={"epochs": 4})
        for v in r["val"].values():
            v.update(recall50=v["AP50"], F1_50=v["AP50"])
    block = doc_block(runs)
    assert "on the slices the oracle is decided to lift: rare)" in block
    assert "| loss | 16 | 0." in block and "| label_loss | 16 | " in block
    assert "| uniform_replicate | 16 | " not in block.split("share of the oracle's")[1].split("\n\n")[1]
