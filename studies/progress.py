"""What a person watching a study sees: a live progress bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from studies.engine import CellProgress
from studies.spec import Spec


def _counts(spec: Spec, rows: list[CellProgress]) -> tuple[int, int, int, int]:
    total = sum(spec.trials + r.replicates_wanted(spec) for r in rows)
    ended = sum(min(r.search["counted"], spec.trials) + min(r.replicate["counted"], r.replicates_wanted(spec))
                for r in rows)
    running = sum(r.search["RUNNING"] + r.replicate["RUNNING"] for r in rows)
    cells_done = sum(r.done(spec) for r in rows)
    return total, ended, running, cells_done


class Display:
    """Context manager; ``update(rows)`` is the engine's ``on_progress`` callback."""

    def __init__(self, spec: Spec, interval: float = 30.0):
        self.spec, self.interval = spec, interval
        self.live = sys.stdout.isatty()
        self.last, self.last_line = None, 0.0

    def __enter__(self):
        if self.live:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("trials"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("starting", total=None)
        return self

    def update(self, rows: list[CellProgress]) -> None:
        total, ended, running, cells_done = _counts(self.spec, rows)
        text = f"cells {cells_done}/{len(rows)}, running {running}"
        state = (ended, cells_done)
        if self.live:
            self.bar.update(self.task, total=total, completed=ended, description=text)
        elif state != self.last and (time.monotonic() - self.last_line >= self.interval or ended == total):
            print(f"[{time.strftime('%H:%M:%S')}] trials {ended}/{total}, {text}", flush=True)
            self.last, self.last_line = state, time.monotonic()

    def __exit__(self, *exc):
        if self.live:
            self.bar.stop()


def status_table(spec: Spec, rows: list[CellProgress]) -> None:
    table = Table(title=f"study {spec.name}: {spec.trials} trials and {spec.replicates} replicates per cell")
    for col in ("cell", "complete", "pruned", "failed", "interrupted", "running", "waiting", f"best {spec.objective.metric}",
                "replicates"):
        table.add_column(col, justify="left" if col == "cell" else "right")
    for r in rows:
        s = r.search
        table.add_row(r.cell.key, str(s["COMPLETE"]), str(s["PRUNED"]), str(s["FAIL"] - s["interrupted"]),
                      str(s["interrupted"]), str(s["RUNNING"] + r.replicate["RUNNING"]),
                      str(s["WAITING"] + r.replicate["WAITING"]),
                      "-" if r.best is None else f"{r.best:.4g}",
                      f"{r.replicate['counted']}/{r.replicates_wanted(spec)}")
    total, ended, running, cells_done = _counts(spec, rows)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"{ended}/{total} trials ended, {running} running, {cells_done}/{len(rows)} cells done")
