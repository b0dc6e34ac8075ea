"""The launcher (`rnnbench run`): prepares a study, keeps its queue full, supervises workers.

* It creates trials: :func:`top_up` enqueues one WAITING trial for every free slot of a cell (see
  ``studies.queue``), and once a cell's search has ended, its best trial's replicate runs. Workers started
  without a launcher top up too, taking turns with it.
* It reaps trials whose worker is gone (:func:`reap`): a dead local process, a trial claimed but
  never recorded, a remote worker silent for ``--stale-after`` seconds. Their slots are enqueued again.
* It starts ``--workers`` worker processes, restarts one that dies, and stops them on Ctrl-C or
  SIGTERM; they stop by themselves if the launcher is killed.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from studies import queue
from studies.crash import crash_point
from studies.spec import Cell, Spec
from studies.store import Store, pid_alive
from studies.tracking import (check_trials_kept, close_run, describe_experiment, finish_parents, parent_runs,
                              reconcile_runs)

CLAIM_GRACE = 60.0  # seconds a claimed trial may go without its worker recorded on it
START_GRACE = 2.0  # the same, for a launcher starting on the embedded store
LAUNCHER_PID = "RNNBENCH_LAUNCHER_PID"  # set in the environment of the workers a launcher starts


class WorkersDying(RuntimeError):
    """The launcher's workers keep dying (more than 3 restarts per worker)."""


class JournalLost(RuntimeError):
    """The embedded store's journal was deleted or replaced while the study ran."""


def _check_journal(store: Store, journal: tuple[int, int] | None) -> None:
    if journal is not None and store.journal_id() != journal:
        raise JournalLost(f"{store.journal} was deleted or replaced while the study ran: stopped. The trials only "
                          f"it recorded are gone (their MLflow runs stay); put the file back, or start again with "
                          f"a fresh --root")


def prepare(spec: Spec, spec_text: str, store: Store, storage, client) -> tuple[str, dict[str, str], list[str]]:
    """Create (or check) every cell's Optuna studies and MLflow parent run before workers start.
    Returns the MLflow experiment id, each cell's parent run id, and the cells of this study's name that
    ``spec`` does not name (run by another study file of the same name; its reports show them too)."""
    # checks every cell before writing to MLflow
    recorded = queue.prepare_studies(spec, storage, shared=store.distributed)
    exp_id = store.experiment_id(client, spec.name, create=True)
    check_trials_kept(storage, client, exp_id, spec.name)
    describe_experiment(client, exp_id, spec, spec_text)
    parents, others = parent_runs(client, exp_id, spec, recorded)
    queue.record_parents(spec, storage, parents)
    client.set_experiment_tag(exp_id, "rnnbench.prepared", "true")
    return exp_id, parents, others


def grid_point(spec: Spec, cell: Cell, slot: int) -> dict:
    """The grid point of a slot: the grid's points in a seeded random order, so that fewer trials than
    points sample the grid evenly rather than its first rows."""
    names = [name for name, _ in cell.search_space]
    points = [dict(zip(names, combo)) for combo in itertools.product(*(p.choices for _, p in cell.search_space))]
    random.Random(queue.derive_seed(spec.seed, cell.key, "grid")).shuffle(points)
    return points[slot]


def free(spec: Spec, row: queue.CellProgress) -> tuple[list[int], list[int]]:
    """A cell's free search slots, and, once its search has ended, its best trial's free replicate slots."""
    if row.stopped is not None:
        return [], []
    search = queue.free_slots(row.search_trials, spec.trials)
    if not row.search_done or row.best is None:
        return search, []
    return search, queue.free_slots(row.replicate_trials, spec.replicates, row.best.number)


def top_up(spec: Spec, storage, rows: list[queue.CellProgress] | None = None) -> None:
    """Enqueue a trial for every free slot (:func:`free`). ``rows``: this moment's progress, if known. The
    launcher and launcher-less workers may top up at once: they take turns (``queue.exclusive``), each reading
    the cells it would fill afresh under the lock, so none fills a slot another has just filled."""
    rows = queue.progress(spec, storage) if rows is None else rows
    wanting = [row.cell for row in rows if any(free(spec, row))]
    if not wanting:
        return
    with queue.exclusive(storage, f"rnnbench top-up {spec.name}"):
        for row in queue.progress(spec, storage, wanting):
            cell = row.cell
            search_slots, replicate_slots = free(spec, row)
            if search_slots:
                search = queue.open_study(storage, queue.optuna_name(spec, cell, "search"))
                for slot in search_slots:
                    queue.enqueue(search, slot, grid_point(spec, cell, slot) if spec.sampler == "grid" else None)
                    crash_point("launcher.enqueued_search")
            if replicate_slots:
                replicate = queue.open_study(storage, queue.optuna_name(spec, cell, "replicate"))
                for slot in replicate_slots:
                    queue.enqueue(replicate, slot, row.best.params, source_trial=row.best.number)
                    crash_point("launcher.enqueued_replicate")


def stop_failing(spec: Spec, storage, rows: list[queue.CellProgress]) -> list[queue.CellProgress]:
    """Stop every cell whose first trials all failed alike (``queue.stop_reason``); returns the rows,
    those cells marked stopped."""
    for row in rows:
        reason = queue.stop_reason(row)
        if reason is not None:
            queue.stop(spec, storage, row, reason)
        elif row.stopped is not None and any(t.state == queue.TrialState.WAITING for t in row.search_trials):
            queue.stop(spec, storage, row, row.stopped)  # a stop cut short (kill -9): close what it left
    return rows


def why_dead(t, host: str, now: float, stale_after: float, claim_grace: float) -> str | None:
    """Why a RUNNING trial's worker must be taken as gone, or None if it may be alive."""
    if "interrupted" in t.user_attrs:  # a reaper died between marking and closing it
        return t.user_attrs["interrupted"]
    worker = t.user_attrs.get("worker")
    started = t.datetime_start.timestamp() if t.datetime_start else now
    if worker is None:  # a worker records itself right after claiming: milliseconds
        if now - started > claim_grace:
            return f"claimed {now - started:.0f} s ago by a worker that never recorded itself"
        return None
    whost, _, pid = worker.rpartition(":")
    if whost == host and (not pid.isdigit() or not pid_alive(int(pid))):
        return f"worker {worker} died"
    beat = t.user_attrs.get("heartbeat", started)
    if now - beat > stale_after:
        return f"no heartbeat from worker {worker} for {now - beat:.0f} s"
    return None


def reap(spec: Spec, storage, client, exp_id: str, stale_after: float, claim_grace: float | None = None) -> int:
    """Close the trials whose worker is gone (see :func:`why_dead`), then the MLflow runs such deaths left
    RUNNING. ``claim_grace``: seconds a claimed trial may wait for its worker to record itself (default
    ``min(CLAIM_GRACE, stale_after)``). Returns how many trials were closed."""
    claim_grace = min(CLAIM_GRACE, stale_after) if claim_grace is None else claim_grace
    host, now, n = socket.gethostname(), time.time(), 0
    for row in queue.progress(spec, storage):
        for t in row.search_trials + row.replicate_trials:
            if t.state != queue.TrialState.RUNNING:
                continue
            reason = why_dead(t, host, now, stale_after, claim_grace)
            if reason is None or not queue.interrupt(storage, queue.trial_id(t), reason):
                continue
            crash_point("launcher.reaped")
            if t.user_attrs.get("mlflow_run_id"):
                close_run(client, t.user_attrs["mlflow_run_id"], queue.TrialState.FAIL, reason)
            n += 1
    reconcile_runs(storage, client, exp_id)
    return n


def finish(spec: Spec, storage, client, exp_id: str, only_running: bool = False) -> list[queue.CellProgress]:
    """Close each cell's parent run with its summary (``only_running``: those still RUNNING, when a worker
    finishes a study whose launcher is gone), and any trial run left RUNNING. Returns the final progress."""
    rows = queue.progress(spec, storage)
    parents = {r.cell.key: queue.open_study(storage, queue.optuna_name(spec, r.cell, "search")).user_attrs.get(
        "mlflow_parent_run_id") for r in rows}
    if only_running:
        parents = {k: v for k, v in parents.items() if v and client.get_run(v).info.status == "RUNNING"}
    finish_parents(client, rows, parents)
    reconcile_runs(storage, client, exp_id)
    return rows


def worker_command(spec_path: Path, store: Store, threads: int, stale_after: float, device: str,
                   spec_overrides: tuple[str, ...] = ()) -> list[str]:
    """The command line of a worker of this launcher (with the study file's ``--set`` overrides)."""
    cmd = [sys.executable, "-m", "rnnbench", "worker", str(spec_path), "--root", str(store.root),
           "--threads", str(threads), "--stale-after", str(stale_after), "--device", device]
    cmd += [arg for override in spec_overrides for arg in ("--set", override)]
    if store.storage_url:
        cmd += ["--storage", store.storage_url]
    if store.tracking:
        cmd += ["--tracking-uri", store.tracking]
    return cmd


_SHIELD = {"depth": 0, "pending": None}  # store_calls' nesting, and a stop signal it holds back


@contextmanager
def store_calls():
    """Talk to Optuna and MLflow: a stop signal arriving meanwhile (:func:`stop`) takes effect when the talk is
    done. Cut short, it could leave the Optuna journal's lock taken, a write half done, or MLflow's SQLite
    database locked while this process waits for its workers, which then cannot close their trials (measured:
    an interrupted ``search_runs`` left the database locked in 9 of 119 tries)."""
    _SHIELD["depth"] += 1
    try:
        yield
    finally:
        _SHIELD["depth"] -= 1
        if not _SHIELD["depth"] and _SHIELD["pending"] is not None:
            signum, _SHIELD["pending"] = _SHIELD["pending"], None
            raise KeyboardInterrupt(f"signal {signum}")


def stop(signum, frame):
    """SIGTERM and SIGINT: KeyboardInterrupt, at once, or inside :func:`store_calls` when the talk is done."""
    if _SHIELD["depth"]:
        _SHIELD["pending"] = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


def ignore_signal(signum, frame):
    """A handler that does nothing: unlike SIG_IGN, a signal already pending when it is set raises no OSError."""


def run_study(spec: Spec, spec_path: Path, spec_sha: str, store: Store, workers: int = 1, threads: int = 1,
              stale_after: float = 900.0, on_progress=None, poll: float = 1.0, device: str = "auto",
              retry_stopped: bool = False, on_note=None, on_start=None) -> list[queue.CellProgress]:
    """Prepare the study, start ``workers`` worker processes, keep the queue topped up, wait for the end.

    ``on_progress(rows)`` is called every ``poll`` seconds. A cell whose first trials all fail alike is
    stopped (:func:`stop_failing`) and counts as done; ``retry_stopped`` clears that mark first. ``on_note(line)``
    is told of cells of this study's name that ``spec`` does not name; ``on_start()`` is called once the study
    holds the root and is prepared (a busy root or a changed study stops it before). Returns the final progress
    rows."""
    lock_fd = store.lock()
    procs: list[subprocess.Popen] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, stop)  # SIGTERM stops the workers too, like Ctrl-C
    if previous[signal.SIGINT] is not signal.SIG_IGN:  # ignored: started in the background by a script
        signal.signal(signal.SIGINT, stop)
    try:
        if not store.distributed:
            store.repair_journal()
        storage, client = store.optuna_storage(), store.mlflow_client()
        exp_id, _, others = prepare(spec, spec.text, store, storage, client)
        if on_start:
            on_start()
        if others and on_note:
            on_note(f"note: study {spec.name} in this store also holds {len(others)} cell(s) this study file does not "
                    f"name ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): run by another study file "
                    f"of this name, an earlier version of this one or other --set values. Its reports show them "
                    f"too; to keep them apart, give this study another name.")
        if retry_stopped:
            queue.retry_stopped(spec, storage)
        # A claim recorded by nobody for seconds on the embedded store is dead: local processes record
        # theirs within milliseconds (a standalone `rnnbench worker` on this root keeps its live trials).
        reap(spec, storage, client, exp_id, stale_after, claim_grace=None if store.distributed else START_GRACE)
        top_up(spec, storage)
        logs = store.logs_dir()
        restarts = 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())}

        def start(i):
            log = open(logs / f"worker-{i}.log", "ab")
            return subprocess.Popen(worker_command(spec_path, store, threads, stale_after, device, spec.overrides),
                                    stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(lock_fd,), env=env)

        journal = None if store.distributed else store.journal_id()  # prepare() has written it
        finished = all(r.done() for r in queue.progress(spec, storage))  # a rerun of a finished study: no workers
        procs = [] if finished else [start(i) for i in range(workers)]
        last_reap = time.monotonic()
        try:
            while True:
                with store_calls():
                    _check_journal(store, journal)
                    rows = stop_failing(spec, storage, queue.progress(spec, storage))
                if on_progress:
                    on_progress(rows)
                done = all(r.done() for r in rows)
                if done and all(p.poll() is not None for p in procs):
                    break
                crash_point("launcher.running")
                for i, p in enumerate(procs):
                    if p.poll() is not None and not done:
                        if p.returncode != 0:
                            restarts += 1
                            if restarts > 3 * workers:
                                raise WorkersDying(f"workers keep dying ({restarts} deaths); see {logs}/worker-*.log")
                        procs[i] = start(i)
                with store_calls():
                    if time.monotonic() - last_reap > 10 * poll:
                        if reap(spec, storage, client, exp_id, stale_after):
                            rows = None  # reaping freed slots that top_up must see
                        last_reap = time.monotonic()
                    top_up(spec, storage, rows)
                time.sleep(poll)
            with store_calls():
                return finish(spec, storage, client, exp_id)
        except Exception:
            _check_journal(store, journal)  # a read of a new file at the old one's offset: say why it broke
            raise
    finally:
        # A second Ctrl-C (or the SIGTERM a process group gets with it) must not cut the workers' closing short
        for s in previous:
            signal.signal(s, ignore_signal)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        os.close(lock_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
