"""The report's statistics against scipy and hand computations, and its figures on synthetic tables."""

import hashlib
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from reports import stats
from reports.figures import KINDS, Figure, draw_all
from reports.tables import Tables


# --- elementary statistics -----------------------------------------------------------------------

def test_holm_matches_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone at 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN is not a test: m = 2
    out = stats.holm([0.01, math.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_compare_matches_scipy_and_hand_effect_sizes():
    a = np.array([0.31, 0.35, 0.29, 0.40, 0.38, 0.33])
    b = np.array([0.20, 0.22, 0.27, 0.19, 0.25])
    out = stats.compare(a, b)
    welch = sps.ttest_ind(a, b, equal_var=False)
    mwu = sps.mannwhitneyu(a, b, alternative="two-sided")
    assert out["t"] == pytest.approx(welch.statistic) and out["p_welch"] == pytest.approx(welch.pvalue)
    assert out["U"] == pytest.approx(mwu.statistic) and out["p_mwu"] == pytest.approx(mwu.pvalue)
    assert (out["n"], out["n_ref"]) == (6, 5)
    assert out["diff"] == pytest.approx(a.mean() - b.mean())
    # Hedges' g by hand: pooled sd, then the small-sample factor 1 - 3 / (4 * 11 - 9)
    pooled = math.sqrt((5 * a.var(ddof=1) + 4 * b.var(ddof=1)) / 9)
    assert out["hedges_g"] == pytest.approx((a.mean() - b.mean()) / pooled * (1 - 3 / 35))
    assert out["rank_biserial"] == pytest.approx(1.0)  # every a above every b: U = 30 = n1 n2


def test_rank_biserial_by_hand():
    assert stats.compare([1, 2, 3], [4, 5, 6])["rank_biserial"] == pytest.approx(-1)
    assert stats.compare([1, 4], [2, 3])["rank_biserial"] == pytest.approx(0)  # U = 2 of 4 pairs


def test_compare_degenerate_samples_give_nan_not_errors():
    out = stats.compare([0.5], [0.4, 0.6])
    assert math.isnan(out["p_welch"]) and math.isnan(out["hedges_g"])
    out = stats.compare([1.0, 1.0], [1.0, 1.0])  # no variance: t undefined
    assert math.isnan(out["t"])


def test_bootstrap_ci_is_seeded_and_sane():
    x = np.random.default_rng(1).normal(3.0, 1.0, 50)
    m, lo, hi = stats.bootstrap_ci(x)
    assert (m, lo, hi) == stats.bootstrap_ci(x)  # fixed seed: identical
    assert lo < m < hi and m == pytest.approx(x.mean())
    ref = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=10_000, random_state=0).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.05) and hi == pytest.approx(ref.high, abs=0.05)
    assert stats.bootstrap_ci([2.0]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))


# --- tables -> statistics -------------------------------------------------------------------------

def synthetic(n=8, replicates=True, tasks=("adding", "copy_memory")) -> Tables:
    """Two tasks x two lengths x three variants; 'bad' is clearly worse than 'lstm', 'twin' identical."""
    rng = np.random.default_rng(0)
    rows, curves, grads = [], [], []
    centre = {"lstm": 0.1, "twin": 0.1, "bad": 0.5}
    for task in tasks:
        for T in (10, 20):
            for variant in ("bad", "lstm", "twin"):
                cell = f"{task}(seq_len={T})/{variant}"
                for kind, count in (("search", 4), ("replicate", n if replicates else 0)):
                    for i in range(count):
                        obj = centre[variant] + (0.02 * i if variant == "twin" else 0.02 * rng.standard_normal()) \
                            + (0.01 * i if variant == "lstm" else 0)
                        run_id = f"{cell}#{kind}{i}"
                        rows.append({"study": "syn", "cell": cell, "task": task, "variant": variant,
                                     "ladder": "seq_len", "ladder_value": T, "seq_len": T, "kind": kind, "trial": i,
                                     "state": "COMPLETE", "objective": obj, "solved_threshold": 0.01,
                                     "param.lr": 10 ** rng.uniform(-4, -2), "param.n_params": 100 * (1 + len(variant)),
                                     "metric.baseline": 1 / 6, "metric.solved": float(obj < 0.12),
                                     "metric.seconds_per_step": 0.01, "run_id": run_id})
                        curves += [(run_id, "loss", s, obj * (1 + 1 / s)) for s in (1, 2, 3)]
                        if kind == "replicate":
                            grads += [(run_id, ph, lag, 0.1 ** lag * (2 if ph == "trained" else 1))
                                      for ph in ("init", "trained") for lag in range(T)]
    results = pd.DataFrame(rows)
    # an interrupted replicate is ignored; a failed one counts as not solved
    extra = dict(rows[-1], run_id="x-int", state="INTERRUPTED", objective=None)
    failed = dict(rows[-1], run_id="x-fail", state="FAIL", objective=None, **{"metric.solved": 1.0})
    results = pd.concat([results, pd.DataFrame([extra, failed])], ignore_index=True)
    imp = pd.DataFrame([{"task": t, "ladder_value": T, "variant": v, "cell": f"{t}(seq_len={T})/{v}", "param": p,
                         "importance": w, "raw": w, "n_trials": 4, "method": "PED-ANOVA", "note": ""}
                        for t in tasks for T in (10, 20) for v in ("bad", "lstm", "twin")
                        for p, w in (("lr", 0.7), ("hidden_size", 0.3))])
    return Tables(results, pd.DataFrame(curves, columns=["run_id", "metric", "step", "value"]),
                  pd.DataFrame(grads, columns=["run_id", "phase", "lag", "norm"]), imp,
                  {"study": "syn", "objective": {"metric": "loss", "direction": "minimize"},
                   "variant_order": ["lstm", "twin", "bad"], "task_order": ["copy_memory", "adding"]})


def test_versus_reference_flags_real_differences_only():
    t = synthetic()
    vs = stats.versus_reference(t, "lstm")
    assert list(vs.task.unique()) == ["copy_memory", "adding"]  # study-file order
    assert len(vs) == 2 * 2 * 2 and set(vs.variant) == {"twin", "bad"}
    bad, twin = vs[vs.variant == "bad"], vs[vs.variant == "twin"]
    assert bad.significant.all() and (bad.better == "worse").all()
    assert not twin.significant.any()
    assert vs.p_welch_holm.tolist() == pytest.approx(stats.holm(vs.p_welch).tolist())
    assert (vs.p_welch_holm >= vs.p_welch).all()
    # n excludes the interrupted and the failed run (no finite objective)
    assert set(vs.n) == {8} and set(vs.n_ref) == {8}


def test_selected_runs_and_success_rate():
    t = synthetic()
    runs = stats.selected_runs(t.results)
    assert set(runs.kind) == {"replicate"} and "x-int" not in set(runs.run_id)
    cells = stats.cell_stats(runs).set_index(["task", "ladder_value", "variant"])
    row = cells.loc[("copy_memory", 20, "twin")]
    assert row.runs == 9 and row.n == 8  # the failed run counts in the rate, not in the mean
    assert row.solved == 1 and row.success_rate == pytest.approx(1 / 9)  # only 0.10 < 0.12; failed: not solved
    assert cells.loc[("adding", 10, "bad")].success_rate == 0
    no_rep = synthetic(replicates=False)
    assert set(stats.selected_runs(no_rep.results).kind) == {"search"}
    assert "search trials" in stats.policy("search", "loss", "minimize")["runs per cell"]


def test_summary_has_one_row_per_cell():
    summ = stats.summary(synthetic())
    assert len(summ) == 12 and summ[["task", "ladder_value", "variant"]].drop_duplicates().shape[0] == 12
    assert {"best_search", "mean", "ci_low", "ci_high", "success_rate", "baseline", "solved_threshold"} <= set(summ)
    assert (summ.ci_low <= summ["mean"]).all() and (summ["mean"] <= summ.ci_high).all()


# --- figures ---------------------------------------------------------------------------------------

def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_figures_on_synthetic_tables_are_complete_and_deterministic(tmp_path):
    t = synthetic(n=3, tasks=("adding",))
    cells = stats.cell_stats(stats.selected_runs(t.results))
    first = draw_all(t, cells, tmp_path / "a")
    draw_all(t, cells, tmp_path / "b")
    assert list(first) == ["adding"]
    for task, items in first.items():
        assert [k for k, _ in items] == list(KINDS)
        for kind, fig in items:
            assert isinstance(fig, Figure), f"{task} {kind}: {fig}"
            assert len(fig.caption) > 80 and task in fig.caption
            for ext in ("png", "svg"):
                assert (tmp_path / "a" / f"{fig.stem}.{ext}").stat().st_size > 2000
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    svg = (tmp_path / "a" / "objective_adding.svg").read_text()
    assert "<dc:date>" not in svg  # no timestamp


def test_figures_explain_what_is_missing(tmp_path):
    t = synthetic(n=3, tasks=("adding",))
    t.grad_by_lag = t.grad_by_lag.iloc[0:0]
    t.importance = t.importance.iloc[0:0]
    t.results["param.lr"] = 1e-3  # lr not searched
    out = draw_all(t, stats.cell_stats(stats.selected_runs(t.results)), tmp_path)
    missing = {k: v for k, v in out["adding"] if not isinstance(v, Figure)}
    assert set(missing) == {"gradient", "importance", "lr_sensitivity"}
    assert all(isinstance(v, str) and v for v in missing.values())


def test_gradient_medians_count_vanished_runs():
    from reports.figures import gradient_medians
    rows = [(run, lag, norm) for run, norms in (("a", [1e-2, 1e-9, 0.0]), ("b", [1e-2, 0.0, 0.0]),
                                                 ("c", [1e-2, 1e-4, 1e-4]))
            for lag, norm in enumerate(norms)]
    data = pd.DataFrame(rows, columns=["run_id", "lag", "norm"]).assign(ladder_value=30, variant="rnn", phase="trained")
    medians = gradient_medians(data).set_index("lag").norm
    assert medians.to_dict() == {0: 1e-2, 1: 1e-9}  # lag 2: two of three runs vanished, so the median is 0
