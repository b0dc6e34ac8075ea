"""A study's report: tidy table, one figure per task, an HTML page. Regenerable from the table alone."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PNG_META = {"Software": None}  # no version string: identical bytes across regenerations


def figure_objective(table: pd.DataFrame, task: str, path: Path) -> str:
    """Objective of every ended trial per variant, one panel per ladder value, memoryless baseline dashed."""
    data = table[(table.task == task) & table.objective.notna()]
    ladder = data.ladder.iloc[0]
    values = sorted(data.ladder_value.unique())
    fig, axes = plt.subplots(1, len(values), figsize=(3.2 * len(values) + 1, 3.4), squeeze=False, sharey=True)
    order = list(dict.fromkeys(data.variant))
    for ax, value in zip(axes[0], values):
        panel = data[data.ladder_value == value]
        sns.stripplot(panel, x="variant", y="objective", hue="kind", order=order, hue_order=["search", "replicate"],
                      ax=ax, jitter=0.15, size=5, legend=ax is axes[0][-1])
        if "metric.baseline" in panel and panel["metric.baseline"].notna().any():
            ax.axhline(panel["metric.baseline"].iloc[0], ls="--", c="0.3", lw=1, label="memoryless baseline")
        ax.set_title(f"{ladder} = {value}")
        ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{task}: objective per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)
    return (f"{task}: final objective of every ended search trial (and replicate run) of each variant, "
            f"one panel per {ladder}; log scale; dashed: the loss of the best memoryless predictor.")


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per cell: trials by state, best objective, and mean ± sd over the replicate runs."""
    keys = ["task", "ladder_value", "variant"]
    search = table[table.kind == "search"]
    out = search.pivot_table(index=keys, columns="state", values="trial", aggfunc="count", fill_value=0)
    out["best"] = search.groupby(keys).objective.min()
    rep = table[(table.kind == "replicate") & table.objective.notna()].groupby(keys).objective
    out["replicates"] = rep.count()
    out["replicate_mean"] = rep.mean()
    out["replicate_sd"] = rep.std()
    if "metric.baseline" in table:
        out["baseline"] = table.groupby(keys)["metric.baseline"].first()
    return out.reset_index()


def build_report(table: pd.DataFrame, out: Path, study_text: str = "") -> Path:
    """Write results.csv, figures/ and index.html into ``out``; returns the index path."""
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    study = table.study.iloc[0] if len(table) else out.name
    parts = [f"<h1>rnnbench report: {html.escape(study)}</h1>"]
    if len(table):
        summ = summary(table)
        summ.to_csv(out / "summary.csv", index=False)
        parts += ["<h2>Summary</h2>", summ.to_html(index=False, float_format="%.4g", border=0)]
        parts.append("<h2>Figures</h2>")
        for task in dict.fromkeys(table.task):
            name = f"objective_{task}.png"
            caption = figure_objective(table, task, figures / name)
            parts.append(f'<figure><img src="figures/{name}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    else:
        parts.append("<p>No trial has run yet.</p>")
    if study_text:
        parts += ["<h2>Study file</h2>", f"<pre>{html.escape(study_text)}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>rnnbench: "
            f"{html.escape(study)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
            "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:right}"
            "img{max-width:100%}figcaption{font-size:13px;color:#444}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    index = out / "index.html"
    index.write_text(page)
    return index
