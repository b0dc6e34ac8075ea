"""Fault injection: kill a process at every named point of the trial protocol, rerun, check the invariants.

Each scenario runs a small study with ``RNNBENCH_CRASH_AT`` set (the process dies there as under
kill -9; see ``studies/crash.py``), checks that the crash happened, reruns the same command without it,
and checks what "exactly once" promises:
* each cell has exactly ``trials`` counted search trials, one per slot 0..trials-1, and exactly
  ``replicates`` replicate runs of its best trial, one per replicate index, each with its own seed;
* exactly one MLflow run per trial that started one, every run's trial exists, none is RUNNING, every
  child run's parent exists, one parent per cell, none RUNNING;
* the numbers are those of a run that was never interrupted (same slot, same seed, same result);
* the rerun needed no timeout to recover (its ``--stale-after`` is an hour, past the test's own timeout).
The fast scenarios run in ``make test``; the others are marked slow (``pytest tests/test_faults.py`` runs all).
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from studies import queue
from studies import spec as specs
from studies.crash import POINTS
from studies.store import Store

FAULTS = textwrap.dedent("""\
    name: faults
    seed: 5
    tasks: [{task: adding, seq_len: 8}]
    variants: [gru]
    model: {hidden_size: 8}
    train: {steps: 30, eval_every: 10, eval_size: 32, batch_size: 8,
            population: off}  # replicates one by one: numbers must equal the uninterrupted run's bit for bit
    search_space: {lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}}
    trials: 3
    replicates: 3
    generation: 2
    pruner: none
    """)

# scenario: (crash points, what it shows). Each point fires once, except in "claimed-unrecorded", where
# every worker dies at its first claim until the launcher gives up, leaving claimed trials nobody recorded.
SCENARIOS = {
    "claimed-unrecorded": ("worker.claimed", "claimed trials nobody recorded are closed at once on rerun"),
    "launcher-alone": ("launcher.running:6", "workers of a killed launcher exit and free the root"),
    "replicate-running": ("worker.training:10", "replicate 0 dies while 1, 2 wait: indices stay 0, 1, 2"),
    "reaper-marked": ("worker.training:2,interrupt.marked", "reaper dies between marking and closing"),
    "parent-created": ("launcher.parent_created", "a parent run created but not recorded is adopted"),
    "recorded": ("worker.recorded", "a recorded trial with no MLflow run"),
    "run-created": ("worker.run_created", "an MLflow run whose id the trial never got"),
    "mid-training": ("worker.training:2", "a worker dies mid-training"),
    "before-tell": ("worker.before_tell", "the objective is logged, Optuna never told"),
    "told": ("worker.told", "Optuna told, the MLflow run left RUNNING"),
    "enqueued-search": ("launcher.enqueued_search", "the launcher dies while filling the queue"),
    "enqueued-replicate": ("launcher.enqueued_replicate", "the launcher dies while enqueuing replicates"),
    "reaper-closed": ("worker.training:2,launcher.reaped", "reaper dies between FAIL and closing the run"),
    "finishing": ("launcher.finishing", "the launcher dies while closing the cells' parent runs"),
}
FAST = ("launcher-alone", "reaper-marked")  # make test; every scenario under -m slow


def test_every_crash_point_has_a_scenario():
    used = {p.partition(":")[0] for points, _ in SCENARIOS.values() for p in points.split(",")}
    assert used == set(POINTS)


def run(spec_path, root, env=None, timeout=300, stale_after=10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnbench", "run", str(spec_path), "--root", str(root),
                           "--stale-after", str(stale_after)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory):
    """An MLflow database with its tables made once (creating them takes seconds per root)."""
    root = tmp_path_factory.mktemp("template")
    Store(root).mlflow_client().search_experiments()
    return root / "mlflow.db"


def fresh_root(tmp_path, template):
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copy(template, root / "mlflow.db")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mlflow_template):
    """Objective of every (kind, slot) of a run nobody interrupted."""
    base = tmp_path_factory.mktemp("reference")
    spec_path = base / "faults.yaml"
    spec_path.write_text(FAULTS)
    root = fresh_root(base, mlflow_template)
    proc = run(spec_path, root)
    assert proc.returncode == 0, proc.stderr
    return numbers(root, spec_path)


def trials(root, spec_path):
    spec, _, _ = specs.load(spec_path)
    storage = Store(root).optuna_storage()
    (row,) = queue.progress(spec, storage)
    return spec, row


def numbers(root, spec_path) -> dict:
    spec, row = trials(root, spec_path)
    out = {("search", queue.slot(t)): t.value for t in row.search_trials if queue.counted(t)}
    out |= {("replicate", queue.slot(t)): t.value for t in row.replicate_trials
            if queue.counted(t) and queue.source(t) == row.best.number}
    return out


def check_invariants(root, spec_path):
    spec, row = trials(root, spec_path)
    search = [t for t in row.search_trials if queue.counted(t)]
    assert sorted(queue.slot(t) for t in search) == list(range(spec.trials))
    assert row.best is not None and row.done()
    reps = [t for t in row.replicate_trials if queue.counted(t) and queue.source(t) == row.best.number]
    assert sorted(queue.slot(t) for t in reps) == list(range(spec.replicates))
    assert not [t for t in row.search_trials + row.replicate_trials if t.state in queue.LIVE]

    client = MlflowClient(Store(root).tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("rnnbench.role") == "cell"}
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("rnnbench.role") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in children)
    by_trial = {}
    for r in children:
        key = (r.data.tags["rnnbench.optuna_study"], int(r.data.tags["rnnbench.trial"]))
        assert key not in by_trial, f"two MLflow runs for trial {key}"
        by_trial[key] = r
    all_trials = {(queue.optuna_name(spec, row.cell, kind), t.number): t
                  for kind, ts in (("search", row.search_trials), ("replicate", row.replicate_trials)) for t in ts}
    assert set(by_trial) <= set(all_trials)  # no run without its trial
    for key, t in all_trials.items():
        if queue.counted(t):  # every counted trial has its run, with the trial's outcome
            r = by_trial[key]
            assert r.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(t.state.name, "FAILED")
        elif key in by_trial:
            assert by_trial[key].info.status == "KILLED" and "rnnbench.interrupted" in by_trial[key].data.tags
    seeds = [by_trial[(queue.optuna_name(spec, row.cell, "replicate"), t.number)].data.tags["rnnbench.seed"] for t in reps]
    assert len(set(seeds)) == len(seeds)


def scenario(name, tmp_path, mlflow_template, reference):
    points, _ = SCENARIOS[name]
    spec_path = tmp_path / "faults.yaml"
    spec_path.write_text(FAULTS)
    root = fresh_root(tmp_path, mlflow_template)
    marks = tmp_path / "crashed"
    marks.mkdir()
    once = name != "claimed-unrecorded"
    first = run(spec_path, root, {"RNNBENCH_CRASH_AT": points, **({"RNNBENCH_CRASH_ONCE": str(marks)} if once else {})})
    if once:
        fired = sorted(p.name for p in marks.iterdir())
        assert fired == sorted(p.partition(":")[0] for p in points.split(",")), (first.stdout, first.stderr)
    else:
        assert first.returncode != 0 and "workers keep dying" in first.stderr
        _, row = trials(root, spec_path)
        assert [t for t in row.search_trials if t.state.name == "RUNNING" and "worker" not in t.user_attrs]
    if name == "launcher-alone":
        assert first.returncode == 137
        store = Store(root)
        fd = store.lock(wait_for_orphans=60)  # the workers died with their launcher and freed the root
        os.close(fd)
    # Stale after an hour: a rerun that recovered by waiting for a heartbeat to go stale would time out
    second = run(spec_path, root, stale_after=3600)
    assert second.returncode == 0, second.stderr
    check_invariants(root, spec_path)
    assert numbers(root, spec_path) == reference


@pytest.mark.parametrize("name", FAST)
def test_fault(name, tmp_path, mlflow_template, reference):
    scenario(name, tmp_path, mlflow_template, reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in FAST])
def test_fault_slow(name, tmp_path, mlflow_template, reference):
    scenario(name, tmp_path, mlflow_template, reference)


def test_a_journal_deleted_mid_run_stops_the_study_in_one_line(tmp_path, mlflow_template):
    """The embedded store's journal deleted under a running study: the launcher says so and stops its
    workers (it ended in a traceback called a bug, from reading the new file at the old one's offset)."""
    spec_path = tmp_path / "faults.yaml"
    spec_path.write_text(FAULTS.replace("steps: 30,", "steps: 3000,"))  # trials long enough to delete under
    root = fresh_root(tmp_path, mlflow_template)
    proc = subprocess.Popen([sys.executable, "-m", "rnnbench", "run", str(spec_path), "--root", str(root),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = Store(root).journal
    deadline = time.monotonic() + 120
    while not (journal.exists() and b"intermediate_value" in journal.read_bytes()):  # a trial is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    journal.unlink()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [f"error: {journal} was deleted or replaced while the study ran: stopped. "
                                     "The trials only it recorded are gone (their MLflow runs stay); put the "
                                     "file back, or start again with a fresh --root"]
