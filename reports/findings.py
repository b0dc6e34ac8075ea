"""The tables the README's "Findings" quote, rendered as Markdown from a saved report's tables.

    python -m reports.findings studies/results/odyssey

prints them; ``tests/test_reference.py`` checks that the README quotes them verbatim, so the text cannot
drift from the shipped tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from reports import tables as tbl


def _sig(x: float) -> str:
    return "–" if pd.isna(x) else f"{x:.2g}"


def _columns(summary: pd.DataFrame) -> list[tuple[str, object]]:
    return list(dict.fromkeys(zip(summary.task, summary.ladder_value)))


def solved_matrix(summary: pd.DataFrame) -> str:
    """Variants down, (task, ladder value) across; each entry: replicate runs solved k/n, then the mean
    final objective of those runs."""
    cols = _columns(summary)
    ladder = dict(zip(summary.task, summary.ladder))
    head = ["variant", *(f"{task} {'T' if ladder[task] == 'seq_len' else ladder[task]}={value}" for task, value in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = summary.set_index(["variant", "task", "ladder_value"])
    for variant in dict.fromkeys(summary.variant):
        row = [f"`{variant}`"]
        for task, value in cols:
            r = by.loc[(variant, task, value)]
            row.append(f"{int(r.solved)}/{int(r.runs)} · {_sig(r['mean'])}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def significant(statistics: pd.DataFrame) -> str:
    """Every difference from the reference that survives Holm's correction, one line each."""
    sig = statistics[statistics.significant.astype(str) == "True"]
    if sig.empty:
        return "- none"
    return "\n".join(
        f"- `{r.variant}` {r.better} than `{r.reference}` on {r.task} T={r.ladder_value}: "
        f"{_sig(r['mean'])} vs {_sig(r.mean_ref)} (Holm p = {_sig(r.p_welch_holm)}, Hedges' g = {r.hedges_g:.1f})"
        for _, r in sig.iterrows())


def render(folder: Path) -> str:
    """Both tables of the saved report in ``folder``, as the README quotes them."""
    folder = tbl.locate(folder)
    summary = pd.read_csv(folder / "summary.csv")
    statistics = pd.read_csv(folder / "statistics.csv")
    return (f"{solved_matrix(summary)}\n\nSignificant differences from the reference (Welch's t-test, "
            f"Holm-corrected over {len(statistics)} comparisons, alpha 0.05):\n\n{significant(statistics)}\n")


if __name__ == "__main__":
    print(render(Path(sys.argv[1] if len(sys.argv) > 1 else "studies/results/odyssey")), end="")
