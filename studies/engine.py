"""The study engine: one Optuna study per cell, one MLflow child run per trial, exact trial counts.

Who does what
-------------
* The **launcher** (`rnnbench run`) alone creates trials: it enqueues WAITING trials so that every
  cell has exactly ``trials`` ended trials, enqueues the replicate runs of a cell once its search has
  ended, reaps trials whose worker died, and shows progress. It starts ``--workers`` worker processes.
* **Workers** (`rnnbench worker`, started by the launcher or by hand on other machines) only claim
  WAITING trials (an atomic WAITING -> RUNNING transition in Optuna's storage) and run them. So two
  workers never run the same trial and no cell gets more trials than asked for.

Trial accounting
----------------
A trial *ends* COMPLETE, PRUNED (the pruner stopped it; its MLflow run ends KILLED, tag
``rnnbench.pruned``) or FAIL (non-finite loss or an exception; MLflow FAILED with the message in
``rnnbench.error``). A trial whose worker died (kill -9, lost machine) is closed as FAIL with the user
attribute ``interrupted``, its MLflow run KILLED with tag ``rnnbench.interrupted``; it does not count,
and the launcher enqueues a replacement, so a rerun ends with exactly ``trials`` counted trials.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import optuna
import torch
from mlflow.entities import Metric, Param
from optuna.trial import TrialState

from studies.spec import Cell, Spec, cell_fingerprint, cells
from studies.store import Store
from studies.training import EMBED_MAX, Divergence, SequenceModel, TrainConfig, gradient_by_lag, train
from variants import count_parameters, hidden_for_param_budget

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # QMCSampler

ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
KINDS = ("search", "replicate")
GRAD_PROBE_SIZE = 64  # sequences in the gradient-by-lag probe of replicate runs


class StudyChanged(RuntimeError):
    """The study file changed a cell's definition under an existing study."""


def derive_seed(*parts) -> int:
    """A 31-bit seed from any parts (study seed, cell key, trial number...), stable across runs."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def optuna_name(spec: Spec, cell: Cell, kind: str) -> str:
    return f"{spec.name}/{cell.key}" + ("/replicates" if kind == "replicate" else "")


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state in ENDED and "interrupted" not in trial.user_attrs


# --------------------------------------------------------------------------------------------------
# Optuna side
# --------------------------------------------------------------------------------------------------

def make_sampler(spec: Spec, cell: Cell, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=derive_seed(spec.seed, cell.key), scramble=True)
    return optuna.samplers.RandomSampler(seed)  # grid: the launcher enqueues every point with its params


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=spec.train.eval_every)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.train.eval_every,
                                              max_resource=spec.train.steps or "auto")
    return optuna.pruners.NopPruner()


def open_study(spec: Spec, storage, cell: Cell, kind: str) -> optuna.Study:
    """A handle on one of a cell's Optuna studies. Its sampler never samples: :func:`claim` installs a
    per-trial one for search trials, and replicate trials have every parameter fixed."""
    return optuna.Study(optuna_name(spec, cell, kind), storage, sampler=optuna.samplers.RandomSampler(0),
                        pruner=make_pruner(spec) if kind == "search" else optuna.pruners.NopPruner())


def suggest(trial: optuna.Trial, cell: Cell) -> dict:
    out = {}
    for name, p in cell.search_space:
        if p.type == "float":
            out[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[name] = trial.suggest_categorical(name, p.choices)
    return out


def claim(study: optuna.Study, sampler_for=None) -> optuna.Trial | None:
    """Atomically move one WAITING trial to RUNNING and return it (what ``Study.ask`` does first),
    or None: unlike ``ask``, never create a trial. ``sampler_for(number)``, if given, is installed as
    the study's sampler before the trial object samples anything. ``_trial_id`` is the storage's id."""
    storage = study._storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                if sampler_for is not None:
                    study.sampler = sampler_for(frozen.number)
                return optuna.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


@dataclass
class CellProgress:
    cell: Cell
    search: dict[str, int]  # state name -> count, plus "counted"
    replicate: dict[str, int]
    best: float | None

    def done(self, spec: Spec) -> bool:
        return self.search["counted"] >= spec.trials and self.replicate["counted"] >= self.replicates_wanted(spec)

    def replicates_wanted(self, spec: Spec) -> int:
        # No replicate runs when no search trial completed: there is no best configuration.
        return spec.replicates if self.best is not None or self.search["counted"] < spec.trials else 0


def tally(trials) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in trials:
        out[t.state.name] += 1
    out["counted"] = sum(counted(t) for t in trials)
    out["interrupted"] = sum("interrupted" in t.user_attrs for t in trials)
    return out


def progress(spec: Spec, storage) -> list[CellProgress]:
    rows = []
    for cell in cells(spec):
        trials = {}
        for kind in KINDS:
            try:
                trials[kind] = open_study(spec, storage, cell, kind).get_trials(deepcopy=False)
            except KeyError:  # study not created yet
                trials[kind] = []
        done = [t for t in trials["search"] if t.state == TrialState.COMPLETE]
        best = None
        if done:
            pick = min if spec.objective.direction == "minimize" else max
            best = pick(t.value for t in done)
        rows.append(CellProgress(cell, tally(trials["search"]), tally(trials["replicate"]), best))
    return rows


def best_trial(spec: Spec, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    sign = 1 if spec.objective.direction == "minimize" else -1
    return min(done, key=lambda t: (sign * t.value, t.number))


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

def prepare(spec: Spec, spec_text: str, store: Store, storage, client) -> str:
    """Create (or check) every cell's Optuna studies and MLflow parent run before workers start.
    Returns the MLflow experiment id."""
    existing = {s.study_name: s.user_attrs for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    for cell in cells(spec):  # check everything before writing anything
        old = existing.get(optuna_name(spec, cell, "search"), {}).get("fingerprint")
        if old is not None and old != cell_fingerprint(spec, cell):
            raise StudyChanged(
                f"study {spec.name!r}, cell {cell.key}: the study file changed this cell's definition "
                f"(search space, budget, model, sampler, objective or seed) since its trials ran; "
                f"give the study a new 'name' (or use another --root) to start a new study")
    exp_id = store.experiment_id(client, spec.name, create=True)
    client.set_experiment_tag(exp_id, "rnnbench.study_sha256", hashlib.sha256(spec_text.encode()).hexdigest())
    # The experiment's description in the MLflow UI is the study file (MLflow caps tags at 5000 chars);
    # what reports need of it is stored whole, parsed.
    text = spec_text if len(spec_text) <= 4800 else spec_text[:4800] + "\n# ... (truncated: the study file is longer)"
    client.set_experiment_tag(exp_id, "mlflow.note.content", f"```yaml\n{text}\n```")
    meta = {"objective": spec.objective.model_dump(), "reference": spec.reference_label,
            "variant_order": [v.name for v in spec.variants],
            "task_order": list(dict.fromkeys(t["task"] for t in spec.tasks))}
    client.set_experiment_tag(exp_id, "rnnbench.study_meta", json.dumps(meta))
    for cell in cells(spec):
        for kind in KINDS:
            study = optuna.create_study(storage=storage, study_name=optuna_name(spec, cell, kind),
                                        direction=spec.objective.direction, load_if_exists=True)
            if "fingerprint" not in study.user_attrs:
                study.set_user_attr("fingerprint", cell_fingerprint(spec, cell))
        search = open_study(spec, storage, cell, "search")
        if "mlflow_parent_run_id" not in search.user_attrs:
            run = client.create_run(exp_id, run_name=cell.key, tags={
                **cell_tags(spec, cell), "rnnbench.role": "cell"})
            search.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    client.set_experiment_tag(exp_id, "rnnbench.prepared", "true")
    return exp_id


def top_up(spec: Spec, storage, rows: list[CellProgress] | None = None) -> None:
    """Enqueue WAITING trials so each cell will end with exactly ``trials`` counted search trials, and,
    once a cell's search has ended, ``replicates`` replicate runs of its best configuration.
    ``rows``: this moment's :func:`progress`, if the caller has it."""
    for row in rows if rows is not None else progress(spec, storage):
        cell = row.cell
        s = row.search
        missing = spec.trials - (s["counted"] + s["WAITING"] + s["RUNNING"])
        search = open_study(spec, storage, cell, "search")
        for params in next_points(spec, cell, search, missing):
            search.enqueue_trial(params, skip_if_exists=False)
        if s["counted"] < spec.trials:
            continue
        best = best_trial(spec, search)
        r = row.replicate
        have = r["counted"] + r["WAITING"] + r["RUNNING"]
        if best is None or have >= spec.replicates:
            continue
        replicate = open_study(spec, storage, cell, "replicate")
        for k in range(have, spec.replicates):
            replicate.enqueue_trial(best.params, user_attrs={"replicate": k, "source_trial": best.number},
                                    skip_if_exists=False)


def grid_points(cell: Cell) -> list[dict]:
    """Every combination of a categorical search space, in study-file order."""
    names = [name for name, _ in cell.search_space]
    return [dict(zip(names, combo)) for combo in itertools.product(*(p.choices for _, p in cell.search_space))]


def next_points(spec: Spec, cell: Cell, study: optuna.Study, n: int) -> list[dict]:
    """Fixed params of the next ``n`` trials to enqueue: ``{}`` (the sampler decides), or with the grid
    sampler the first grid points no counted, waiting or running trial holds (an interrupted trial's
    point comes back)."""
    if n <= 0:
        return []
    if spec.sampler != "grid":
        return [{}] * n
    taken = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(deepcopy=False)
             if counted(t) or t.state in (TrialState.WAITING, TrialState.RUNNING)]
    return [p for p in grid_points(cell) if p not in taken][:n]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(spec: Spec, storage, client, exp_id: str, stale_after: float, all_local_dead: bool = False) -> int:
    """Close trials whose worker is gone: a local pid that no longer exists (or every local trial
    when ``all_local_dead``), or a heartbeat older than ``stale_after`` seconds. Returns how many."""
    host, now, n = socket.gethostname(), time.time(), 0
    for cell in cells(spec):
        for kind in KINDS:
            try:
                study = open_study(spec, storage, cell, kind)
            except KeyError:
                continue
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                worker = t.user_attrs.get("worker", "")
                whost, _, pid = worker.rpartition(":")
                local = whost == host
                beat = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
                if local and (all_local_dead or not pid.isdigit() or not _alive(int(pid))):
                    reason = f"worker {worker or '?'} died"
                elif now - beat > stale_after:
                    reason = f"no heartbeat from worker {worker or '?'} for {now - beat:.0f} s"
                else:
                    continue
                n += interrupt(storage, client, t._trial_id, t.user_attrs.get("mlflow_run_id"), reason)
    reconcile_runs(storage, client, exp_id)
    return n


def interrupt(storage, client, trial_id: int, run_id: str | None, reason: str) -> bool:
    """Close a RUNNING trial as interrupted (FAIL, not counted) and its MLflow run as KILLED."""
    storage.set_trial_user_attr(trial_id, "interrupted", reason)
    try:
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it ended meanwhile; nothing to close
    if run_id:
        client.set_tag(run_id, "rnnbench.interrupted", reason)
        client.set_terminated(run_id, "KILLED")
    return True


def reconcile_runs(storage, client, exp_id: str) -> int:
    """End every MLflow trial run still RUNNING whose Optuna trial has ended (a worker can die between
    telling Optuna and closing the run), with the status the trial's state implies."""
    runs = client.search_runs([exp_id], "attributes.status = 'RUNNING' and tags.`rnnbench.role` = 'trial'",
                              max_results=10000)
    fixed = 0
    for run in runs:
        tags = run.data.tags
        study = optuna.load_study(study_name=tags["rnnbench.optuna_study"], storage=storage)
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == int(tags["rnnbench.trial"])), None)
        if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if "interrupted" in trial.user_attrs:
            client.set_tag(run.info.run_id, "rnnbench.interrupted", trial.user_attrs["interrupted"])
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(trial.state, "FAILED")
        if "interrupted" in trial.user_attrs:
            status = "KILLED"
        client.set_terminated(run.info.run_id, status)
        fixed += 1
    return fixed


def finish_parents(spec: Spec, storage, client, rows: list[CellProgress]) -> None:
    """Close each cell's parent run with its summary (best objective, trial counts)."""
    for row in rows:
        study = open_study(spec, storage, row.cell, "search")
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if not run_id:
            continue
        metrics = {f"trials_{k.lower()}": v for k, v in row.search.items() if k in ("COMPLETE", "PRUNED", "FAIL")}
        metrics["replicates_ended"] = row.replicate["counted"]
        if row.best is not None:
            metrics["best_objective"] = row.best
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
        client.set_terminated(run_id, "FINISHED" if row.done(spec) else "KILLED")


# --------------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------------

def cell_tags(spec: Spec, cell: Cell) -> dict[str, str]:
    return {"rnnbench.study": spec.name, "rnnbench.cell": cell.key, "rnnbench.task": cell.task,
            "rnnbench.variant": cell.variant.name, "rnnbench.base_variant": cell.variant.variant,
            "rnnbench.ladder": cell.ladder, "rnnbench.ladder_value": str(cell.ladder_value)}


def provenance(spec_sha: str, threads: int) -> dict[str, str]:
    repo = Path(__file__).resolve().parent.parent
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit != "unknown" else False
    versions = {p: _version(p) for p in ("rnnbench", "torch", "optuna", "mlflow")}
    return {"rnnbench.git_commit": commit, "rnnbench.git_dirty": str(dirty).lower(),
            "rnnbench.study_sha256": spec_sha, "rnnbench.torch_threads": str(threads),
            "rnnbench.device": "cpu", "rnnbench.python": platform.python_version(),
            "rnnbench.host": socket.gethostname(),
            **{f"rnnbench.version.{k}": v for k, v in versions.items()}}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def hyperparameters(spec: Spec, cell: Cell, trial: optuna.Trial) -> dict:
    hp = {**spec.model.model_dump(include={"hidden_size", "num_layers", "dropout"}),
          **spec.train.model_dump(include={"lr", "batch_size", "grad_clip", "weight_decay"})}
    hp.update(suggest(trial, cell))
    return hp


def hidden_size(spec: Spec, cell: Cell, task, hp: dict) -> int:
    if spec.model.match == "width":
        return int(hp["hidden_size"])
    rnn_in = min(task.input_size, EMBED_MAX) if task.input_kind == "tokens" else task.input_size
    return hidden_for_param_budget(cell.variant.variant, rnn_in, spec.model.param_budget,
                                   num_layers=int(hp["num_layers"]), output_size=task.output_size,
                                   **cell.variant.switches)


class Worker:
    def __init__(self, spec: Spec, spec_sha: str, store: Store, threads: int = 1):
        self.spec, self.store = spec, store
        torch.set_num_threads(threads)
        self.storage = store.optuna_storage()
        self.client = store.mlflow_client()
        self.exp_id = store.experiment_id(self.client, spec.name)
        self.provenance = provenance(spec_sha, threads)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.cells = cells(spec)
        self.eval_sets = {}
        self.bookkeeping_seconds = self.claim_seconds = 0.0

    def run(self, poll: float = 1.0) -> int:
        """Claim and run trials until every cell is done. Returns the number of trials run."""
        while not self.prepared():  # a worker on another machine may start before the launcher
            time.sleep(poll)
        ran = 0
        while True:
            self.bookkeeping_seconds = 0.0  # the claim's share is the trial's
            job = self.next_trial()
            self.claim_seconds = self.bookkeeping_seconds
            if job is not None:
                self.run_trial(*job)
                ran += 1
                continue
            if all(row.done(self.spec) for row in progress(self.spec, self.storage)):
                return ran
            time.sleep(poll)  # the launcher enqueues replicate runs once a cell's search has ended

    def prepared(self) -> bool:
        if self.exp_id is None:
            self.exp_id = self.store.experiment_id(self.client, self.spec.name)
        return (self.exp_id is not None and
                self.client.get_experiment(self.exp_id).tags.get("rnnbench.prepared") == "true")

    def next_trial(self):
        for kind in KINDS:
            for cell in self.cells:
                study = open_study(self.spec, self.storage, cell, kind)
                # A sampler seeded per trial: the same study file gives the same suggestions however
                # the trials were spread over workers.
                with self.bookkeeping():
                    trial = claim(study, partial(self.sampler_for, cell) if kind == "search" else None)
                if trial is not None:
                    return cell, kind, study, trial
        return None

    @contextmanager
    def bookkeeping(self):
        """Count the time spent talking to Optuna and MLflow (logged per run as bookkeeping_seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.bookkeeping_seconds += time.perf_counter() - start

    def sampler_for(self, cell: Cell, number: int) -> optuna.samplers.BaseSampler:
        return make_sampler(self.spec, cell, derive_seed(self.spec.seed, cell.key, "search", number))

    def run_trial(self, cell: Cell, kind: str, study: optuna.Study, trial: optuna.Trial) -> None:
        """Run one claimed trial and close it in Optuna and MLflow, whatever happens inside."""
        spec, client = self.spec, self.client
        started = time.perf_counter()
        with self.bookkeeping():
            trial.set_user_attr("worker", self.name)
            trial.set_user_attr("heartbeat", time.time())
            parent = open_study(spec, self.storage, cell, "search").user_attrs["mlflow_parent_run_id"]
        replicate = trial.user_attrs.get("replicate")
        seed = derive_seed(spec.seed, cell.key, kind, trial.number if replicate is None else replicate)
        tags = {**cell_tags(spec, cell), **self.provenance, "mlflow.parentRunId": parent,
                "rnnbench.role": "trial", "rnnbench.kind": kind, "rnnbench.trial": str(trial.number),
                "rnnbench.optuna_study": study.study_name, "rnnbench.seed": str(seed),
                "rnnbench.study_seed": str(spec.seed), "rnnbench.worker": self.name}
        if replicate is not None:
            tags |= {"rnnbench.replicate": str(replicate), "rnnbench.source_trial": str(trial.user_attrs["source_trial"])}
        name = f"{cell.key}#{trial.number}" + (f" replicate {replicate}" if replicate is not None else "")
        with self.bookkeeping():
            run_id = client.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
        try:
            value = self.train_trial(cell, trial, run_id, seed, probe_gradients=replicate is not None)
            self._end(study, trial, run_id, TrialState.COMPLETE, "FINISHED", value=value)
        except optuna.TrialPruned as e:
            self._end(study, trial, run_id, TrialState.PRUNED, "KILLED", tags={"rnnbench.pruned": str(e)})
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: close the trial as interrupted, then stop
            interrupt(self.storage, client, trial._trial_id, run_id, f"worker {self.name} was stopped")
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # The launcher reaped this trial while it ran (no heartbeat for --stale-after seconds, e.g. a
            # remote worker between two slow evaluations): it is closed as interrupted and replaced.
            # Leave it so; before this, the error handler below raised again and the worker died.
            client.set_terminated(run_id, "KILLED")
        except Exception as e:  # noqa: BLE001 - one trial's error never stops the study
            message = f"{type(e).__name__}: {e}".splitlines()[0][:4000]
            trial.set_user_attr("error", message)
            client.log_text(run_id, traceback.format_exc(), "error.txt")
            self._end(study, trial, run_id, TrialState.FAIL, "FAILED", tags={"rnnbench.error": message})
        finally:
            # Wall time from the claim to the end, and the part of it spent in Optuna and MLflow.
            wall = time.perf_counter() - started + self.claim_seconds
            book, self.bookkeeping_seconds = self.bookkeeping_seconds, 0.0
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric("wall_seconds", wall, ts, 0),
                                              Metric("bookkeeping_seconds", book, ts, 0)])

    def train_trial(self, cell: Cell, trial: optuna.Trial, run_id: str, seed: int, probe_gradients: bool) -> float:
        """Build the model for the trial's hyperparameters, train it, log as it goes; return the objective."""
        spec, client = self.spec, self.client
        task = cell.build_task()
        hp = hyperparameters(spec, cell, trial)
        hidden = hidden_size(spec, cell, task, hp)
        torch.manual_seed(seed)
        model = SequenceModel(task, cell.variant.variant, hidden, int(hp["num_layers"]), float(hp["dropout"]),
                              cell.variant.switches)
        params = {**hp, "hidden_size": hidden, "n_params": count_parameters(model),
                  **{f"task.{k}": v for k, v in task.settings().items()},
                  **{f"switch.{k}": v for k, v in cell.variant.switches.items()},
                  **dict(zip(("solved.metric", "solved.op", "solved.threshold"), task.solved_when)),
                  "steps": spec.train.steps, "seconds": spec.train.seconds, "eval_every": spec.train.eval_every}
        with self.bookkeeping():
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                             metrics=[Metric("baseline", task.baseline, int(time.time() * 1000), 0)])
        cfg = TrainConfig(lr=float(hp["lr"]), steps=spec.train.steps or 10**12, batch_size=int(hp["batch_size"]),
                          eval_every=spec.train.eval_every, grad_clip=hp["grad_clip"],
                          weight_decay=float(hp["weight_decay"]), max_seconds=spec.train.seconds)
        metric = spec.objective.metric
        if cell.key not in self.eval_sets:  # keep one cell's held-out set: workers go cell by cell
            self.eval_sets = {cell.key: task.eval_batch(spec.train.eval_size, spec.seed)}

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            if metric not in metrics:
                raise KeyError(f"objective metric {metric!r} is not reported by task {cell.task} "
                               f"(it reports: {', '.join(metrics)})")
            with self.bookkeeping():
                ts = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
                trial.set_user_attr("heartbeat", time.time())
                trial.report(metrics[metric], step)
                prune = trial.should_prune()
            if prune:
                raise optuna.TrialPruned(f"pruned at step {step} ({metric} {metrics[metric]:.4g})")

        # Replicate runs record the vanishing-gradient picture before and after training.
        probe = task.eval_batch(GRAD_PROBE_SIZE, spec.seed + 1) if probe_gradients else None
        grads = {"init": gradient_by_lag(task, model, probe)} if probe is not None else {}
        result = train(task, model, cfg, self.eval_sets[cell.key], seed, on_eval)
        if probe is not None:
            grads["trained"] = gradient_by_lag(task, model, probe)
            with self.bookkeeping():
                client.log_dict(run_id, grads, "grad_by_lag.json")
        value = result.metrics[metric]
        if not math.isfinite(value):
            raise Divergence(f"objective {metric} is {value}")
        summary = {"objective": value, "train_seconds": result.seconds, "steps_done": result.steps,
                   "seconds_per_step": result.seconds / max(result.steps, 1)}
        with self.bookkeeping():
            client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), result.steps)
                                              for k, v in summary.items()])
        return value

    def _end(self, study, trial, run_id, state, status, value=None, tags=None):
        with self.bookkeeping():
            self._close(study, trial, run_id, state, status, value, tags)

    def _close(self, study, trial, run_id, state, status, value, tags):
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, v)
        try:
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            # The launcher reaped this trial (a missed heartbeat): it is already closed as interrupted.
            status = "KILLED"
        self.client.set_terminated(run_id, status)


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_worker(spec: Spec, spec_sha: str, store: Store, threads: int = 1, poll: float = 1.0) -> int:
    """A worker process's life: run trials until the study is done; on SIGTERM close the trial in hand."""
    signal.signal(signal.SIGTERM, _stop)
    return Worker(spec, spec_sha, store, threads).run(poll)


# --------------------------------------------------------------------------------------------------
# Launching workers
# --------------------------------------------------------------------------------------------------

def worker_command(spec_path: Path, store: Store, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "rnnbench", "worker", str(spec_path), "--root", str(store.root),
           "--threads", str(threads)]
    if store.storage_url:
        cmd += ["--storage", store.storage_url]
    if store.tracking:
        cmd += ["--tracking-uri", store.tracking]
    return cmd


def run_study(spec: Spec, spec_path: Path, spec_sha: str, store: Store, workers: int = 1, threads: int = 1,
              stale_after: float = 900.0, on_progress=None, poll: float = 1.0) -> list[CellProgress]:
    """Prepare the study, start ``workers`` worker processes, keep the queue topped up, wait for the end.

    ``on_progress(rows)`` is called every ``poll`` seconds. Returns the final progress rows.
    """
    lock_fd = store.lock()
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _stop)  # SIGTERM stops the workers too, like Ctrl-C
    try:
        if not store.distributed:
            store.repair_journal()
        storage, client = store.optuna_storage(), store.mlflow_client()
        exp_id = prepare(spec, spec_path.read_text(), store, storage, client)
        # The lock is ours, so no local worker of an earlier run is alive: their RUNNING trials are stale.
        reap(spec, storage, client, exp_id, stale_after, all_local_dead=not store.distributed)
        top_up(spec, storage)
        logs = store.logs_dir()
        restarts = 0

        def start(i):
            log = open(logs / f"worker-{i}.log", "ab")
            return subprocess.Popen(worker_command(spec_path, store, threads), stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(lock_fd,), env={**os.environ, "PYTHONUNBUFFERED": "1"})

        procs = [start(i) for i in range(workers)]
        last_reap = time.monotonic()
        while True:
            rows = progress(spec, storage)
            if on_progress:
                on_progress(rows)
            if all(r.done(spec) for r in rows) and all(p.poll() is not None for p in procs):
                break
            for i, p in enumerate(procs):
                if p.poll() is not None and not all(r.done(spec) for r in rows):
                    if p.returncode != 0:
                        restarts += 1
                        if restarts > 3 * workers:
                            raise RuntimeError(f"workers keep dying; see {logs}/worker-*.log")
                    procs[i] = start(i)
            if time.monotonic() - last_reap > 10 * poll:
                reap(spec, storage, client, exp_id, stale_after)
                last_reap = time.monotonic()
                rows = None  # reaping changed what top_up must see
            top_up(spec, storage, rows)
            time.sleep(poll)
        rows = progress(spec, storage)
        finish_parents(spec, storage, client, rows)
        reconcile_runs(storage, client, exp_id)
        return rows
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        os.close(lock_fd)
        signal.signal(signal.SIGTERM, previous)
