"""The report's figures, one function each, drawn from the saved tables only (seaborn classic API).

Every function returns a :class:`Figure` (file stem + a caption saying exactly what is plotted) or,
when the data have nothing to show, one sentence saying why (the page prints it instead). Where a
point, bar or line aggregates runs, the figure says how many (``n = ...``). Files are PNG (for
the page) and SVG (for papers), written with fixed metadata so regenerations are byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reports.stats import selected_runs, with_capacity  # noqa: E402
from reports.tables import Tables  # noqa: E402

FORMATS = ("png", "svg")
# No version strings or dates in the files, fixed SVG ids: the same tables give the same bytes.
METADATA = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}
RC = {"svg.hashsalt": "rnnbench", "svg.fonttype": "path", "savefig.dpi": 150, "figure.dpi": 100}
BASELINE = dict(ls="--", c="0.35", lw=1.2)
THRESHOLD = dict(ls=":", c="tab:red", lw=1.4)


@dataclass(frozen=True)
class Figure:
    stem: str  # figures/<stem>.png and .svg
    title: str
    caption: str


def span(counts) -> str:
    """'5' or '3-5': how many runs each group of a figure has."""
    lo, hi = int(counts.min()), int(counts.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def log_ticks(ax, values) -> None:
    """Readable ticks on a log x axis: 1-2-5 steps within two decades, decades beyond (matplotlib's own
    steps within less than a decade), short labels (2.5e-3), rotated, and no labels on minor ticks
    (matplotlib labels them on short ranges, overlapping)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if hi / lo <= 100 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short_float(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelrotation=45)


def short_float(v: float) -> str:
    """2.5e-3, 1e-2, 9e-3: two significant digits at most, no trailing zeros."""
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def variant_colours(names: list[str]) -> dict[str, tuple]:
    """One colour per variant, all distinct: the colour-blind palette up to its 10 colours, tab20 up to 20."""
    n = max(len(names), 1)
    palette = "colorblind" if n <= 10 else "tab20" if n <= 20 else "husl"
    return dict(zip(names, sns.color_palette(palette, n)))


def count_ticks(ax, values) -> None:
    """Readable ticks on a log x axis of counts: 1-2-5 steps, labels 500, 2k, 1.5M; the data's ends when
    they span too little for two such ticks."""
    lo, hi = float(np.min(values)), float(np.max(values))
    steps = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in steps if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(inside if len(inside) >= 2 else sorted({lo, hi})))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: count_label(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def count_label(v: float) -> str:
    """500, 2k, 12.5k, 1.5M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def capacity_label(variant: str, field: str, value) -> str:
    """A variant at one value of a capacity ladder, as run names write it: ``lstm h=64``, ``lstm 5000 params``."""
    return f"{variant} h={int(value)}" if field == "hidden_size" else f"{variant} {int(value)} params"


@contextmanager
def style():
    """seaborn's paper style plus the fixed settings above; numpy's global random state (which
    :func:`draw_all` seeds per figure) is restored afterwards."""
    state = np.random.get_state()
    try:
        with plt.rc_context():
            sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
            plt.rcParams.update(RC)
            yield
    finally:
        np.random.set_state(state)


def save(fig, folder: Path, stem: str) -> None:
    fig.tight_layout()
    # the tight bbox holds what it always would (titles, labels) and the legends kept out of the layout
    shown = fig.get_default_bbox_extra_artists() + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for fmt in FORMATS:
        fig.savefig(folder / f"{stem}.{fmt}", format=fmt, metadata=METADATA[fmt], bbox_inches="tight",
                    bbox_extra_artists=shown)
    plt.close(fig)


class Painter:
    """Holds what every figure of one report shares: the tables, the runs the aggregation policy
    selects, the colour of each variant, the metric names."""

    def __init__(self, tables: Tables, cells: pd.DataFrame, folder: Path):
        self.t, self.cells, self.folder = tables, cells, folder
        self.unit = tables.unit
        self.runs = selected_runs(tables.results, self.unit) if len(tables.results) else tables.results
        self.order = tables.variants
        self.metric = tables.objective_metric
        self.minimize = tables.direction == "minimize"
        # With a capacity ladder the capacity figure draws each variant across its values; every other figure
        # draws each (variant, capacity value) as a variant of its own, "lstm h=64".
        self.variant_runs, self.variant_cells, self.variant_order = self.runs, self.cells, self.order
        self.capacity_field = None
        if "capacity_value" in with_capacity(tables.results):
            self.capacity_field = with_capacity(tables.results).capacity.iloc[0]
            self._split_capacities()
        self.palette, self.variant_palette = variant_colours(self.order), variant_colours(self.variant_order)

    def _split_capacities(self) -> None:
        """Relabel every table the per-variant figures read: variant -> ``lstm h=64`` (its capacity value)."""
        results = with_capacity(self.t.results)
        label = {cell: capacity_label(v, self.capacity_field, x)
                 for cell, v, x in zip(results.cell, results.variant, results.capacity_value)}
        values = sorted(results.capacity_value.dropna().unique())
        self.order = [capacity_label(v, self.capacity_field, x) for v in self.order for x in values
                      if capacity_label(v, self.capacity_field, x) in label.values()]
        importance = self.t.importance.assign(variant=self.t.importance.cell.map(label))
        self.t = dataclasses.replace(self.t, results=results.assign(variant=results.cell.map(label)),
                                     importance=importance)
        self.runs = self.runs.assign(variant=self.runs.cell.map(label))
        self.cells = self.cells.assign(variant=[capacity_label(v, self.capacity_field, x) for v, x in
                                                zip(self.cells.variant, self.cells.capacity_value)])

    # --- helpers -------------------------------------------------------------------------------
    def panels(self, n: int, width: float = 3.4, height: float = 3.2, sharey=True):
        fig, axes = plt.subplots(1, n, figsize=(width * n + 0.6, height), squeeze=False, sharey=sharey)
        return fig, list(axes[0])

    def outside_legend(self, ax) -> None:
        """The legend to the right of ``ax``, outside the layout: the saved image grows to hold it (``save``'s
        tight bbox) rather than the panels shrinking to make room."""
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title_fontsize=8, frameon=False)
            ax.get_legend().set_in_layout(False)

    def finish(self, fig, axes, name: str, title: str, values=None, task: str | None = None) -> None:
        """Legend beside the last panel, log y when ``values`` call for it (:meth:`logy`), title, save."""
        self.outside_legend(axes[-1])
        if values is not None and self.logy(values, task):
            axes[0].set_yscale("log")
        fig.suptitle(title)
        save(fig, self.folder, name)

    def values(self, task: str) -> list:
        return sorted(self.t.results.loc[self.t.results.task == task, "ladder_value"].unique())

    def ladder(self, task: str) -> str:
        return self.t.results.loc[self.t.results.task == task, "ladder"].iloc[0]

    def logy(self, values, task: str | None = None) -> bool:
        """Log y for a minimised objective spanning more than a decade, the task's baseline and solved
        threshold included (they must stay visible)."""
        v = pd.to_numeric(pd.Series(list(values)), errors="coerce")
        if task is not None:
            rows = self.t.results[self.t.results.task == task]
            for col in ("metric.baseline", "solved_threshold"):
                if col in rows and (col != "metric.baseline" or self.metric == "loss"):
                    v = pd.concat([v, pd.to_numeric(rows[col], errors="coerce")])
        v = v.dropna()
        return self.minimize and len(v) > 0 and (v > 0).all() and v.max() / v.min() > 10

    def references(self, ax, task: str, value=None, baseline=True) -> list[str]:
        """Draw the memoryless baseline (when the objective is the loss it is defined on) and the
        solved threshold of one cell row; return which were drawn."""
        rows = self.t.results[(self.t.results.task == task)]
        if value is not None:
            rows = rows[rows.ladder_value == value]
        drawn = []
        if baseline and self.metric == "loss" and "metric.baseline" in rows and rows["metric.baseline"].notna().any():
            ax.axhline(rows["metric.baseline"].dropna().iloc[0], **BASELINE, label="memoryless baseline")
            drawn.append("baseline")
        if "solved_threshold" in rows and pd.to_numeric(rows.solved_threshold, errors="coerce").notna().any():
            ax.axhline(pd.to_numeric(rows.solved_threshold).dropna().iloc[0], **THRESHOLD, label="solved threshold")
            drawn.append("threshold")
        return drawn

    def reference_words(self, drawn: set[str]) -> str:
        words = []
        if "baseline" in drawn:
            words.append("dashed grey: the memoryless baseline (the loss of the best predictor that ignores "
                         "the sequence's history)")
        if "threshold" in drawn:
            op = "below" if self.minimize else "at or above"
            words.append(f"dotted red: the solved threshold (the task counts as solved with {self.metric} {op} it)")
        if not drawn & {"threshold"}:
            words.append(f"no solved threshold drawn: the task's solved criterion is not on {self.metric} "
                         "(success rates use the logged `solved` metric)")
        return "; ".join(words) + "."

    def label_n(self, ax, counts: pd.Series) -> None:
        """Write each variant's number of runs into its legend entry, 'lstm (n = 3)'; ``counts``: runs
        per (ladder_value, variant)."""
        per_variant = counts.groupby(level="variant").agg(span)
        if ax.get_legend() is not None:
            for text in ax.get_legend().get_texts():
                if text.get_text() in per_variant:
                    text.set_text(f"{text.get_text()} (n = {per_variant[text.get_text()]})")

    def present(self, data: pd.DataFrame) -> list[str]:
        """The variants ``data`` has rows of, in study order: a legend lists no variant the figure cannot show."""
        drawn = set(data.variant)
        return [v for v in self.order if v in drawn]

    @staticmethod
    def no_runs(ax, panel: pd.DataFrame) -> bool:
        """Say so on a panel with nothing to draw (a ladder value none of whose runs has got this far yet, or
        ever: they failed first)."""
        if panel.empty:
            ax.text(0.5, 0.5, "no run to draw", transform=ax.transAxes, ha="center", va="center", color="0.4")
        return panel.empty

    @staticmethod
    def gather_legend(axes) -> None:
        """One legend, on the last panel: the last drawn panel's (each drawn panel made one; an empty one none)."""
        legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
        for old in legends[:-1]:
            old.remove()
        if legends and legends[-1].axes is not axes[-1]:
            old = legends[-1]
            axes[-1].legend(old.legend_handles, [t.get_text() for t in old.get_texts()],
                            title=old.get_title().get_text() or None)
            old.remove()

    def runs_word(self) -> str:
        return "replicate runs (seeds)" if self.unit == "replicate" else "complete search trials"

    # --- 1. objective per variant ------------------------------------------------------------------
    def objective(self, task: str) -> Figure | str:
        data = self.runs[(self.runs.task == task) & self.runs.value.notna()]
        if data.empty:
            return "no run has a finite objective"
        values, ladder = self.values(task), self.ladder(task)
        fig, axes = self.panels(len(values), width=max(3.4, 0.36 * len(self.order) + 1.0))  # room for the labels
        drawn: set[str] = set()
        for ax, value in zip(axes, values):
            panel = data[data.ladder_value == value]
            sns.stripplot(panel, x="variant", y="value", hue="variant", order=self.order, hue_order=self.order,
                          palette=self.palette, ax=ax, jitter=0.12, size=5, alpha=0.75, legend=False)
            stats = self.cells[(self.cells.task == task) & (self.cells.ladder_value == value)].set_index("variant")
            labels = []
            for x, v in enumerate(self.order):
                n, failed = (int(stats.loc[v, k]) if v in stats.index else 0 for k in ("n", "failed"))
                labels.append(f"{v} (n = {n}" + (f" + {failed} failed" if failed else "") + ")")
                if n:
                    s = stats.loc[v]
                    bar = [[s["mean"] - s.ci_low], [s.ci_high - s["mean"]]] if n > 1 else None
                    ax.errorbar(x + 0.3, s["mean"], yerr=bar, fmt="D", c="k", ms=4, capsize=3, lw=1.2)
            drawn |= set(self.references(ax, task, value))
            ax.set(title=f"{ladder} = {value}", xlabel="", ylabel=f"final {self.metric}")
            ax.set_xticks(range(len(self.order)), labels, rotation=45, ha="right", rotation_mode="anchor")
        if drawn:
            axes[-1].legend()
        self.finish(fig, axes, f"objective_{task}", f"{task}: final {self.metric} per variant", data.value, task)
        n = data.groupby(["ladder_value", "variant"]).size()
        return Figure(f"objective_{task}", f"{task}: objective per variant", (
            f"{task}: the final held-out {self.metric} of the {self.runs_word()} (coloured dots, one per run; "
            f"n = {span(n)} per variant and {ladder}, written under each variant with the runs that ended without "
            f"a finite {self.metric}, '+ k failed', which no dot or mean can show) and their mean with its 95% "
            f"Student-t interval (black diamond and bar; no bar where n = 1), per variant; one panel per {ladder}"
            + ("; log y (an interval whose lower end is at or below 0 runs off the bottom)"
               if axes[0].get_yscale() == "log" else "") + ". " + self.reference_words(drawn)))

    # --- 2. difficulty curves ------------------------------------------------------------------------
    def difficulty(self, task: str) -> Figure | str:
        cells = self.cells[self.cells.task == task]
        if cells.empty:
            return "no aggregated cell"
        ladder = self.ladder(task)
        if cells.ladder_value.nunique() == 1:
            return (f"the study has a single {ladder} for {task} ({cells.ladder_value.iloc[0]}), so there is no "
                    "difficulty curve; the summary and the objective figure show that one value")
        n = cells.set_index(["ladder_value", "variant"]).n
        fig, (left, right) = self.panels(2, width=4.2, sharey=False)
        # rates coincide often (0 or 1 for every variant): a marker and dash pattern of each variant's own keep a
        # line drawn under another visible
        present = self.present(cells)
        sns.lineplot(cells, x="ladder_value", y="success_rate", hue="variant", hue_order=present, style="variant",
                     style_order=present, markers=True, dashes=True, palette=self.palette, ax=left, errorbar=None,
                     legend=False, markersize=7, alpha=0.85)
        left.set(ylim=(-0.05, 1.05), xlabel=ladder, ylabel="success rate (fraction of seeds solved)")
        for v in self.order:
            g = cells[cells.variant == v]
            if g.empty:
                continue
            right.errorbar(g.ladder_value, g["mean"], yerr=[g["mean"] - g.ci_low, g.ci_high - g["mean"]],
                           marker="o", capsize=3, c=self.palette.get(v), label=v)  # n = 1: a point, no bar
        per_value = self.t.results[self.t.results.task == task].groupby("ladder_value")
        drawn = ""
        if self.metric == "loss" and "metric.baseline" in self.t.results:
            base = per_value["metric.baseline"].first().dropna()
            right.plot(base.index, base.values, **BASELINE, marker="x", label="memoryless baseline")
            drawn += " Dashed grey with crosses: the memoryless baseline at each value."
        thresholds = pd.to_numeric(per_value.solved_threshold.first(), errors="coerce").dropna()
        if len(thresholds):
            right.plot(thresholds.index, thresholds.values, **THRESHOLD, marker="+", label="solved threshold")
            drawn += " Dotted red with pluses: the solved threshold at each value."
        logged = self.t.results[self.t.results.task == task]
        absent = {}  # variant -> the values where it has no run to aggregate (no complete search trial)
        for v, x in sorted(set(zip(logged.variant, logged.ladder_value)) - set(zip(cells.variant, cells.ladder_value)),
                           key=lambda vx: (self.order.index(vx[0]) if vx[0] in self.order else len(self.order), vx[1])):
            absent.setdefault(v, []).append(f"{x:g}" if isinstance(x, float) else str(x))
        if absent:
            drawn += (" Not drawn, with no run to aggregate (no complete search trial): "
                      + "; ".join(f"{v} at {ladder} = {', '.join(xs)}" for v, xs in absent.items()) + ".")
        right.set(xlabel=ladder, ylabel=f"final {self.metric}")
        if self.logy(cells["mean"], task):
            right.set_yscale("log")
        right.legend()
        self.label_n(right, n)
        self.outside_legend(right)
        for ax in (left, right):
            ax.set_xticks(sorted(cells.ladder_value.unique()))
        fig.suptitle(f"{task}: difficulty against {ladder}")
        save(fig, self.folder, f"difficulty_{task}")
        return Figure(f"difficulty_{task}", f"{task}: where each variant stops coping", (
            f"{task}, against {ladder}: left, the success rate per variant (the fraction of its "
            f"{self.runs_word()} whose final eval met the task's solved criterion; each variant has a marker and "
            f"dash pattern of its own, so lines that coincide stay visible, and its colour as on the right); right, "
            f"the mean final "
            f"{self.metric} with its 95% Student-t interval. n in the legend: runs with a finite {self.metric} per "
            f"point ({span(n)}; a failed run also counts, as not solved, in the success rate)." + drawn))

    # --- 2b. capacity ------------------------------------------------------------------------------
    def capacity(self, task: str) -> Figure | str:
        """Collins et al. 2017's view: the objective against the parameter count, one line per variant."""
        if self.capacity_field is None:
            return ("the study has a single model size (model.hidden_size and model.param_budget are not ladders), "
                    "so there is no capacity curve; the cost figure shows each run's parameter count")
        runs = self.variant_runs[(self.variant_runs.task == task) & self.variant_runs.value.notna()].copy()
        cells = self.variant_cells[self.variant_cells.task == task]
        if runs.empty or "param.n_params" not in runs:
            return "no run has both a finite objective and a parameter count"
        field = f"model.{self.capacity_field}"
        if cells.capacity_value.nunique() == 1:
            return (f"the study has a single {field} ({int(cells.capacity_value.iloc[0])}), so there is no "
                    "capacity curve; the summary and the objective figure show that one value")
        runs["parameters"] = pd.to_numeric(runs["param.n_params"], errors="coerce")
        keys = ["ladder_value", "capacity_value", "variant"]
        cells = cells.merge(runs.groupby(keys, as_index=False).parameters.median(), on=keys)
        values, ladder = self.values(task), self.ladder(task)
        fig, axes = self.panels(len(values), width=3.8)
        drawn: set[str] = set()
        for ax, value in zip(axes, values):
            panel, dots = cells[cells.ladder_value == value], runs[runs.ladder_value == value]
            for v in self.variant_order:
                g = panel[panel.variant == v].sort_values("parameters")
                if g.empty:
                    continue
                colour = self.variant_palette[v]
                d = dots[dots.variant == v]
                ax.scatter(d.parameters, d.value, s=12, alpha=0.45, color=colour, lw=0)
                bar = [(g["mean"] - g.ci_low).fillna(0), (g.ci_high - g["mean"]).fillna(0)]  # n = 1: no bar
                ax.errorbar(g.parameters, g["mean"], yerr=bar, marker="o", ms=4, capsize=3, lw=1.4, color=colour,
                            label=v)
            drawn |= set(self.references(ax, task, value))
            ax.set_xscale("log")
            count_ticks(ax, cells.parameters)
            ax.set(title=f"{ladder} = {value}", xlabel="trainable parameters (log)", ylabel=f"final {self.metric}")
        axes[-1].legend()
        n = cells.set_index(["ladder_value", "variant"]).n
        self.label_n(axes[-1], n)
        self.finish(fig, axes, f"capacity_{task}", f"{task}: {self.metric} against parameter count",
                    pd.concat([runs.value, cells["mean"]]), task)
        sizes = ", ".join(str(int(x)) for x in sorted(cells.capacity_value.unique()))
        return Figure(f"capacity_{task}", f"{task}: result against capacity", (
            f"{task}: final held-out {self.metric} against the model's number of trainable parameters (log x; "
            f"embedding, cell and read-out head), as Collins et al. 2017 compare cells; one line per variant through "
            f"its cells at {field} = {sizes}: the mean of the {self.runs_word()} with its 95% Student-t interval "
            f"(bar; none where n = 1; n in the legend, {span(n)} per point), dots: single runs; one panel per "
            f"{ladder}{'; log y' if axes[0].get_yscale() == 'log' else ''}. " + self.reference_words(drawn)))

    # --- 3. learning curves --------------------------------------------------------------------------
    def learning(self, task: str) -> Figure | str:
        runs = self.runs[self.runs.task == task]
        curves = self.t.curves[(self.t.curves.metric == self.metric) & self.t.curves.run_id.isin(runs.run_id)]
        if curves.empty:
            return f"no run logged a per-eval curve of {self.metric}"
        curves = curves.merge(runs[["run_id", "variant", "ladder_value"]], on="run_id")
        values, ladder = self.values(task), self.ladder(task)
        fig, axes = self.panels(len(values))
        drawn: set[str] = set()
        for ax, value in zip(axes, values):
            panel = curves[curves.ladder_value == value]
            ax.set(title=f"{ladder} = {value}", xlabel="training step", ylabel=f"held-out {self.metric}")
            if self.no_runs(ax, panel):
                continue
            sns.lineplot(panel, x="step", y="value", hue="variant", hue_order=self.present(curves),
                         palette=self.palette, estimator="median", errorbar=("pi", 50), ax=ax)
            drawn |= set(self.references(ax, task, value))
        self.gather_legend(axes)
        n = curves.groupby(["ladder_value", "variant"]).run_id.nunique()
        self.label_n(axes[-1], n)
        self.finish(fig, axes, f"learning_{task}", f"{task}: learning curves", curves.value, task)
        return Figure(f"learning_{task}", f"{task}: learning curves", (
            f"{task}: held-out {self.metric} at each evaluation step; line: the median over the "
            f"{self.runs_word()} of each variant (n in the legend, {span(n)}), band: their 25th-75th percentile; "
            f"one panel per {ladder}. "
            + self.reference_words(drawn)))

    # --- 4. hyperparameter importance ----------------------------------------------------------------
    def importance(self, task: str) -> Figure | str:
        imp = self.t.importance[(self.t.importance.task == task) & self.t.importance.importance.notna()]
        if imp.empty:
            return "importance needs at least 2 complete search trials per cell (see importance.csv notes)"
        if imp.param.nunique() == 1:
            return (f"only one hyperparameter ({imp.param.iloc[0]}) was searched, so its importance is 1.00 in "
                    "every cell by construction")
        ladder = self.ladder(task)
        imp = imp.assign(row=[f"{v}, {ladder}={x} (n = {k})" for v, x, k in zip(imp.variant, imp.ladder_value,
                                                                               imp.n_trials)],
                         _v=imp.variant.map({v: i for i, v in enumerate(self.order)}))
        rows = imp.sort_values(["_v", "ladder_value"], kind="stable").row.unique()
        grid = imp.pivot_table(index="row", columns="param", values="importance", sort=False).reindex(rows)
        fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 3, 0.35 * grid.shape[0] + 1.4), )
        sns.heatmap(grid, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax,
                    cbar_kws={"label": "importance"})
        ax.set(xlabel="hyperparameter", ylabel="")
        ax.set_title(f"{task}: importance (PED-ANOVA)")
        save(fig, self.folder, f"importance_{task}")
        n = imp.groupby("cell").n_trials.first()
        notes = sorted({part for note in imp.note.dropna() for part in note.split("; ")} - {""})
        return Figure(f"importance_{task}", f"{task}: hyperparameter importance", (
            f"{task}: importance of each searched hyperparameter (columns) for each variant and {ladder} (rows), "
            f"by PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator, Optuna 5's default) over the cell's "
            f"complete search trials (n per row, {span(n)}), normalised to sum 1 per row."
            + (f" Note: {'; '.join(notes)}." if notes else "")))

    # --- 5. learning-rate sensitivity ----------------------------------------------------------------
    def lr_sensitivity(self, task: str) -> Figure | str:
        res = self.t.results
        if "param.lr" not in res:
            return "the learning rate was not searched (a single value)"
        data = res[(res.task == task) & (res.kind == "search") & (res.state == "COMPLETE")].copy()
        data["lr"] = pd.to_numeric(data["param.lr"], errors="coerce")
        data = data[np.isfinite(pd.to_numeric(data.objective, errors="coerce")) & data.lr.notna()]
        if data.lr.nunique() < 2:
            return ("the learning rate was not searched (a single value)" if res["param.lr"].nunique() < 2 else
                    f"fewer than two complete search trials with distinct learning rates ({len(data)} complete)")
        values, ladder = self.values(task), self.ladder(task)
        fig, axes = self.panels(len(values))
        drawn: set[str] = set()
        for ax, value in zip(axes, values):
            panel = data[data.ladder_value == value]
            ax.set(title=f"{ladder} = {value}", xlabel="learning rate", ylabel=f"final {self.metric}")
            if self.no_runs(ax, panel):
                continue
            sns.scatterplot(panel, x="lr", y="objective", hue="variant", hue_order=self.present(data),
                            palette=self.palette, ax=ax, s=30, alpha=0.8)
            drawn |= set(self.references(ax, task, value))
            ax.set_xscale("log")
            log_ticks(ax, data.lr)
        self.gather_legend(axes)
        self.finish(fig, axes, f"lr_{task}", f"{task}: learning-rate sensitivity", data.objective, task)
        return Figure(f"lr_{task}", f"{task}: learning-rate sensitivity", (
            f"{task}: final held-out {self.metric} of every complete search trial (one dot each, "
            f"{len(data)} in all) against its learning rate (log x), coloured by variant; one panel per "
            f"{ladder} (as in Greff et al. 2017). " + self.reference_words(drawn)))

    # --- 6. cost ------------------------------------------------------------------------------------
    def cost(self, task: str) -> Figure | str:
        data = self.runs[(self.runs.task == task) & self.runs.value.notna()].copy()
        cols = {"param.n_params": "parameters", "metric.seconds_per_step": "training seconds per step"}
        if data.empty or not set(cols) <= set(data.columns):
            return "no run has both a parameter count and a time per step"
        ladder = self.ladder(task)
        fig, axes = self.panels(2, width=4.0)
        for ax, (col, label) in zip(axes, cols.items()):
            data[label] = pd.to_numeric(data[col], errors="coerce")
            sns.scatterplot(data, x=label, y="value", hue="variant", hue_order=self.present(data), palette=self.palette,
                            style=ladder, ax=ax, s=40, alpha=0.8, legend=ax is axes[-1])
            ax.set(ylabel=f"final {self.metric}")
        self.finish(fig, axes, f"cost_{task}", f"{task}: cost against result", data.value)
        return Figure(f"cost_{task}", f"{task}: cost", (
            f"{task}: final held-out {self.metric} of the {self.runs_word()} (one dot each) against the model's number of "
            f"trainable parameters (left) and its measured training time per step in seconds (right, "
            f"wall-clock on the worker that ran it; a population member's share of its population's time); "
            f"colour: variant, marker: {ladder}."))

    # --- 7. gradient by lag -------------------------------------------------------------------------
    def gradient(self, task: str) -> Figure | str:
        runs = self.runs[(self.runs.task == task) & (self.runs.kind == "replicate")]
        data = self.t.grad_by_lag[self.t.grad_by_lag.run_id.isin(runs.run_id)]
        if data.empty:
            return "no replicate run logged grad_by_lag.json"
        data = data.merge(runs[["run_id", "variant", "ladder_value"]], on="run_id")
        medians = gradient_medians(data)
        values, ladder = self.values(task), self.ladder(task)
        fig, axes = self.panels(len(values))
        for ax, value in zip(axes, values):
            ax.set(title=f"{ladder} = {value}", xlabel="lag T-1-t (steps to the end)",
                   ylabel="‖∂ loss / ∂ h_t‖")
            if self.no_runs(ax, medians[medians.ladder_value == value]):
                continue
            sns.lineplot(medians[medians.ladder_value == value], x="lag", y="norm", hue="variant",
                         hue_order=self.present(medians), palette=self.palette, style="phase",
                         style_order=["trained", "init"], errorbar=None, ax=ax)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.gather_legend(axes)
        n = data.groupby(["ladder_value", "variant"]).run_id.nunique()
        self.label_n(axes[-1], n)
        self.finish(fig, axes, f"gradient_{task}", f"{task}: gradient reaching each step")
        return Figure(f"gradient_{task}", f"{task}: gradient against lag", (
            f"{task}: the norm of d loss / d h_t (the top layer's hidden state at step t, mean over a fixed "
            f"probe batch) against the lag T-1-t, at initialisation (dashed) and after training (solid); "
            f"median over the replicate runs (n in the legend, {span(n)}); log y, so a median of exactly 0 (the "
            f"gradient vanished below float32) ends the line; one panel per {ladder}. "
            "A steep fall with lag is the vanishing gradient (Hochreiter 1991; Bengio et al. 1994)."))


def gradient_medians(data: pd.DataFrame) -> pd.DataFrame:
    """Median gradient norm over runs per (length, variant, phase, lag), the points a log axis can show.

    Exact zeros (a gradient that vanished below float32) count in the median; a median of zero is
    then left out (a gap), never the zeros before the median, which would let one surviving run
    stand for all of them."""
    medians = data.groupby(["ladder_value", "variant", "phase", "lag"], as_index=False).norm.median()
    return medians[medians.norm > 0]


KINDS = ("objective", "difficulty", "capacity", "learning", "importance", "lr_sensitivity", "cost", "gradient")


def draw_all(tables: Tables, cells: pd.DataFrame, folder: Path) -> dict[str, list[tuple[str, Figure | str]]]:
    """Every figure of every task: {task: [(kind, Figure or the sentence saying why it is not drawn)]}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    with style():
        painter = Painter(tables, cells, folder)
        for task in tables.tasks:
            out[task] = []
            for kind in KINDS:
                # seaborn's strip-plot jitter draws from numpy's global generator: seed it per figure,
                # so a figure's bytes depend on its data only
                np.random.seed(int.from_bytes(hashlib.sha256(f"{kind}/{task}".encode()).digest()[:4], "little"))
                out[task].append((kind, getattr(painter, kind)(task)))
    return out

