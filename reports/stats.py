"""What a report computes from the tidy table: the aggregation policy, per-cell summaries, and the
comparison of every variant against a reference variant.

The unit of comparison is a *run's final objective* (the study's objective metric on the held-out
eval set after training). Each cell (task settings x variant) contributes the replicate runs of its
best search trial: the same configuration retrained with fresh seeds, so the spread is seed noise,
not hyperparameter noise (Greff et al. 2017 compare variants the same way, with Welch's t-test).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from reports.tables import Tables

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000
ALPHA = 0.05
CELL = ["task", "ladder_value", "variant"]


def policy(unit: str, objective_metric: str, direction: str) -> dict[str, str]:
    """The aggregation policy, in words, for the report page and the manifest."""
    units = {"replicate": "the replicate runs of each cell (its best search trial retrained with fresh seeds)",
             "search": "the COMPLETE search trials of each cell (the study ran no replicate runs)"}
    return {
        "objective": f"final held-out eval value of the objective metric {objective_metric!r} of each run "
                     f"({direction})",
        "runs per cell": units[unit],
        "centre and interval": f"mean, 95% percentile bootstrap CI of the mean ({BOOTSTRAP_RESAMPLES} "
                               f"resamples, numpy default_rng seed {BOOTSTRAP_SEED})",
        "success rate": "fraction of those runs whose final eval has solved = 1 (a failed run counts as not solved)",
        "tests": "each variant against the reference, per task and ladder value: Welch's t-test and "
                 "Mann-Whitney U, two-sided, Holm-corrected over all comparisons of the study (per test), "
                 f"significant if the corrected p < {ALPHA}",
        "effect sizes": "Hedges' g of (variant - reference) with pooled sd; rank-biserial r = 2U/(n1 n2) - 1 "
                        "(positive: the variant's objective tends to be larger)",
        "excluded": "interrupted runs (the engine replaces them) and non-finite objectives",
    }


def unit_of(results: pd.DataFrame) -> str:
    """Which runs the statistics use: replicate runs if the study has any, else search trials."""
    return "replicate" if (results.kind == "replicate").any() else "search"


def selected_runs(results: pd.DataFrame) -> pd.DataFrame:
    """The runs the aggregation policy uses (see :func:`policy`), with ``value`` (finite objective or
    NaN) and ``success`` (0/1) columns."""
    unit = unit_of(results)
    runs = results[(results.kind == unit) & (results.state != "INTERRUPTED")]
    if unit == "search":
        runs = runs[runs.state == "COMPLETE"]
    runs = runs.copy()
    obj = pd.to_numeric(runs.objective, errors="coerce")
    runs["value"] = obj.where(np.isfinite(obj))
    solved = pd.to_numeric(runs.get("metric.solved", pd.Series(np.nan, index=runs.index)), errors="coerce")
    runs["success"] = ((runs.state == "COMPLETE") & (solved == 1)).astype(float)
    return runs


# --------------------------------------------------------------------------------------------------
# Elementary statistics
# --------------------------------------------------------------------------------------------------

def bootstrap_ci(values, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean, from a fixed seed."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    if len(x) == 1:
        return (float(x[0]),) * 3
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN and does not
    count towards the number of tests."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def hedges_g(a, b) -> float:
    """Hedges' g of mean(a) - mean(b): Cohen's d with the pooled sd, times 1 - 3 / (4 (n1 + n2) - 9)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        return math.nan
    pooled = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    if pooled == 0:
        return math.nan
    d = (a.mean() - b.mean()) / pooled
    return float(d * (1 - 3 / (4 * (n1 + n2) - 9)))


def compare(a, b) -> dict[str, float]:
    """Variant sample ``a`` against reference sample ``b``: Welch's t, Mann-Whitney U (two-sided,
    U of ``a``), Hedges' g and rank-biserial r = 2U/(n1 n2) - 1. NaN where a test is undefined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = {"n": len(a), "n_ref": len(b), "mean": a.mean() if len(a) else math.nan,
           "mean_ref": b.mean() if len(b) else math.nan, "t": math.nan, "p_welch": math.nan,
           "U": math.nan, "p_mwu": math.nan, "hedges_g": hedges_g(a, b), "rank_biserial": math.nan}
    out["diff"] = out["mean"] - out["mean_ref"]
    if len(a) >= 2 and len(b) >= 2 and (a.var() > 0 or b.var() > 0):
        t = sps.ttest_ind(a, b, equal_var=False)
        out["t"], out["p_welch"] = float(t.statistic), float(t.pvalue)
    if len(a) >= 1 and len(b) >= 1:
        u = sps.mannwhitneyu(a, b, alternative="two-sided")
        out["U"], out["p_mwu"] = float(u.statistic), float(u.pvalue)
        out["rank_biserial"] = 2 * out["U"] / (len(a) * len(b)) - 1
    return out


# --------------------------------------------------------------------------------------------------
# Tables of the report
# --------------------------------------------------------------------------------------------------

def cell_stats(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell of :func:`selected_runs`: n, mean objective and its bootstrap CI, success rate."""
    rows = []
    for key, g in runs.groupby(CELL, sort=False):
        mean, low, high = bootstrap_ci(g.value.dropna())
        rows.append(dict(zip(CELL, key), n=int(g.value.notna().sum()), mean=mean, ci_low=low, ci_high=high,
                         solved=int(g.success.sum()), runs=len(g), success_rate=g.success.mean()))
    return pd.DataFrame(rows, columns=CELL + ["n", "mean", "ci_low", "ci_high", "solved", "runs", "success_rate"])


def summary(tables: Tables) -> pd.DataFrame:
    """One row per cell: search trials by state, best search objective (and its lr), the aggregated
    objective (mean [95% CI] over the policy's runs), success rate, baseline, solved threshold, cost."""
    results, direction = tables.results, tables.direction
    search = results[results.kind == "search"]
    out = search.pivot_table(index=CELL, columns="state", values="trial", aggfunc="count", fill_value=0,
                             sort=False)
    out.columns = [f"trials_{c.lower()}" for c in out.columns]
    done = search[search.state == "COMPLETE"]
    best = done.loc[done.groupby(CELL, sort=False).objective.idxmin() if direction == "minimize"
                    else done.groupby(CELL, sort=False).objective.idxmax()]
    out["best_search"] = best.set_index(CELL).objective
    if "param.lr" in best:
        out["best_lr"] = best.set_index(CELL)["param.lr"]
    out = out.join(cell_stats(selected_runs(results)).set_index(CELL), how="outer")
    firsts = results.groupby(CELL, sort=False)
    for col, name in (("metric.baseline", "baseline"), ("solved_threshold", "solved_threshold"),
                      ("solved_rule", "solved_rule")):
        if col in results:
            out[name] = firsts[col].first()
    if "param.n_params" in results:
        out["n_params"] = firsts["param.n_params"].median()
    if "metric.seconds_per_step" in results:
        out["seconds_per_step"] = firsts["metric.seconds_per_step"].median()
    return order_cells(out.reset_index(), tables)


def versus_reference(tables: Tables, reference: str) -> pd.DataFrame:
    """Every variant against ``reference`` in each (task, ladder value), Holm-corrected over all rows."""
    runs = selected_runs(tables.results)
    rows = []
    for (task, value), g in runs.groupby(["task", "ladder_value"], sort=False):
        ref = g[g.variant == reference]
        for variant, v in g[g.variant != reference].groupby("variant", sort=False):
            rows.append({"task": task, "ladder_value": value, "variant": variant, "reference": reference,
                         **compare(v.value.dropna(), ref.value.dropna()),
                         "success_rate": v.success.mean(), "success_rate_ref": ref.success.mean()})
    cols = ["task", "ladder_value", "variant", "reference", "n", "n_ref", "mean", "mean_ref", "diff", "t",
            "p_welch", "p_welch_holm", "U", "p_mwu", "p_mwu_holm", "hedges_g", "rank_biserial", "significant",
            "better", "success_rate", "success_rate_ref"]
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=cols)
    out["p_welch_holm"] = holm(out.p_welch)
    out["p_mwu_holm"] = holm(out.p_mwu)
    out["significant"] = (out.p_welch_holm < ALPHA) | (out.p_mwu_holm < ALPHA)
    sign = -1 if tables.direction == "minimize" else 1
    out["better"] = np.where(out["diff"].isna(), "", np.where(sign * out["diff"] > 0, "better", "worse"))
    return order_cells(out[cols], tables)


def order_cells(table: pd.DataFrame, tables: Tables) -> pd.DataFrame:
    """Rows in study order: tasks and variants as in the study file, ladder values ascending."""
    key = table.assign(_t=table.task.map({t: i for i, t in enumerate(tables.tasks)}),
                       _v=table.variant.map({v: i for i, v in enumerate(tables.variants)}))
    return key.sort_values(["_t", "ladder_value", "_v"], kind="stable").drop(columns=["_t", "_v"]).reset_index(drop=True)
