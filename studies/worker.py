"""A worker: claims queued trials of a prepared study and runs them, until every cell is done.

Workers never create trials (the launcher does), so any number of them, on any machines, share one
queue and the counts stay exact. A worker started by a launcher (``RNNBENCH_LAUNCHER_PID``) dies with
it: the kernel sends it SIGTERM when the launcher goes (Linux), and it checks between evaluations
too; either way it closes its trial in hand as interrupted and exits, freeing the root's lock.
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

import optuna
import torch
from mlflow.entities import Metric, Param
from optuna.trial import TrialState

from studies import queue
from studies.crash import crash_point
from studies.spec import Cell, Spec, cells
from studies.store import Store
from studies.tracking import cell_tags, close_run, provenance
from studies.training import EMBED_MAX, Divergence, SequenceModel, TrainConfig, gradient_by_lag, train
from variants import count_parameters, hidden_for_param_budget

optuna.logging.set_verbosity(optuna.logging.WARNING)

GRAD_PROBE_SIZE = 64  # sequences in the gradient-by-lag probe of replicate runs
LAUNCHER_PID = "RNNBENCH_LAUNCHER_PID"


class LauncherGone(KeyboardInterrupt):
    """The launcher that started this worker is gone."""


def make_sampler(spec: Spec, cell: Cell, slot: int) -> optuna.samplers.BaseSampler:
    seed = queue.derive_seed(spec.seed, cell.key, "search", slot)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "qmc":
        # The first generation has no complete trial to take the search space from: Optuna samples it
        # with the independent sampler, seeded per slot here.
        return queue.SlotQMCSampler(slot, seed=queue.derive_seed(spec.seed, cell.key), scramble=True,
                                    independent_sampler=optuna.samplers.RandomSampler(seed))
    return optuna.samplers.RandomSampler(seed)  # random; grid trials come with every parameter fixed


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=spec.train.eval_every)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.train.eval_every,
                                              max_resource=spec.train.steps or "auto")
    return optuna.pruners.NopPruner()


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


def hyperparameters(spec: Spec, cell: Cell, trial: optuna.Trial) -> dict:
    hp = {**spec.model.model_dump(include={"hidden_size", "num_layers", "dropout"}),
          **spec.train.model_dump(include={"lr", "batch_size", "grad_clip", "weight_decay", "optimizer", "momentum",
                                           "nesterov"})}
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
        self.launcher = int(os.environ.get(LAUNCHER_PID, 0)) or None
        self.cells = cells(spec)
        self.eval_sets = {}
        self.bookkeeping_seconds = self.claim_seconds = 0.0

    def run(self, poll: float = 1.0) -> int:
        """Claim and run trials until every cell is done. Returns the number of trials run."""
        while not (self.prepared() and queue.check_fingerprints(self.spec, self.storage)):
            self.check_launcher()
            time.sleep(poll)  # a worker on another machine may start before the launcher
        ran = 0
        while True:
            self.check_launcher()
            self.bookkeeping_seconds = 0.0  # the claim's share is the trial's
            job = self.next_trial()
            self.claim_seconds = self.bookkeeping_seconds
            if job is not None:
                self.run_trial(*job)
                ran += 1
                continue
            if all(row.done() for row in queue.progress(self.spec, self.storage)):
                return ran
            time.sleep(poll)  # the launcher enqueues replicate runs once a cell's search has ended

    def check_launcher(self) -> None:
        if self.launcher is not None and os.getppid() != self.launcher:
            raise LauncherGone(f"launcher {self.launcher} is gone")

    def prepared(self) -> bool:
        if self.exp_id is None:
            self.exp_id = self.store.experiment_id(self.client, self.spec.name)
        return (self.exp_id is not None and
                self.client.get_experiment(self.exp_id).tags.get("rnnbench.prepared") == "true")

    def next_trial(self):
        ready = {"search": queue.generation_ready(self.spec.generation), "replicate": lambda t, ts: True}
        for kind in queue.KINDS:
            for cell in self.cells:
                with self.bookkeeping():
                    study = queue.open_study(self.storage, queue.optuna_name(self.spec, cell, kind))
                    frozen = queue.claim(study, ready[kind])
                if frozen is not None:
                    crash_point("worker.claimed")
                    return cell, kind, study, frozen
        return None

    @contextmanager
    def bookkeeping(self):
        """Count the time spent talking to Optuna and MLflow (logged per run as bookkeeping_seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.bookkeeping_seconds += time.perf_counter() - start

    def run_trial(self, cell: Cell, kind: str, study: optuna.Study, frozen) -> None:
        """Run one claimed trial and close it in Optuna and MLflow, whatever happens inside."""
        spec, client, storage = self.spec, self.client, self.storage
        started = time.perf_counter()
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
        name = f"{cell.key}#{frozen.number}" + (f" replicate {slot}" if kind == "replicate" else "")
        with self.bookkeeping():
            run_id = client.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
            crash_point("worker.run_created")
            queue.set_attr(storage, trial_id, "mlflow_run_id", run_id)
        try:
            value = self.train_trial(cell, trial, run_id, seed, probe_gradients=kind == "replicate")
            crash_point("worker.before_tell")
            self._end(study, trial, run_id, TrialState.COMPLETE, value=value)
        except optuna.TrialPruned as e:
            self._end(study, trial, run_id, TrialState.PRUNED, tags={"rnnbench.pruned": str(e)})
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, launcher gone: close the trial as interrupted, stop
            reason = f"worker {self.name} was stopped" + (f" ({e})" if isinstance(e, LauncherGone) else "")
            if queue.interrupt(storage, trial_id, reason):
                close_run(client, run_id, TrialState.FAIL, reason)
            raise
        except Exception as e:  # noqa: BLE001 - one trial's error never stops the study
            message = f"{type(e).__name__}: {e}".splitlines()[0][:4000]
            queue.set_attr(storage, trial_id, "error", message)
            client.log_text(run_id, traceback.format_exc(), "error.txt")
            self._end(study, trial, run_id, TrialState.FAIL, tags={"rnnbench.error": message})
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
        switches = cell.switches(hp)  # the entry's, and those the search drew (Optuna name switches.NAME)
        hidden = hidden_size(spec, cell.drawn(hp), task, hp)
        torch.manual_seed(seed)
        model = SequenceModel(task, cell.variant.variant, hidden, int(hp["num_layers"]), float(hp["dropout"]),
                              switches)
        params = {**{k: v for k, v in hp.items() if not k.startswith("switches.")},
                  "hidden_size": hidden, "n_params": count_parameters(model),
                  **{f"task.{k}": v for k, v in task.settings().items()},
                  **{f"switch.{k}": v for k, v in switches.items()},
                  **dict(zip(("solved.metric", "solved.op", "solved.threshold"), task.solved_when)),
                  "steps": spec.train.steps, "seconds": spec.train.seconds, "eval_every": spec.train.eval_every}
        from mlflow.entities import RunTag
        with self.bookkeeping():  # with the SHA-256 of each module the study file imports (its own cells, tasks)
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                             metrics=[Metric("baseline", task.baseline, int(time.time() * 1000), 0)],
                             tags=[RunTag(k, v) for k, v in spec.import_tags.items()])
        optimizer = "nesterov" if hp["optimizer"] == "sgd" and hp["nesterov"] else hp["optimizer"]
        cfg = TrainConfig(lr=float(hp["lr"]), steps=spec.train.steps or 10**12, batch_size=int(hp["batch_size"]),
                          eval_every=spec.train.eval_every, grad_clip=hp["grad_clip"],
                          weight_decay=float(hp["weight_decay"]), max_seconds=spec.train.seconds,
                          optimizer=optimizer, momentum=float(hp["momentum"]))
        metric = spec.objective.metric
        if cell.key not in self.eval_sets:  # keep one cell's held-out set: workers go cell by cell
            self.eval_sets = {cell.key: task.eval_batch(spec.train.eval_size, spec.seed)}
        trial_id = trial._trial_id

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            if metric not in metrics:
                raise KeyError(f"objective metric {metric!r} is not reported by task {cell.task} "
                               f"(it reports: {', '.join(metrics)})")
            crash_point("worker.training")
            self.check_launcher()
            with self.bookkeeping():
                ts = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
                queue.set_attr(self.storage, trial_id, "heartbeat", time.time())
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

    def _end(self, study, trial, run_id, state, value=None, tags=None):
        """Tell Optuna, then mirror the state the trial really has in MLflow (the launcher may have
        reaped it as interrupted meanwhile: a missed heartbeat)."""
        with self.bookkeeping():
            for k, v in (tags or {}).items():
                self.client.set_tag(run_id, k, v)
            state = queue.end(study, trial, state, value)
            crash_point("worker.told")
            frozen = queue.get_trial(self.storage, trial._trial_id)
            close_run(self.client, run_id, state, frozen.user_attrs.get("interrupted") if queue.interrupted(frozen) else None)


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _die_with_launcher(launcher: int) -> None:
    """Ask the kernel for SIGTERM when the launcher dies (Linux), then check it is still alive."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the checks between evaluations still see it
    if os.getppid() != launcher:
        raise LauncherGone(f"launcher {launcher} is gone")


def run_worker(spec: Spec, spec_sha: str, store: Store, threads: int = 1, poll: float = 1.0) -> int:
    """A worker process's life: run trials until the study is done; on SIGTERM close the trial in hand."""
    signal.signal(signal.SIGTERM, _stop)
    launcher = int(os.environ.get(LAUNCHER_PID, 0))
    if launcher:
        _die_with_launcher(launcher)
    return Worker(spec, spec_sha, store, threads).run(poll)
