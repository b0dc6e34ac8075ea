"""What a person watching a study sees: a live progress bar on a terminal, log lines elsewhere, and a
line for every trial that ends; `rnnbench status`'s table, with the last error of each failing cell."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from optuna.trial import FrozenTrial, TrialState

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from studies.queue import ENDED, STOP_AFTER, CellProgress, counted, interrupted, slot, source
from studies.spec import Spec

ERROR_WIDTH = 300  # characters of an error message shown; MLflow's error.txt has the traceback


def _counts(spec: Spec, rows: list[CellProgress]) -> tuple[int, int, int, int]:
    ended_by_row = [min(r.search["counted"], spec.trials) + min(r.replicate["counted"], r.replicates_wanted())
                    for r in rows]
    # A stopped cell runs no more trials: its total is what it ran.
    total = sum(e if r.stopped is not None else spec.trials + r.replicates_wanted() for r, e in zip(rows, ended_by_row))
    ended = sum(ended_by_row)
    running = sum(r.search["RUNNING"] + r.replicate["RUNNING"] for r in rows)
    cells_done = sum(r.done() for r in rows)
    return total, ended, running, cells_done


def ended_trials(rows: list[CellProgress]) -> Iterator[tuple[CellProgress, str, FrozenTrial]]:
    """(row, kind, trial) of every ended trial, search and replicate, interrupted ones included."""
    for r in rows:
        for kind, trials in (("search", r.search_trials), ("replicate", r.replicate_trials)):
            for t in trials:
                if t.state in ENDED:
                    yield r, kind, t


def _short(text: str, width: int = ERROR_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def trial_line(cell: str, kind: str, t: FrozenTrial, metric: str, cell_width: int = 0) -> str:
    """One ended trial: cell, kind, slot, state, objective, seconds (and why, if it failed)."""
    state = "INTERRUPTED" if interrupted(t) else t.state.name
    value = f"{metric} {t.value:.4g}" if t.state == TrialState.COMPLETE and t.value is not None else "-"
    seconds = f"{t.duration.total_seconds():.1f} s" if t.duration is not None else "-"
    line = f"{cell:<{cell_width}}  {kind:<9}  slot {slot(t):>3}  {state:<11}  {value:>16}  {seconds:>8}"
    why = t.user_attrs.get("interrupted") if interrupted(t) else t.user_attrs.get("error")
    return line + (f"  {_short(str(why))}" if why else "")


def _ended_at(t: FrozenTrial) -> float:
    return t.datetime_complete.timestamp() if t.datetime_complete else float(t.number)


class Display:
    """Context manager; ``update(rows)`` is the launcher's ``on_progress`` callback. Each update also
    prints a line for every trial that ended since the last one (above the bar on a terminal)."""

    def __init__(self, spec: Spec, interval: float = 30.0):
        self.spec, self.interval = spec, interval
        self.live = sys.stdout.isatty()
        self.last, self.last_line = None, 0.0
        self.reported: set[tuple[str, str, int]] | None = None  # (cell, kind, trial number) already shown
        self.stopped: set[str] = set()  # cells whose stop was shown

    def __enter__(self):
        if self.live:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("trials"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("starting", total=None)
        return self

    def update(self, rows: list[CellProgress]) -> None:
        self._log_ended(rows)
        for r in rows:
            if r.stopped is not None and r.cell.key not in self.stopped:
                self.stopped.add(r.cell.key)
                self._print(stopped_line(r))
        total, ended, running, cells_done = _counts(self.spec, rows)
        text = f"cells {cells_done}/{len(rows)}, running {running}"
        state = (ended, cells_done)
        if self.live:
            self.bar.update(self.task, total=total, completed=ended, description=text)
        elif state != self.last and (time.monotonic() - self.last_line >= self.interval or ended == total):
            print(f"[{time.strftime('%H:%M:%S')}] trials {ended}/{total}, {text}", flush=True)
            self.last, self.last_line = state, time.monotonic()

    def _log_ended(self, rows: list[CellProgress]) -> None:
        new = [(r, kind, t) for r, kind, t in ended_trials(rows) if (r.cell.key, kind, t.number) not in (self.reported or ())]
        first = self.reported is None
        self.reported = (self.reported or set()) | {(r.cell.key, kind, t.number) for r, kind, t in new}
        if first:  # a resumed study: what ended before this run is in `rnnbench status`, not repeated here
            gone = [(r, kind, t) for r, kind, t in new if "interrupted" in t.user_attrs]
            again = sum(not any(counted(o) and slot(o) == slot(t) and source(o) == source(t)  # queued is not run
                                for o in (r.search_trials if kind == "search" else r.replicate_trials))
                        for r, kind, t in gone)
            if new:
                self._print(f"{len(new)} trials had ended before this run" + (
                    f" ({len(gone)} interrupted: " + (f"{again} slot{'s' * (again > 1)} to run again)" if again else
                                                      "their slots have run again since)") if gone else ""))
            return
        width = max((len(r.cell.key) for r in rows), default=0)
        for r, kind, t in sorted(new, key=lambda x: _ended_at(x[2])):
            self._print(trial_line(r.cell.key, kind, t, self.spec.objective.metric, width))

    def note(self, line: str) -> None:
        """A line above the progress (the launcher's ``on_note``)."""
        self._print(line)

    def _print(self, line: str) -> None:
        if self.live:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    def __exit__(self, *exc):
        if self.live:
            self.bar.stop()


def stopped_line(r: CellProgress) -> str:
    return f"cell {r.cell.key} stopped: its first {STOP_AFTER} trials failed with: {_short(str(r.stopped))}"


def last_errors(rows: list[CellProgress]) -> list[tuple[CellProgress, str, FrozenTrial]]:
    """Each cell with failed trials (not interrupted ones): (row, kind, its last failed trial)."""
    out = []
    for r in rows:
        failed = [(kind, t) for _, kind, t in ended_trials([r]) if t.state == TrialState.FAIL and not interrupted(t)]
        if failed:
            kind, t = max(failed, key=lambda x: _ended_at(x[1]))
            out.append((r, kind, t))
    return out


def status_table(spec: Spec, rows: list[CellProgress]) -> None:
    table = Table(title=f"study {spec.name}: {spec.trials} trials and {spec.replicates} replicates per cell")
    for col in ("cell", "complete", "pruned", "failed", "interrupted", "running", "waiting", f"best {spec.objective.metric}",
                "replicates"):
        table.add_column(col, justify="left" if col == "cell" else "right")
    for r in rows:
        s = r.search
        key = r.cell.key + (" (stopped)" if r.stopped is not None else "")
        table.add_row(key, str(s["COMPLETE"]), str(s["PRUNED"]), str(s["FAIL"] - s["interrupted"]),
                      str(s["interrupted"]), str(s["RUNNING"] + r.replicate["RUNNING"]),
                      str(s["WAITING"] + r.replicate["WAITING"]),
                      "-" if r.best is None else f"{r.best.value:.4g}",
                      f"{r.replicate['counted']}/{r.replicates_wanted()}"
                      + (f" (+{r.superseded} superseded)" if r.superseded else ""))
    total, ended, running, cells_done = _counts(spec, rows)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    stopped = [r for r in rows if r.stopped is not None]
    print(f"{ended}/{total} trials ended, {running} running, {cells_done}/{len(rows)} cells done"
          + (f" ({len(stopped)} stopped)" if stopped else ""))
    if stopped:
        print(f"\nstopped cells (their first {STOP_AFTER} trials failed with the same error; fix the cause, then "
              f"`rnnbench run SPEC --retry-stopped`):")
        width = max(len(r.cell.key) for r in stopped)
        for r in stopped:
            print(f"  {r.cell.key:<{width}}  stopped: {_short(str(r.stopped))}")
    errors = last_errors(rows)
    if errors:
        print("\nlast error of each cell with failed trials (the traceback: error.txt in the trial's MLflow run):")
        width = max(len(r.cell.key) for r, _, _ in errors)
        for r, kind, t in errors:
            why = _short(str(t.user_attrs.get("error", "(no error recorded)")))
            print(f"  {r.cell.key:<{width}}  {kind} slot {slot(t)} (trial {t.number}): {why}")
