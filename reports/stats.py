"""What a report computes from the tidy table: the aggregation policy, per-cell summaries, and the
comparison of every variant against a reference variant.

The unit of comparison is a *run's final objective* (the study's objective metric on the held-out
eval set after training). Each cell (task settings x variant) contributes the replicate runs of its
best search trial: the same configuration retrained with fresh seeds, so the spread is seed noise,
not hyperparameter noise (Greff et al. 2017 compare variants the same way, with Welch's t-test, which
is this report's one test; the interval of a mean is Student's t, whose coverage is exact for normal
noise at the 3-5 runs a cell has).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats as sps

from reports.tables import Tables

LEVEL = 0.95
ALPHA = 0.05
CELL = ["task", "ladder_value", "variant"]
# A capacity ladder (model.hidden_size or model.param_budget a list in the study file: one cell per value)
# shows as the param its trial runs log; studies without one have neither column.
CAPACITY_PARAMS = ("param.model.hidden_size", "param.model.param_budget")


def with_capacity(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with ``capacity`` (the ladder's field: hidden_size or param_budget) and ``capacity_value``
    (the cell's value) where the study has a capacity ladder, as is otherwise. A run that logged no params (it
    failed before) takes its cell's value."""
    col = next((c for c in CAPACITY_PARAMS if c in results), None)
    if col is None or "capacity_value" in results:
        return results
    value = pd.to_numeric(results[col], errors="coerce").groupby(results.cell).transform("first")
    return results.assign(capacity=col.removeprefix("param.model."), capacity_value=value)


def cell_columns(table: pd.DataFrame) -> list[str]:
    """The columns that tell cells apart: task, ladder value, variant, and the capacity with a ladder of it."""
    return ["task", "ladder_value", "capacity_value", "variant"] if "capacity_value" in table else CELL


def policy(unit: str, objective_metric: str, direction: str) -> dict[str, str]:
    """The aggregation policy, in words, for the report page and the manifest."""
    units = {"replicate": "the replicate runs of each cell's current best search trial (its configuration "
                          "retrained with fresh seeds)",
             "search": "the COMPLETE search trials of each cell (the logs hold no replicate runs), so means, "
                       "intervals and tests span the searched configurations, not seeds"}
    return {
        "objective": f"final held-out eval value of the objective metric {objective_metric!r} of each run "
                     f"({direction})",
        "runs per cell": units[unit],
        "current best": f"the COMPLETE search trial with the best objective ({direction}); ties go to the lowest "
                        "slot, then trial number (tables saved without a slot column: the lowest trial number). A "
                        "replicate run counts only if its source_trial is the current best; "
                        "replicates of an earlier best (the study was extended and the best changed) stay in "
                        "results with superseded = True and are left out of summaries, statistics and figures",
        "centre and interval": f"mean and its {LEVEL:.0%} Student-t interval, mean ± t(0.975, n-1)·s/√n (s: the "
                               "sample standard deviation), always shown with n, the number of runs with a finite "
                               "objective; n = 1 has no interval. Not clipped to the metric's range (an accuracy's "
                               "can pass 0 or 1, a loss's 0); runs that all end equal give a zero-width interval",
        "held-out set": "one per task setting and study seed, drawn once: search trials are ranked and replicate "
                        "runs scored on the same set (the replicates are new trainings with new seeds, but the "
                        "configuration they retrain was chosen on it)",
        "success rate": "fraction of those runs whose final eval has solved = 1 (a failed run counts as not solved)",
        "primary test": "Welch's t-test (unequal variances), two-sided, of each variant against the reference per "
                        "task and ladder value; p-values Holm-corrected over all comparisons of the study; "
                        f"significant if the corrected p < {ALPHA}. It is the only test",
        "effect size": "Hedges' g of (variant - reference) with the pooled sd",
        "excluded": "interrupted runs (the engine replaces them), superseded replicate runs, and non-finite "
                    "objectives (from the mean; a failed run still counts in the success rate)",
        "trial counts": "search trials by how their MLflow runs ended: complete, pruned, fail, interrupted (a "
                        "trial interrupted before its run was created has no run: the command rnnbench status counts it "
                        "from the Optuna storage)",
    }


def unit_of(results: pd.DataFrame) -> str:
    """Which runs the statistics use: replicate runs if the study has any, else search trials."""
    return "replicate" if (results.kind == "replicate").any() else "search"


def best_search(results: pd.DataFrame, direction: str) -> pd.DataFrame:
    """Each cell's current best search trial (one row per cell): the COMPLETE search trial with the best
    finite objective in ``direction``; ties go to the lowest slot, then trial number, as the engine picks it
    (tables without a ``slot`` column: the lowest trial number)."""
    results = with_capacity(results)
    done = results[(results.kind == "search") & (results.state == "COMPLETE")]
    sign = 1 if direction == "minimize" else -1
    key = sign * pd.to_numeric(done.objective, errors="coerce")
    done = done.assign(_key=key)[np.isfinite(key)]
    order = ["_key", "slot", "trial"] if "slot" in done else ["_key", "trial"]
    return done.sort_values(order, kind="stable").drop_duplicates(cell_columns(done)).drop(columns="_key")


def superseded(results: pd.DataFrame, direction: str) -> pd.Series:
    """True for each replicate run whose ``source_trial`` is not its cell's current best search trial
    (:func:`best_search`); False for every other run."""
    results = with_capacity(results)
    cell = cell_columns(results)
    best = best_search(results, direction)[cell + ["trial"]].rename(columns={"trial": "_best"})
    rows = results[cell + ["kind", "source_trial"]].merge(best, on=cell, how="left")
    current = (rows.source_trial.astype("Float64") == rows._best).fillna(False).astype(bool)
    return pd.Series((rows.kind == "replicate").to_numpy() & ~current.to_numpy(), index=results.index)


def selected_runs(results: pd.DataFrame, unit: str | None = None) -> pd.DataFrame:
    """The runs the aggregation policy uses (see :func:`policy`), with ``value`` (finite objective or
    NaN) and ``success`` (0/1) columns: the ``unit``'s ("replicate" or "search"; default :func:`unit_of`,
    ``Tables.unit`` knows the study's plan). Tables saved before the ``superseded`` column existed have
    every replicate run counted."""
    results = with_capacity(results)
    unit = unit or unit_of(results)
    keep = (results.kind == unit) & (results.state != "INTERRUPTED")
    if "superseded" in results:
        keep &= ~results.superseded.astype(bool)
    if unit == "search":
        keep &= results.state == "COMPLETE"
    runs = results[keep].copy()
    obj = pd.to_numeric(runs.objective, errors="coerce")
    runs["value"] = obj.where(np.isfinite(obj))
    solved = pd.to_numeric(runs.get("metric.solved", pd.Series(np.nan, index=runs.index)), errors="coerce")
    runs["success"] = ((runs.state == "COMPLETE") & (solved == 1)).astype(float)
    return runs


# --------------------------------------------------------------------------------------------------
# Elementary statistics
# --------------------------------------------------------------------------------------------------

def mean_interval(values, level: float = LEVEL) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite ``values``: the Student-t interval of the mean,
    mean ± t_{(1+level)/2, n-1} · s / sqrt(n) with s the sample sd (ddof 1). Exact for normal noise at
    any n, which a percentile bootstrap of 3-5 runs is not (it covers 75-84%, see the tests).
    n = 1: (value, nan, nan, 1), one run has no interval; n = 0: all nan."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n < 2:
        return (float(x[0]) if n else math.nan, math.nan, math.nan, n)
    half = sps.t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half), n


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
    """Variant sample ``a`` against reference sample ``b``: Welch's t-test (two-sided) and Hedges' g.
    NaN where a test is undefined (fewer than 2 runs on a side, or no variance at all)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = {"n": len(a), "n_ref": len(b), "mean": a.mean() if len(a) else math.nan,
           "mean_ref": b.mean() if len(b) else math.nan, "t": math.nan, "df": math.nan, "p_welch": math.nan,
           "hedges_g": hedges_g(a, b)}
    out["diff"] = out["mean"] - out["mean_ref"]
    if len(a) >= 2 and len(b) >= 2 and (a.var() > 0 or b.var() > 0):
        with warnings.catch_warnings():  # runs alike to the last digits: scipy's note, not the report's business
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            t = sps.ttest_ind(a, b, equal_var=False)
        out["t"], out["df"], out["p_welch"] = float(t.statistic), float(t.df), float(t.pvalue)
    return out


# --------------------------------------------------------------------------------------------------
# Tables of the report
# --------------------------------------------------------------------------------------------------

def failed(runs: pd.DataFrame) -> int:
    """Runs of :func:`selected_runs` that ended without a finite objective (diverged or crashed): what n
    leaves out, not runs still going."""
    return int((runs.value.isna() & (runs.state != "RUNNING")).sum())


def cell_stats(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell of :func:`selected_runs`: n (runs with a finite objective), mean objective and its
    Student-t interval (:func:`mean_interval`), runs solved out of all runs, failed (:func:`failed`), success
    rate."""
    rows, cell = [], cell_columns(runs)
    for key, g in runs.groupby(cell, sort=False):
        mean, low, high, n = mean_interval(g.value.dropna())
        rows.append(dict(zip(cell, key), n=n, mean=mean, ci_low=low, ci_high=high, solved=int(g.success.sum()),
                         runs=len(g), failed=failed(g), success_rate=g.success.mean()))
    return pd.DataFrame(rows, columns=cell + ["n", "mean", "ci_low", "ci_high", "solved", "runs", "failed",
                                              "success_rate"])


def summary(tables: Tables) -> pd.DataFrame:
    """One row per cell: search trials by state, the current best search trial (number, objective, lr),
    replicate runs superseded, the aggregated objective (n, mean and its 95% t interval over the policy's
    runs), success rate, baseline, solved threshold, cost."""
    results = with_capacity(tables.results)
    cell = cell_columns(results)
    search = results[results.kind == "search"]
    out = search.pivot_table(index=cell, columns="state", values="trial", aggfunc="count", fill_value=0,
                             sort=False)
    ended = ["COMPLETE", "PRUNED", "FAIL", "INTERRUPTED"]  # always these, in this order; others (RUNNING) after
    out = out.reindex(columns=ended + [c for c in out.columns if c not in ended], fill_value=0)
    out.columns = [f"trials_{c.lower()}" for c in out.columns]
    best = best_search(results, tables.direction).set_index(cell)
    out["best_trial"], out["best_search"] = best.trial.astype("Int64"), best.objective
    if "param.lr" in best:
        out["best_lr"] = best["param.lr"]
    if "superseded" in results:  # ended runs of an earlier best, as `rnnbench status` counts them
        old = results.superseded.astype(bool) & ~results.state.isin(["INTERRUPTED", "RUNNING"])
        out["superseded"] = results[old].groupby(cell).size()
        out["superseded"] = out.superseded.fillna(0).astype(int)
    out = out.join(cell_stats(selected_runs(results, tables.unit)).set_index(cell), how="outer")
    counts = ["n", "solved", "runs", "failed"]
    out[counts] = out[counts].fillna(0).astype(int)  # a cell with no runs: 0
    firsts = results.groupby(cell, sort=False)
    for col, name in (("ladder", "ladder"), ("capacity", "capacity"), ("metric.baseline", "baseline"),
                      ("solved_threshold", "solved_threshold"), ("solved_rule", "solved_rule")):
        if col == "metric.baseline" and tables.objective_metric != "loss":
            continue  # the tasks' memoryless baseline is a loss: no yardstick for another objective
        if col in results:
            out[name] = firsts[col].first()
    if "param.n_params" in results:
        out["n_params"] = firsts["param.n_params"].median()
    if "metric.seconds_per_step" in results:
        out["seconds_per_step"] = firsts["metric.seconds_per_step"].median()
    out = out.reset_index()
    if "ladder" in out:
        out.insert(1, "ladder", out.pop("ladder"))
    if "capacity" in out:
        out.insert(out.columns.get_loc("capacity_value"), "capacity", out.pop("capacity"))
    return order_cells(out, tables)


def versus_reference(tables: Tables, reference: str) -> pd.DataFrame:
    """Every variant against ``reference`` in each (task, ladder value), and capacity with a ladder of it:
    Welch's t-test, Holm-corrected over all rows (the primary test, :func:`policy`), and Hedges' g, over the
    runs with a finite objective (n); ``failed``: the runs without one on each side, which the means and tests
    cannot see. A variant the logs hold with no run to aggregate (its search trials all failed) has its row,
    with n = 0."""
    results = with_capacity(tables.results)
    runs = selected_runs(results, tables.unit)
    group = cell_columns(results)[:-1]  # a cell's columns but the variant
    chosen = {key: g for key, g in runs.groupby(group + ["variant"], sort=False)}
    none = runs.iloc[:0]
    rows = []
    for key, g in results.groupby(group, sort=False):
        ref = chosen.get((*key, reference), none)
        for variant in dict.fromkeys(g.variant[g.variant != reference]):
            v = chosen.get((*key, variant), none)
            rows.append({**dict(zip(group, key)), "variant": variant, "reference": reference,
                         **compare(v.value.dropna(), ref.value.dropna()),
                         "failed": failed(v), "failed_ref": failed(ref),
                         "success_rate": v.success.mean(), "success_rate_ref": ref.success.mean()})
    cols = group + ["variant", "reference", "n", "n_ref", "failed", "failed_ref", "mean", "mean_ref", "diff", "t", "df",
                    "p_welch", "p_welch_holm", "significant", "better", "hedges_g", "success_rate", "success_rate_ref"]
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=cols)
    out["p_welch_holm"] = holm(out.p_welch)
    out["significant"] = out.p_welch_holm < ALPHA
    sign = -1 if tables.direction == "minimize" else 1
    ahead = sign * out["diff"]
    out["better"] = np.select([(out.n == 0) | (out.n_ref == 0), ahead > 0, ahead < 0],
                              ["not compared", "better", "worse"], "tie")
    return order_cells(out[cols], tables)


def order_cells(table: pd.DataFrame, tables: Tables) -> pd.DataFrame:
    """Rows in study order: tasks and variants as in the study file, ladder values (and capacities) ascending."""
    key = table.assign(_t=table.task.map({t: i for i, t in enumerate(tables.tasks)}),
                       _v=table.variant.map({v: i for i, v in enumerate(tables.variants)}))
    by = ["_t", "ladder_value"] + (["capacity_value"] if "capacity_value" in table else []) + ["_v"]
    return key.sort_values(by, kind="stable").drop(columns=["_t", "_v"]).reset_index(drop=True)
