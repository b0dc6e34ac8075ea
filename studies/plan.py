"""`rnnbench plan`: what a study will cost, before it runs; nothing is written but a calibration cache.

    >>> from studies import spec as specs
    >>> spec, _, _ = specs.load("quickstart")                          # doctest: +SKIP
    >>> print(format_plan(estimate(spec, Path("runs"), workers=2)))   # doctest: +SKIP

The estimate of one run (a search trial or a replicate run) is

    steps x (seconds per training step) + evaluations x (seconds per evaluation)
    [+ two gradient-by-lag probes, replicate runs] + RUN_OVERHEAD

where the per-step and per-evaluation seconds are *measured on this machine*: a few training steps of the
cell's model after one warm-up step, on one torch thread, as a worker runs them (:func:`calibrate`). Runs that
a worker trains together as one population (``train.population``, ``studies.population.population_size``:
replicate runs, and search trials of one generation where only per-member hyperparameters are searched) are
timed as a step of that population, shared by its members; their evaluations, probes and per-run overhead
count once per member. A
``seconds`` budget caps the training part. Each distinct (variant, switches, task settings, hidden size,
layers, batch size, optimizer, eval size) is calibrated once and cached in ``ROOT/plan-cache.json`` with
the torch version and host name (the only file ``plan`` writes). Searched hyperparameters that change the
cost (hidden size, batch size, layers, switches, optimizer) are calibrated at each end of their range (or
each choice) and averaged: the search draws between them.

Runs are then placed on ``workers`` workers by list scheduling, in the order workers claim them
(``studies.worker``): every cell's search trials first, lowest slot first, each generation once the one
before it has ended; a cell's replicate runs once its search has ended. Workers sharing a CPU slow each
other: k busy workers on c cores finish ``PARALLEL_GAIN``-per-extra-worker more work than one (README
"Speed": 2 workers on 2 cores = 1.60x one), never more than c. The study's own cost adds the launcher's
and workers' start and finish: START_FACTOR times the seconds a fresh interpreter takes to import the
engine, measured when planning (:func:`engine_start_seconds`: it is most of a small study's wall time, and
it follows the machine's load as the calibration does). The constants were measured on tiny studies (see
their comments).

With a pruner, pruned trials end early: the estimate is then an upper bound.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from torch import nn

from studies.population import PopulationSpec, keep_freed_memory, population_size, population_step
from studies.spec import SWITCH, Cell, Spec, _param_values, cells
from studies.training import (GRAD_PROBE_SIZE, SequenceModel, TrainConfig, gradient_by_lag, make_optimizer,
                               optimizer_name)
from variants import count_parameters, shapes_only

__all__ = ["CellPlan", "Plan", "calibrate", "estimate", "format_plan", "makespan"]

CACHE = "plan-cache.json"
# Seconds per run beyond its training and evaluations: claiming the trial, MLflow run and params, the
# task and its held-out set, telling Optuna, closing the run; and the gap before the worker's next claim.
# Measured: `rnnbench run` of one cell (adding T=8, rnn H=4, 1 step and 1 evaluation per run, one worker)
# with 2 and with 26 runs on the 2-core machine: (35.9 - 26.6) s / 24 runs = 0.39 s per run.
RUN_OVERHEAD = 0.4
# Seconds per study, in units of the engine's import time: the launcher starts, loads the study file and
# creates the store; the workers start, import and load it; the first trial pays for the first MLflow and
# torch calls; at the end the launcher and workers notice it (1 s polls) and close the cells' runs. Measured
# on the 2-core machine (under other load: 1-minute load average about 4), the 2-run study above: fresh
# import 5.6 / 6.7 s; experiment created at 13.7 / 12.0 s, first trial at 21.2 / 23.9 s, last trial ended
# at 24.5 / 28.8 s, exit at 28.9 / 37.8 s, i.e. 5.2x / 5.7x the import; 5x is used. Plus, per cell, its two
# Optuna studies and MLflow parent run (0.3 s).
START_FACTOR = 5.0
CELL_OVERHEAD = 0.3
PARALLEL_GAIN = 0.60  # each extra busy worker adds 0.6 of one worker's throughput, up to the core count
# Searched hyperparameters that change a run's cost; the others (lr, grad_clip, ...) do not.
COST_PARAMS = ("hidden_size", "num_layers", "batch_size", "optimizer", "nesterov")


@dataclass
class CellPlan:
    cell: Cell
    params: tuple[int, int]  # the model's parameter count: fewest, most over what the search can draw
    hidden: tuple[int, int]
    trials: int
    replicates: int
    search_seconds: float  # estimated wall time of one search trial, one replicate run (on one worker alone;
    replicate_seconds: float  # a population's time shared by its members)
    step_seconds: float  # measured: one training step, mean over the calibrated configurations
    search_group: int = 1  # runs trained together as one population (1: one by one)
    replicate_group: int = 1


@dataclass
class Plan:
    cells: list[CellPlan]
    workers: int
    cores: int
    seconds: float  # estimated wall time of `rnnbench run` with `workers` workers
    calibrated: int  # configurations measured now (the rest came from the cache)
    cache: Path
    pruned_early: bool  # a pruner may end trials early: the estimate is an upper bound
    start_seconds: float  # measured: a fresh interpreter importing the engine

    @property
    def runs(self) -> int:
        return sum(c.trials + c.replicates for c in self.cells)


def estimate(spec: Spec, root: Path, workers: int = 1, cores: int | None = None, on_cell=None) -> Plan:
    """Calibrate what is not cached, estimate every cell's runs, schedule them on ``workers``. The cache is
    written after each cell that measured something, so an interrupted plan keeps what it measured.
    ``on_cell(i, n, cell)`` is told before each cell's configurations are looked at."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    cache_path = Path(root) / CACHE
    cache = _read_cache(cache_path)
    measured, plans = 0, []
    every = cells(spec)
    for i, cell in enumerate(every):
        if on_cell:
            on_cell(i, len(every), cell)
        before = measured
        task, searched = cell.build_task(), {name for name, _ in cell.search_space}
        configs, counts, widths, steps, runs = _configs(spec, cell, task), [], [], [], []
        for hp in configs:
            switches = cell.switches(hp)
            hidden = cell.hidden_size(task, hp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                counts.append(count_parameters(shapes_only(lambda: SequenceModel(
                    task, cell.variant.variant, hidden, int(hp["num_layers"]), 0.0, switches))))
            widths.append(hidden)
            key = _key(cell, task, hp, switches, hidden, spec.train.eval_size, spec.replicates > 0)
            if key not in cache:
                cache[key] = calibrate(task, cell.variant.variant, switches, hidden, int(hp["num_layers"]),
                                       int(hp["batch_size"]), optimizer_name(hp), spec.train.eval_size,
                                       probe=spec.replicates > 0)
                measured += 1
            one = cache[key]
            steps.append(one["step"])
            pop = PopulationSpec(cell.variant.variant, switches, hidden, int(hp["num_layers"]), float(hp["dropout"]))
            groups = (min(population_size(spec.train.pooled, "search", searched, lambda: pop, "cpu"),
                          spec.generation, spec.trials),
                      min(population_size(spec.train.pooled, "replicate", searched, lambda: pop, "cpu"),
                          max(spec.replicates, 1)))
            per_run = []
            for group, probes in zip(groups, (0, 2)):
                step = one["step"]
                if group > 1:
                    if f"{key}/{group}" not in cache:
                        cache[f"{key}/{group}"] = {"step": population_step_seconds(task, pop, group,
                                                                                   int(hp["batch_size"]))}
                        measured += 1
                    step = cache[f"{key}/{group}"]["step"] / group
                per_run.append(_train_seconds(spec, step, one["eval"]) + probes * one.get("probe", 0.0)
                               + RUN_OVERHEAD)
            runs.append((*per_run, *groups))
        search_s, replicate_s = (mean(r[j] for r in runs) for j in (0, 1))
        search_group, replicate_group = (min(r[j] for r in runs) for j in (2, 3))
        plans.append(CellPlan(cell, (min(counts), max(counts)), (min(widths), max(widths)), spec.trials,
                              spec.replicates, search_s, replicate_s, mean(steps), search_group, replicate_group))
        if measured > before:
            _write_cache(cache_path, cache)
    # Scheduled as workers claim: a population is one job, a search generation ceil(generation / group) jobs.
    rows = [(c.search_seconds * c.search_group, math.ceil(c.trials / c.search_group),
             c.replicate_seconds * c.replicate_group, math.ceil(c.replicates / c.replicate_group),
             math.ceil(spec.generation / c.search_group)) for c in plans]
    start = engine_start_seconds()
    total = START_FACTOR * start + CELL_OVERHEAD * len(plans) + makespan(rows, workers, cores)
    return Plan(plans, workers, cores, total, measured, cache_path, spec.pruner != "none", start)


def engine_start_seconds() -> float:
    """Seconds a fresh interpreter takes, now, to import what the launcher and every worker import first."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import rnnbench, studies.launcher, studies.worker, studies.progress"],
                   check=True, capture_output=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return time.perf_counter() - start


def _configs(spec: Spec, cell: Cell, task) -> list[dict[str, Any]]:
    """The hyperparameters to calibrate a cell at: the fixed ones, with each searched one that changes the
    cost at each end of its range (or at each choice)."""
    base = {**cell.model.model_dump(include={"hidden_size", "num_layers", "dropout"}),
            **spec.train.model_dump(include={"batch_size", "optimizer", "momentum", "nesterov"})}
    searched = [(name, p) for name, p in cell.search_space if name in COST_PARAMS or name.startswith(SWITCH)]
    values = [[min(_param_values(p)), max(_param_values(p))] if p.type != "categorical" else list(p.choices)
              for _, p in searched]
    out = []
    for combo in itertools.product(*values):
        hp = {**base, **{name: (int(v) if p.type == "int" else v) for (name, p), v in zip(searched, combo)}}
        if hp not in out:
            out.append(hp)
    return out


def _train_seconds(spec: Spec, step: float, evaluation: float) -> float:
    """A run's training and evaluations: ``steps`` steps, or fewer where ``seconds`` ends it first."""
    steps = spec.train.steps
    if spec.train.seconds is not None:
        in_time = max(1, int(spec.train.seconds / step) + 1)  # training stops at the first step past it
        steps = in_time if steps is None else min(steps, in_time)
    evals = steps // spec.train.eval_every + (steps % spec.train.eval_every != 0)
    return steps * step + evals * evaluation


def _key(cell: Cell, task, hp: dict, switches: dict, hidden: int, eval_size: int, probe: bool) -> str:
    what = {"variant": cell.variant.variant, "switches": switches, "task": task.name, "settings": task.settings(),
            "hidden_size": hidden, "num_layers": int(hp["num_layers"]), "batch_size": int(hp["batch_size"]),
            "optimizer": optimizer_name(hp), "eval_size": eval_size, "probe": probe,
            "torch": torch.__version__, "host": socket.gethostname()}
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibrate(task, variant: str, switches: dict, hidden: int, num_layers: int, batch_size: int,
              optimizer: str = "adam", eval_size: int = 512, probe: bool = False, min_steps: int = 5,
              max_seconds: float = 2.0) -> dict[str, float]:
    """Seconds per training step (mean of at least ``min_steps`` timed steps after one warm-up step, more
    while under ``max_seconds``), per evaluation of ``eval_size`` sequences, and (``probe``) per
    gradient-by-lag probe, on one torch thread, as a worker trains (``studies.training.train``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = SequenceModel(task, variant, hidden, num_layers, 0.0, switches)
            # momentum 0.9: sgd's cost with its momentum buffer, whatever the study's momentum
            opt = make_optimizer(model.parameters(), TrainConfig(optimizer=optimizer, momentum=0.9))
            data = torch.Generator().manual_seed(0)

            def step():
                model.train()
                batch = task.sample(batch_size, data)
                loss = task.loss(model(batch.x), batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

            out = {"step": _seconds_per_call(step, min_steps, max_seconds)}
            held_out = task.eval_batch(eval_size, 0)
            start = time.perf_counter()
            with torch.no_grad():
                model.eval()
                task.metrics(model(held_out.x), held_out)
            out["eval"] = time.perf_counter() - start
            if probe:
                start = time.perf_counter()
                gradient_by_lag(task, model, task.eval_batch(GRAD_PROBE_SIZE, 1))
                out["probe"] = time.perf_counter() - start
            return out
    finally:
        torch.set_num_threads(threads)


def population_step_seconds(task, spec: PopulationSpec, size: int, batch_size: int, min_steps: int = 3,
                            max_seconds: float = 2.0) -> float:
    """Seconds per training step of a population of ``size`` members, on one torch thread, as
    ``studies.population.train_population`` trains it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _seconds_per_call(population_step(task, spec, size, batch_size, torch.device("cpu")),
                                     min_steps, max_seconds)
    finally:
        torch.set_num_threads(threads)


def _seconds_per_call(step, min_steps: int, max_seconds: float) -> float:
    """The mean seconds of ``step()`` after one warm-up call: at least ``min_steps`` calls, more (up to 50)
    while under ``max_seconds``."""
    step()
    n, start = 0, time.perf_counter()
    while n < min_steps or (time.perf_counter() - start < max_seconds and n < 50):
        step()
        n += 1
    return (time.perf_counter() - start) / n


def makespan(cells_: list[tuple[float, int, float, int, int]], workers: int, cores: int) -> float:
    """Seconds until every job has ended, list-scheduled as workers claim them.

    ``cells_``: per cell (seconds of a search job, search jobs, seconds of a replicate job, replicate jobs,
    search jobs per generation), each on a worker alone; a job is one run, or a population of runs trained
    together. A job that starts while k - 1 others run takes ``k / speedup(k)`` times as long.
    """
    ended = [set() for _ in cells_]  # search slots ended, per cell
    replicated = [0] * len(cells_)  # replicate runs started, per cell
    next_slot = [0] * len(cells_)
    running: list[tuple[float, int, str, int]] = []  # (end time, cell, kind, slot)
    now = 0.0

    def ready():
        for i, (_, trials, _, _, generation) in enumerate(cells_):  # search trials first, in cell order
            s = next_slot[i]
            if s < trials and all(x in ended[i] for x in range(generation * (s // generation))):
                return i, "search"
        for i, (_, trials, _, replicates, _) in enumerate(cells_):
            if len(ended[i]) == trials and replicated[i] < replicates:
                return i, "replicate"
        return None

    while True:
        while len(running) < workers and (job := ready()) is not None:
            i, kind = job
            k = len(running) + 1
            slowdown = k / (1 + PARALLEL_GAIN * (min(k, cores) - 1))
            if kind == "search":
                slot, seconds = next_slot[i], cells_[i][0]
                next_slot[i] += 1
            else:
                slot, seconds = replicated[i], cells_[i][2]
                replicated[i] += 1
            running.append((now + seconds * slowdown, i, kind, slot))
        if not running:
            return now
        running.sort()
        now, i, kind, slot = running.pop(0)
        if kind == "search":
            ended[i].add(slot)


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    """The plan as a table (one row per cell) and the estimate."""
    rows = [("cell", "hidden", "params", "runs", "together", "ms/step", "s/trial", "s/replicate")]
    for c in plan.cells:
        hidden = str(c.hidden[0]) if c.hidden[0] == c.hidden[1] else f"{c.hidden[0]}-{c.hidden[1]}"
        params = f"{c.params[0]:,}" if c.params[0] == c.params[1] else f"{c.params[0]:,}-{c.params[1]:,}"
        replicate_group = c.replicate_group if c.replicates else 0  # no replicates: no population of them
        together = f"{c.search_group}+{replicate_group}" if max(c.search_group, replicate_group) > 1 else "-"
        rows.append((c.cell.key, hidden, params, f"{c.trials}+{c.replicates}", together,
                     f"{1000 * c.step_seconds:.1f}", f"{c.search_seconds:.1f}",
                     f"{c.replicate_seconds:.1f}" if c.replicates else "-"))
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    one = sum(c.trials * c.search_seconds + c.replicates * c.replicate_seconds for c in plan.cells)
    lines += ["",
              f"{len(plan.cells)} cells, {plan.runs} runs; {_duration(one)} of runs on one worker alone",
              f"estimate: {_duration(plan.seconds)} with {plan.workers} worker(s) on {plan.cores} cores"
              + (" (an upper bound: the pruner ends some trials early)" if plan.pruned_early else ""),
              f"calibrated {plan.calibrated} configuration(s) now, the rest from {plan.cache}; per run "
              f"+{RUN_OVERHEAD} s; per study +{START_FACTOR:g} x {plan.start_seconds:.1f} s (engine start, "
              f"measured now) +{CELL_OVERHEAD} s per cell; parallel gain {PARALLEL_GAIN} per extra worker"]
    if any(max(c.search_group, c.replicate_group if c.replicates else 0) > 1 for c in plan.cells):
        lines.append("together: search trials + replicate runs a worker trains as one population "
                     "(train.population), timed as one; s/trial and s/replicate are a run's share")
    return "\n".join(lines)
