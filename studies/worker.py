"""A worker: claims queued trials of a prepared study and runs them, until every cell is done.

Workers claim queued trials atomically; a standalone worker (not one a launcher started) also enqueues them
when idle (``top_up``, taking turns on a lock with any other), so any number of them, on any machines, share
one queue and the counts stay exact. A worker started by a launcher (``RNNBENCH_LAUNCHER_PID``) dies with it:
the kernel sends it SIGTERM when the launcher goes (Linux), and it checks between evaluations too; either way
it closes its trial in hand as interrupted and exits, freeing the root's lock.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
import torch
from mlflow.entities import Metric, Param, RunTag
from optuna.trial import FrozenTrial, TrialState

from studies import queue
from studies.crash import crash_point
from studies.launcher import LAUNCHER_PID, finish, ignore_signal, reap, stop, stop_failing, store_calls, top_up
from studies.spec import Cell, Spec, cells
from studies.store import Store, StoreUnavailable, tracking_lost
from studies.tracking import cell_tags, close_run, provenance, run_name
from studies.population import Member, PopulationSpec, member_models, population_size, train_population
from studies.training import (GRAD_PROBE_SIZE, Divergence, TrainConfig, batch_to, device_name, gradient_by_lag,
                              optimizer_name, resolve_device, train)
from variants import count_parameters


@dataclass
class Job:
    """A claimed trial on its way: its Optuna trial, its MLflow run, its seed."""
    cell: Cell
    kind: str
    study: optuna.Study
    frozen: FrozenTrial
    trial: optuna.Trial
    run_id: str
    seed: int


class LauncherGone(KeyboardInterrupt):
    """The launcher that started this worker is gone."""


def make_sampler(spec: Spec, cell: Cell, slot: int) -> optuna.samplers.BaseSampler:
    seed = queue.derive_seed(spec.seed, cell.key, "search", slot)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "qmc":  # categorical parameters, which QMC cannot draw, are drawn at random
        return queue.SlotQMCSampler(slot, distributions(cell), seed=queue.derive_seed(spec.seed, cell.key),
                                    scramble=True, independent_sampler=optuna.samplers.RandomSampler(seed),
                                    warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed)  # random; grid trials come with every parameter fixed


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=spec.train.eval_every)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.train.eval_every,
                                              max_resource=spec.train.steps or "auto")
    return optuna.pruners.NopPruner()


def distributions(cell: Cell) -> dict[str, BaseDistribution]:
    """The cell's search space as Optuna distributions."""
    out: dict[str, BaseDistribution] = {}
    for name, p in cell.search_space:
        if p.type == "float":
            out[name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            out[name] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[name] = CategoricalDistribution(p.choices)
    return out


def suggest(trial: optuna.Trial, cell: Cell) -> dict:
    out = {}
    for name, d in distributions(cell).items():
        if isinstance(d, FloatDistribution):
            out[name] = trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, IntDistribution):
            out[name] = trial.suggest_int(name, d.low, d.high, log=d.log, step=d.step)
        else:
            out[name] = trial.suggest_categorical(name, d.choices)
    return out


def hyperparameters(spec: Spec, cell: Cell, trial: optuna.Trial) -> dict:
    hp = {**cell.model.model_dump(include={"hidden_size", "num_layers", "dropout"}),
          **spec.train.model_dump(include={"lr", "batch_size", "grad_clip", "weight_decay", "optimizer", "momentum",
                                           "nesterov"})}
    hp.update(suggest(trial, cell))
    if hp["optimizer"] != "sgd":  # momentum and Nesterov are SGD's: the run records what it trained with, none
        hp.update(momentum=0.0, nesterov=False)
    if int(hp["num_layers"]) == 1:  # dropout acts between stacked layers: one layer trains with none
        hp["dropout"] = 0.0
    return hp


class Worker:
    def __init__(self, spec: Spec, spec_sha: str, store: Store, threads: int = 1, stale_after: float = 900.0,
                 device: str = "auto", worker_id: str | None = None):
        self.spec, self.store, self.stale_after = spec, store, stale_after
        self.device = resolve_device(device)
        torch.set_num_threads(threads)
        self.storage = store.optuna_storage()
        self.client = store.mlflow_client()
        self.exp_id = store.experiment_id(self.client, spec.name)
        self.provenance = {**provenance(spec_sha, threads), "rnnbench.device": device_name(self.device)}
        # host:pid. A reaper on the same host closes the trials of a dead pid at once; a --worker-id other
        # than the hostname (containers that share one) leaves them to the heartbeat rule.
        self.name = f"{worker_id or socket.gethostname()}:{os.getpid()}"
        self.launcher = int(os.environ.get(LAUNCHER_PID, 0)) or None
        self.cells = cells(spec)
        self.eval_sets = {}
        self.bookkeeping_seconds = self.claim_seconds = 0.0

    def run(self, poll: float = 1.0) -> int:
        """Claim and run trials until every cell is done. Returns the number of trials run.

        With nothing to claim, a worker keeps the queue itself (what the launcher does: enqueue free
        slots and replicate runs, reap dead workers' trials; safe with any number of processes doing
        it at once, see ``studies.queue``), so a study goes on while its launcher is down. The first to
        see the study done closes the cells' parent runs if no launcher has."""
        waited = told = False
        while True:
            in_mlflow = self.prepared()
            if in_mlflow and queue.check_fingerprints(self.spec, self.storage):
                break
            self.check_launcher()
            if not waited:
                print(f"waiting for study {self.spec.name!r} to be prepared in {self.store.tracking_uri} "
                      "(by `rnnbench run` with the same study file, store and --set)", flush=True)
                waited = True
            if in_mlflow and not told:  # MLflow has it, this worker's Optuna storage lacks a cell of its file
                where = self.store.storage_url.split("@")[-1] if self.store.storage_url else self.store.journal
                print(f"note: MLflow has study {self.spec.name!r} prepared, but the Optuna storage {where} holds "
                      "not every cell of this study file (yet): if this worker's --storage or study file is not "
                      "the coordinator's, stop it and give it the coordinator's", flush=True)
                told = True
            time.sleep(poll)  # a worker on another machine may start before the launcher
        ran, idle = 0, 0
        while True:
            self.check_launcher()
            self.bookkeeping_seconds = 0.0  # the claim's share is the trial's
            job = self.next_trial()
            self.claim_seconds = self.bookkeeping_seconds
            if job is not None:
                ran, idle = ran + self.run_trial(*job), 0
                continue
            rows = queue.progress(self.spec, self.storage)
            if all(row.done() for row in rows):
                if self.launcher is None:
                    finish(self.spec, self.storage, self.client, self.exp_id, only_running=True)
                return ran
            if self.launcher is None and idle % 10 == 0:
                with self.bookkeeping():
                    reap(self.spec, self.storage, self.client, self.exp_id, self.stale_after)
                    rows = stop_failing(self.spec, self.storage, queue.progress(self.spec, self.storage))
                    top_up(self.spec, self.storage, rows)
            idle += 1
            time.sleep(poll)

    def check_launcher(self) -> None:
        if self.launcher is not None and os.getppid() != self.launcher:
            raise LauncherGone(f"launcher {self.launcher} is gone")

    def prepared(self) -> bool:
        if self.exp_id is None:
            self.exp_id = self.store.experiment_id(self.client, self.spec.name)
        return (self.exp_id is not None and
                self.client.get_experiment(self.exp_id).tags.get("rnnbench.prepared") == "true")

    def next_trial(self):
        """Claim a trial: search trials of a generation whose predecessors have ended, else replicate runs."""
        generation = queue.generation_ready(self.spec.generation)
        for kind in queue.KINDS:
            for cell in self.cells:
                with self.bookkeeping():
                    study = queue.open_study(self.storage, queue.optuna_name(self.spec, cell, kind))
                    alike = queue.not_failing_alike(study)  # a cell about to be stopped: take no more of it
                    ready = (lambda t, ts: generation(t, ts) and alike(t, ts)) if kind == "search" else None
                    frozen = queue.claim(study, ready) if ready else queue.claim(study)
                if frozen is not None:
                    crash_point("worker.claimed")
                    return cell, kind, study, frozen
        return None

    @contextmanager
    def bookkeeping(self):
        """Talk to Optuna and MLflow: the time is counted (logged per run as bookkeeping_seconds), and a stop
        signal arriving meanwhile takes effect when the talk is done (``launcher.store_calls``)."""
        start = time.perf_counter()
        try:
            with store_calls():
                yield
        finally:
            self.bookkeeping_seconds += time.perf_counter() - start

    def run_trial(self, cell: Cell, kind: str, study: optuna.Study, frozen) -> int:
        """Run a claimed trial and close it in Optuna and MLflow, whatever happens inside; a replicate
        run takes more replicate runs of its cell along where they train as one population. Returns
        how many trials ran."""
        started = time.perf_counter()
        jobs = [self.open_job(cell, kind, study, frozen)]
        size = self.population_size(jobs[0])
        same = (queue.generation_ready(self.spec.generation) if kind == "search"  # trials of one configuration
                else lambda t, ts: queue.source(t) == queue.source(frozen))
        while len(jobs) < size:
            with self.bookkeeping():
                more = queue.claim(study, same)
            if more is None:
                break
            jobs.append(self.open_job(cell, kind, study, more))
        try:
            try:
                outcomes = self.train_jobs(jobs, population=size > 1)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one trial's error never stops the study
                if lost_store(e):  # not the trial's fault: leave it RUNNING, to be reaped and run again
                    raise
                outcomes = [e] * len(jobs)
            for job, outcome in zip(jobs, outcomes):
                self.settle(job, outcome)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, launcher gone: close the trials as interrupted, stop
            reason = f"worker {self.name} was stopped" + (f" ({e})" if isinstance(e, LauncherGone) else "")
            for job in jobs:
                if queue.interrupt(self.storage, queue.trial_id(job.frozen), reason):
                    close_run(self.client, job.run_id, TrialState.FAIL, reason)
            raise
        finally:
            # Wall time from the claim to the end, and the part of it spent in Optuna and MLflow.
            wall = time.perf_counter() - started + self.claim_seconds
            book, self.bookkeeping_seconds = self.bookkeeping_seconds, 0.0
            ts = int(time.time() * 1000)
            lost = sys.exc_info()[1] is not None and lost_store(sys.exc_info()[1])
            for job in ([] if lost else jobs):  # a lost server: no second round of MLflow's retries
                self.client.log_batch(job.run_id, metrics=[Metric("wall_seconds", wall, ts, 0),
                                                           Metric("bookkeeping_seconds", book / len(jobs), ts, 0)])
        return len(jobs)

    def open_job(self, cell: Cell, kind: str, study: optuna.Study, frozen) -> Job:
        """Record this worker on a claimed trial and open its MLflow run."""
        spec, storage = self.spec, self.storage
        slot, trial_id = queue.slot(frozen), queue.trial_id(frozen)
        with self.bookkeeping():
            queue.record(storage, trial_id, self.name, time.time())
            crash_point("worker.recorded")
            parent = queue.open_study(storage, queue.optuna_name(spec, cell, "search")).user_attrs["mlflow_parent_run_id"]
            if kind == "search":
                trial = queue.start(study, frozen, make_sampler(spec, cell, slot), make_pruner(spec), spec.generation)
            else:
                trial = queue.start(study, frozen)
        seed = queue.derive_seed(spec.seed, cell.key, kind, slot)
        tags = {**cell_tags(spec, cell), **self.provenance, "mlflow.parentRunId": parent,
                "rnnbench.role": "trial", "rnnbench.kind": kind, "rnnbench.trial": str(frozen.number),
                "rnnbench.slot": str(slot), "rnnbench.optuna_study": study.study_name, "rnnbench.seed": str(seed),
                "rnnbench.study_seed": str(spec.seed), "rnnbench.worker": self.name}
        if kind == "replicate":
            tags |= {"rnnbench.replicate": str(slot), "rnnbench.source_trial": str(queue.source(frozen))}
        with self.bookkeeping():
            run_id = self.client.create_run(self.exp_id, run_name=run_name(cell, kind, slot), tags=tags).info.run_id
            crash_point("worker.run_created")
            queue.set_attr(storage, trial_id, "mlflow_run_id", run_id)
        return Job(cell, kind, study, frozen, trial, run_id, seed)

    def population_size(self, job: Job) -> int:
        """How many trials to train with this one as a population (1: alone): see ``population_size``."""
        hp = hyperparameters(self.spec, job.cell, job.trial)

        def member() -> PopulationSpec:
            return PopulationSpec(job.cell.variant.variant, job.cell.switches(hp),
                                  job.cell.hidden_size(job.cell.build_task(), hp), int(hp["num_layers"]),
                                  float(hp["dropout"]))
        return population_size(self.spec.train.pooled, job.kind, {name for name, _ in job.cell.search_space},
                               member, self.device)

    def train_jobs(self, jobs: list[Job], population: bool = False) -> list:
        """Build the model(s) for the trials' hyperparameters, train, log as it goes. Returns each trial's
        outcome: its objective, or the exception that ended it (a population's members fail alone)."""
        spec = self.spec
        cell = jobs[0].cell
        task = cell.build_task()
        hps = [hyperparameters(spec, cell, job.trial) for job in jobs]
        hp = hps[0]  # replicate runs share every hyperparameter
        switches = cell.switches(hp)  # the entry's, and those the search drew (Optuna name switches.NAME)
        hidden = cell.hidden_size(task, hp)
        layers, dropout = int(hp["num_layers"]), float(hp["dropout"])
        cfg = TrainConfig(lr=float(hp["lr"]), steps=spec.train.steps or 10**12, batch_size=int(hp["batch_size"]),
                          eval_every=spec.train.eval_every, grad_clip=hp["grad_clip"],
                          weight_decay=float(hp["weight_decay"]), max_seconds=spec.train.seconds,
                          optimizer=optimizer_name(hp), momentum=float(hp["momentum"]))
        if cell.key not in self.eval_sets:  # keep one cell's held-out set: workers go cell by cell
            self.eval_sets = {cell.key: batch_to(task.eval_batch(spec.train.eval_size, spec.seed), self.device)}
        models = member_models(task, PopulationSpec(cell.variant.variant, switches, hidden, layers, dropout),
                               [job.seed for job in jobs])  # each exactly as a run alone builds it
        group = f"{jobs[0].study.study_name}#{jobs[0].frozen.number}x{len(jobs)}" if len(jobs) > 1 else None
        for job, job_hp, model in zip(jobs, hps, models):
            self.log_params(job, task, job_hp, hidden, switches, count_parameters(model), group)
        # Replicate runs record the vanishing-gradient picture before and after training.
        probe = (batch_to(task.eval_batch(GRAD_PROBE_SIZE, spec.seed + 1), self.device)
                 if jobs[0].kind == "replicate" else None)
        init = [gradient_by_lag(task, m.to(self.device), probe) if probe is not None else None for m in models]
        if not population:
            result = train(task, models[0], cfg, self.eval_sets[cell.key], jobs[0].seed, self.on_eval(jobs[0]),
                           device=self.device)
            return [self.record_result(jobs[0], task, result, models[0], probe, init[0])]
        callbacks = [self.on_eval(job) for job in jobs]
        members = [Member(job.seed, float(h["lr"]), h["grad_clip"], float(h["weight_decay"])) for job, h in zip(jobs, hps)]
        # A member's numbers do not depend on its companions, but a population of one computes the last bit
        # differently from one of two or more: a lone member gets a twin (its results unused), so that a
        # replicate's numbers are the same however the runs were grouped (by timing, interruptions).
        twin = members[:1] if len(members) == 1 else []
        results = train_population(task, PopulationSpec(cell.variant.variant, switches, hidden, layers, dropout),
                                   members + twin, cfg, self.eval_sets[cell.key],
                                   lambda j, step, m: callbacks[j](step, m) if j < len(jobs) else None,
                                   device=self.device)[:len(jobs)]
        outcomes = []
        for job, r, before in zip(jobs, results, init):
            try:
                if r.error is not None:
                    raise r.error
                outcomes.append(self.record_result(job, task, r, r.model, probe, before))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - this member's own failure
                outcomes.append(e)
        return outcomes

    def log_params(self, job: Job, task, hp: dict, hidden: int, switches: dict, n_params: int, group: str | None):
        spec = self.spec
        params = {**{k: v for k, v in hp.items() if not k.startswith("switches.")},
                  "hidden_size": hidden, "n_params": n_params,
                  **{f"task.{k}": v for k, v in task.settings().items()},
                  **{f"switch.{k}": v for k, v in switches.items()},
                  **dict(zip(("solved.metric", "solved.op", "solved.threshold"), task.solved_when)),
                  "steps": spec.train.steps, "seconds": spec.train.seconds, "eval_every": spec.train.eval_every}
        if job.cell.capacity:  # a capacity ladder: the cell's value (model.hidden_size or model.param_budget)
            params[f"model.{job.cell.capacity}"] = job.cell.capacity_value
        # with the SHA-256 of each module the study file imports (its own cells, tasks)
        tags = {**spec.import_tags, **({"rnnbench.population": group} if group else {})}
        with self.bookkeeping():
            self.client.log_batch(job.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                                  metrics=[Metric("baseline", task.baseline, int(time.time() * 1000), 0)],
                                  tags=[RunTag(k, v) for k, v in tags.items()])

    def on_eval(self, job: Job):
        """The callback a training run calls at each evaluation: log, heartbeat, report, maybe prune."""
        metric, trial = self.spec.objective.metric, job.trial

        def callback(step: int, metrics: dict[str, float]) -> None:
            if metric not in metrics:
                raise KeyError(f"objective metric {metric!r} is not reported by task {job.cell.task} "
                               f"(it reports: {', '.join(metrics)})")
            crash_point("worker.training")
            self.check_launcher()
            with self.bookkeeping():
                ts = int(time.time() * 1000)
                self.client.log_batch(job.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
                queue.set_attr(self.storage, queue.trial_id(job.frozen), "heartbeat", time.time())
                trial.report(metrics[metric], step)
                prune = trial.should_prune()
            if prune:
                raise optuna.TrialPruned(f"pruned at step {step} ({metric} {metrics[metric]:.4g})")
        return callback

    def record_result(self, job: Job, task, result, model, probe, init_grads) -> float:
        """Log a finished run's gradient probe and summary; return its objective."""
        if probe is not None:
            grads = {"init": init_grads, "trained": gradient_by_lag(task, model, probe)}
            with self.bookkeeping():
                self.client.log_dict(job.run_id, grads, "grad_by_lag.json")
        metric = self.spec.objective.metric
        value = result.metrics[metric]
        if not math.isfinite(value):
            raise Divergence(f"objective {metric} is {value}")
        own = result.seconds if result.own_seconds is None else result.own_seconds  # a population member's share
        summary = {"objective": value, "train_seconds": result.seconds, "steps_done": result.steps,
                   "seconds_per_step": own / max(result.steps, 1)}
        with self.bookkeeping():
            self.client.log_batch(job.run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), result.steps)
                                                       for k, v in summary.items()])
        return value

    def settle(self, job: Job, outcome) -> None:
        """Close a trial with its outcome: an objective, a pruning, or the error that failed it."""
        if isinstance(outcome, float):
            crash_point("worker.before_tell")
            self._end(job, TrialState.COMPLETE, value=outcome)
        elif isinstance(outcome, optuna.TrialPruned):
            self._end(job, TrialState.PRUNED, tags={"rnnbench.pruned": str(outcome)})
        else:
            message = f"{type(outcome).__name__}: {outcome}".splitlines()[0][:4000]
            with self.bookkeeping():
                queue.set_attr(self.storage, queue.trial_id(job.frozen), "error", message)
                self.client.log_text(job.run_id, "".join(traceback.format_exception(outcome)), "error.txt")
            self._end(job, TrialState.FAIL, tags={"rnnbench.error": message})

    def _end(self, job: Job, state, value=None, tags=None):
        """Tell Optuna, then mirror the state the trial really has in MLflow (the launcher may have
        reaped it as interrupted meanwhile: a missed heartbeat)."""
        with self.bookkeeping():
            for k, v in (tags or {}).items():
                self.client.set_tag(job.run_id, k, v)
            state = queue.end(job.study, job.trial, state, value)
            crash_point("worker.told")
            frozen = queue.get_trial(self.storage, queue.trial_id(job.frozen))
            close_run(self.client, job.run_id, state,
                      frozen.user_attrs.get("interrupted") if queue.interrupted(frozen) else None)


def lost_store(error: BaseException) -> bool:
    """Whether an error is a store that stopped answering (after its retries), not the trial's doing."""
    return isinstance(error, StoreUnavailable) or tracking_lost(error)


def _stop(signum, frame):
    """Stop at the first SIGTERM or SIGINT (KeyboardInterrupt: the trial in hand is closed as interrupted), at
    once, or inside ``Worker.bookkeeping`` when the store call is done; ignore the signals after it: Ctrl-C
    (SIGINT to the process group) or ``timeout`` (SIGTERM to it) is followed by the launcher's own SIGTERM,
    which must not cut short the closing of the trial in hand."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, ignore_signal)
    stop(signum, frame)


def stop_on_signals() -> None:
    """SIGTERM and SIGINT stop the worker (:func:`_stop`), except a signal it was started ignoring: a launcher
    started in the background by a shell script (`rnnbench run ... &`) ignores Ctrl-C, and so do its workers."""
    for s in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, _stop)


def _die_with_launcher(launcher: int) -> None:
    """Ask the kernel for SIGTERM when the launcher dies (Linux), then check it is still alive."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the checks between evaluations still see it
    if os.getppid() != launcher:
        raise LauncherGone(f"launcher {launcher} is gone")


def run_worker(spec: Spec, spec_sha: str, store: Store, threads: int = 1, poll: float = 1.0,
               stale_after: float = 900.0, device: str = "auto", worker_id: str | None = None) -> int:
    """A worker process's life: run trials until the study is done; on SIGTERM close the trial in hand."""
    stop_on_signals()
    launcher = int(os.environ.get(LAUNCHER_PID, 0))
    if launcher:
        _die_with_launcher(launcher)
    return Worker(spec, spec_sha, store, threads, stale_after, device, worker_id).run(poll)
