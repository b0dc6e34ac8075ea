"""index.html: one self-describing page per study (at a glance, policy, summary, statistics, figures,
study file, manifest), linking its figures relatively so the folder can be zipped and sent as is."""

from __future__ import annotations

import html
import json

import numpy as np
import pandas as pd

from reports.figures import Figure

CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{padding:2px 7px;text-align:right;"
       "border-bottom:1px solid #ddd}th{background:#f3f3f3}tr.sig td{font-weight:bold}"
       "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:13px;color:#444;max-width:900px}"
       "pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}dt{font-weight:bold}dd{margin-bottom:.4em}"
       ".wide{overflow-x:auto}td{white-space:nowrap}")  # a wide table scrolls by itself, not the page


def _num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)) or x is pd.NA:
        return ""
    if isinstance(x, (float, np.floating)):
        return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.{digits}g}"  # 17473 parameters, not 1.747e+04
    return str(x)


def _table(df: pd.DataFrame, row_class=None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, (_, row) in enumerate(df.iterrows()):
        cls = f' class="{row_class[i]}"' if row_class is not None and row_class[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_num(v))}</td>" for v in row) + "</tr>")
    return f"<div class='wide'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def interval(mean, low, high, n, failed=0) -> str:
    """'0.12 [0.1, 0.14], n = 3': a mean, its 95% t interval and n, always together; and the runs left out
    for want of a finite objective, '..., n = 4 (+ 2 failed)'."""
    if n != n:
        return ""
    lost = f" (+ {int(failed)} failed)" if failed == failed and failed else ""
    if not n:
        return f"n = 0{lost}"
    if n == 1:
        return f"{_num(mean)} (n = 1, no interval){lost}"
    return f"{_num(mean)} [{_num(low)}, {_num(high)}], n = {int(n)}{lost}"


def _solved(k, runs) -> str:
    return f"{int(k)}/{int(runs)}" if runs == runs else ""


def glance_view(summ: pd.DataFrame, metric: str, direction: str) -> pd.DataFrame:
    """Per task and ladder value (and capacity, with a ladder of it), every variant best first (by mean, in the
    objective's direction): solved k/n and the mean with its interval and n. Task and setting are written
    once per group."""
    sign = 1 if direction == "minimize" else -1
    group = ["task", "ladder_value"] + (["capacity_value"] if "capacity_value" in summ else [])
    ranked = summ.assign(_group=summ.groupby(group, sort=False).ngroup(), _key=sign * summ["mean"])
    ranked = ranked.sort_values(["_group", "_key"], kind="stable", na_position="last")
    first = ~ranked._group.duplicated()
    setting = [f"{ladder} = {value}" for ladder, value in zip(ranked.ladder, ranked.ladder_value)]
    if "capacity_value" in summ:
        setting = [f"{s}, {field} = {_num(value)}" for s, field, value in zip(setting, ranked.capacity,
                                                                               ranked.capacity_value)]
    return pd.DataFrame({
        "task": ranked.task.where(first, ""),
        "setting": pd.Series(setting, index=ranked.index).where(first, ""),
        "variant": ranked.variant,
        "solved": [_solved(k, r) for k, r in zip(ranked.solved, ranked.runs)],
        f"mean {metric} [95% t interval], n": [interval(*r) for r in zip(ranked["mean"], ranked.ci_low,
                                                                        ranked.ci_high, ranked.n, ranked.failed)]})


def summary_view(summ: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The summary as people read it: mean [interval] with n, successes k/n, trial counts."""
    view = summ[["task", "ladder_value", "variant"]].copy()
    if "capacity_value" in summ:  # a capacity ladder: the cell's hidden_size or param_budget
        view.insert(2, summ.capacity.dropna().iloc[0], summ.capacity_value.astype("Int64"))
    for col in [c for c in summ.columns if c.startswith("trials_")]:
        view[col.removeprefix("trials_") + " trials"] = summ[col].fillna(0).astype(int)
    view["best trial"] = summ.best_trial.astype("Int64")
    view["best search " + metric] = summ.best_search
    if "best_lr" in summ:
        view["best lr"] = summ.best_lr
    if "superseded" in summ and summ.superseded.any():
        view["superseded replicates"] = summ.superseded
    view[f"mean {metric} [95% t interval], n"] = [interval(*r) for r in zip(summ["mean"], summ.ci_low,
                                                                           summ.ci_high, summ.n, summ.failed)]
    view["solved"] = [_solved(k, r) for k, r in zip(summ.solved, summ.runs)]
    for col, name in (("baseline", "baseline"), ("solved_threshold", "solved threshold"),
                      ("n_params", "parameters"), ("seconds_per_step", "s/step")):
        if col in summ:
            view[name] = summ[col]
    return view


STATE_WORDS = {"fail": "failed"}  # the summary's trials_<state> columns, said in a sentence


def _unfinished(summ: pd.DataFrame, idle: list[str], unit: str, planned: int | None) -> str:
    """What an unfinished study still lacks, in words ("" when nothing): cells no trial of which has started,
    cells with a search trial running, and cells with a best search trial but fewer replicate runs ended than
    the ``planned`` ones (without the plan, recorded since this report existed: none ended)."""
    said = []
    if idle:
        said.append(f"{len(idle)} cell{'s' if len(idle) > 1 else ''} with no run yet ({', '.join(idle[:4])}"
                    f"{', ...' if len(idle) > 4 else ''})")
    if not summ.empty and "runs" in summ:
        pending = summ.get("trials_running", pd.Series(0, index=summ.index)).fillna(0) > 0
        if unit == "replicate":
            pending |= summ.best_trial.notna() & (summ.runs < planned if planned else summ.runs == 0)
        if pending.any():
            said.append(f"{int(pending.sum())} of {len(summ)} cells still searching or awaiting replicate runs "
                        "(their n is what has ended so far)")
    return "; ".join(said)


def _without_best(summ: pd.DataFrame) -> list[tuple[str, str]]:
    """(cell, its search trials by state) for each cell whose search trials have all ended and none is a best one."""
    states = [c for c in summ.columns if c.startswith("trials_")]
    if summ.empty or "best_trial" not in summ or not states:
        return []
    ended = summ.get("trials_running", pd.Series(0, index=summ.index)).fillna(0) == 0
    out = []
    for _, row in summ[summ.best_trial.isna() & ended].iterrows():
        counts = {STATE_WORDS.get(c.removeprefix("trials_"), c.removeprefix("trials_")): int(row[c])
                  for c in states if row[c] == row[c] and row[c]}
        if counts:
            setting = f"{row.ladder} = {row.ladder_value}" if "ladder" in row else str(row.ladder_value)
            out.append((f"{row.task} ({setting}) / {row.variant}",
                        f"{sum(counts.values())} search trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())))
    return out


def stats_view(vs: pd.DataFrame) -> pd.DataFrame:
    size = {"capacity_value": "capacity"} if "capacity_value" in vs else {}
    cols = {"task": "task", "ladder_value": "ladder_value", **size, "variant": "variant", "n": "n", "n_ref": "n ref",
            "failed": "failed", "failed_ref": "failed ref", "mean": "mean", "mean_ref": "mean ref", "diff": "diff",
            "better": "means", "t": "Welch t", "df": "df",
            "p_welch": "p Welch", "p_welch_holm": "p Welch (Holm)", "hedges_g": "Hedges g",
            "success_rate": "success", "success_rate_ref": "success ref"}
    view = vs[list(cols)].rename(columns=cols)
    view.insert(3 + len(size), "sig.", ["*" if s else "" for s in vs.significant])
    return view


def page(study: str, study_file: str, summ: pd.DataFrame, vs: pd.DataFrame, reference: str,
         figures: dict[str, list[tuple[str, Figure | str]]], manifest: dict, metric: str, direction: str,
         files: list[str], unit: str = "replicate") -> str:
    e = html.escape
    parts = [f"<h1>rnnbench report: {e(study)}</h1>",
             "<p>Contents: <a href='#glance'>at a glance</a> · <a href='#policy'>aggregation policy</a> · "
             "<a href='#summary'>summary</a> · <a href='#stats'>statistics</a> · <a href='#figures'>figures</a> · "
             "<a href='#study'>study file</a> · <a href='#manifest'>manifest</a></p>",
             "<h2 id='glance'>At a glance</h2>"]
    if summ.empty:
        parts.append("<p>No trial has run yet.</p>")
    else:
        parts += [f"<p>Per task and setting, every variant best first by mean final {e(metric)} ({e(direction)}); "
                  "solved: runs that met the task's solved criterion, of all runs; the mean's 95% Student-t "
                  "interval and n, the runs it is computed from; '+ k failed': runs without a finite objective "
                  "(diverged or crashed), which the mean cannot include: a variant that lost runs is ranked on the "
                  "ones that survived (without replicate runs, the runs are complete search trials: the summary's "
                  "fail trials column counts the failed ones).</p>", _table(glance_view(summ, metric, direction))]
        if unit == "search":
            parts.append("<p><b>This study has no replicate runs: each cell's runs are its complete search trials, "
                         "so the means, intervals and tests below span the searched configurations, not seeds."
                         "</b> Set <code>replicates</code> to retrain each cell's best configuration with new "
                         "seeds.</p>")
    collection = manifest["collection"]
    waiting = _unfinished(summ, collection.get("cells_without_runs", []), unit, collection.get("replicates"))
    if waiting:
        parts.append("<p><b>The study is unfinished</b> (<code>rnnbench run</code> resumes it; "
                     "<code>rnnbench status</code> shows where it is): " + e(waiting) + ".</p>")
    superseded = int(summ.superseded.sum()) if "superseded" in summ else 0
    if superseded:
        parts.append(f"<p><b>{superseded} replicate run{'s' if superseded > 1 else ''} superseded</b>: retrained "
                     "from a search trial that is no longer its cell's best (the study was extended and found a "
                     "better one), kept in results.csv with superseded = True and left out of every summary, "
                     "statistic and figure; the summary counts them per cell.</p>")
    policy = manifest["report"]["aggregation"]
    parts += ["<h2 id='policy'>Aggregation policy</h2><dl>"]
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in policy.items()]
    parts += ["</dl>", "<h2 id='summary'>Summary per cell</h2>"]
    if summ.empty:
        parts.append("<p>No trial has run yet.</p>")
    else:
        parts.append(_table(summary_view(summ, metric)))
    unsearched = _without_best(summ)
    if unsearched:
        parts.append("<p><b>No complete search trial</b>, so no configuration to replicate and no runs to aggregate "
                     "(solved 0/0, n = 0; the statistics list them as not compared):</p><ul>"
                     + "".join(f"<li>{e(cell)}: {e(trials)}</li>" for cell, trials in unsearched) + "</ul>")
    stopped = manifest["collection"].get("stopped_cells", {})
    if stopped:
        parts.append("<p><b>Stopped cells</b> (their first search trials all failed with the same error; they ran "
                     "no more trials, and their queued ones were closed as interrupted; fix the cause, then "
                     "<code>rnnbench run STUDY --retry-stopped</code>):</p><ul>"
                     + "".join(f"<li>{e(cell)}: {e(why)}</li>" for cell, why in stopped.items()) + "</ul>")
    parts += [f"<h2 id='stats'>Each variant against the reference ({e(reference)})</h2>",
              "<p>Bold and * : significant by the primary test, Welch's t-test, after Holm correction over "
              "every comparison of the study (the only test). diff = mean(variant) − "
              f"mean({e(reference)}); 'better'/'worse' compare the means in the objective's direction ('tie': "
              "equal), tested or not: with fewer than 2 runs on a side, or no variance at all, there is no test "
              "(p blank); 'not compared': a side has no run with a finite objective. n: the runs with a finite "
              "objective; failed: the runs without one, which the means and tests leave out (read a 'better' "
              "with its failed count).</p>"]
    if len(vs) and not (vs.n_ref > 0).any():
        with_runs = list(dict.fromkeys(summ.variant[summ.n > 0])) if "n" in summ else []
        parts.append(f"<p><b>The reference variant {e(reference)} has no run with a finite objective, so nothing "
                     "is compared.</b> <code>rnnbench report --reference VARIANT</code> compares with another"
                     + (f" (with runs: {e(', '.join(with_runs))})" if with_runs else "") + ".</p>")
    parts.append(_table(stats_view(vs), ["sig" if s else "" for s in vs.significant]) if len(vs)
                 else "<p>No comparison: a single variant, or no aggregated runs.</p>")
    parts.append("<h2 id='figures'>Figures</h2>")
    for task, items in figures.items():
        parts.append(f"<h3>{e(task)}</h3>")
        for kind, fig in items:
            if isinstance(fig, Figure):
                parts.append(f'<figure id="{e(fig.stem)}"><img src="figures/{e(fig.stem)}.png" alt="{e(fig.title)}">'
                             f"<figcaption><b>{e(fig.title)}.</b> {e(fig.caption)} "
                             f'(<a href="figures/{e(fig.stem)}.svg">SVG</a>)</figcaption></figure>')
            else:
                parts.append(f"<p><i>No {e(kind.replace('_', ' '))} figure: {e(fig)}.</i></p>")
    parts += ["<h2 id='study'>Study file</h2>", f"<pre>{e(study_file or '(not recorded)')}</pre>",
              "<h2 id='manifest'>Manifest</h2>",
              "<p>Data: " + " · ".join(f'<a href="{e(f)}">{e(f)}</a>' for f in files) + "</p>"]
    shown = json.loads(json.dumps(manifest))
    shown["collection"].pop("study_file", None)
    ids = shown["collection"].pop("mlflow_run_ids", [])
    shown["collection"]["mlflow_run_ids"] = f"{len(ids)} runs (listed in manifest.json)"
    parts.append(f"<pre>{e(json.dumps(shown, indent=1, sort_keys=True))}</pre>")
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>rnnbench: {e(study)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
