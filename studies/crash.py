"""Named crash points, for fault-injection tests of the trial protocol.

``RNNBENCH_CRASH_AT=<point>[:<n>][,<point>[:<n>]...]`` makes a process die at the ``n``-th time
(default the first) it reaches ``crash_point(<point>)``, the way kill -9 would: ``os._exit(137)``, no
cleanup, no ``finally``. With ``RNNBENCH_CRASH_ONCE=<folder>`` only the first process to get to a point
dies (it creates ``<folder>/<point>``), so a restarted worker runs on. Workers inherit the variables
from their launcher. Without them a crash point costs one dictionary lookup.

The points (README "What is guaranteed (exactly once)" lists them):
"""

from __future__ import annotations

import os

POINTS = {
    # worker
    "worker.claimed": "a trial is RUNNING, the worker has not recorded itself on it",
    "worker.recorded": "the worker is recorded, no MLflow run exists yet",
    "worker.run_created": "the MLflow run exists, its id is not recorded on the trial",
    "worker.training": "mid-training, at the n-th evaluation (default the first)",
    "worker.before_tell": "the objective is logged to MLflow, Optuna is not told",
    "worker.told": "Optuna has the result, the MLflow run is still RUNNING",
    # launcher
    "launcher.parent_created": "a cell's MLflow parent run exists, its id is not recorded",
    "launcher.enqueued_search": "one search trial of several enqueued",
    "launcher.enqueued_replicate": "one replicate run of several enqueued",
    "launcher.running": "the launcher alone dies while its workers train",
    "interrupt.marked": "a reaped trial is marked interrupted, not yet FAIL",
    "launcher.reaped": "a reaped trial is FAIL, its MLflow run still RUNNING",
    "launcher.finishing": "the study has ended, the cells' parent runs are being closed",
}
__doc__ += "".join(f"\n    {name:28s} {what}" for name, what in POINTS.items()) + "\n"

_arrivals: dict[str, int] = {}


def crash_point(name: str) -> None:
    targets = os.environ.get("RNNBENCH_CRASH_AT")
    if not targets:
        return
    for target in targets.split(","):
        point, _, n = target.partition(":")
        if point == name:
            break
    else:
        return
    assert name in POINTS, name
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] != int(n or 1):
        return
    once = os.environ.get("RNNBENCH_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(os.path.join(once, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os._exit(137)
