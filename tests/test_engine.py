"""The study engine under stress: kill -9 and resume, parallel workers, divergence, errors, changed specs."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import rnnbench
from studies import spec as specs
from studies.queue import optuna_name
from studies.store import Store


def write_spec(tmp_path, text: str, name="s.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def trials_of(root, spec_path, kind="search"):
    spec, _, _ = specs.load(spec_path)
    storage = Store(root).optuna_storage()
    return {c.key: optuna.load_study(study_name=optuna_name(spec, c, kind), storage=storage).get_trials()
            for c in specs.cells(spec)}


def trial_runs(root, study):
    client = MlflowClient(Store(root).tracking_uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=1000)


def assert_consistent(root, spec_path, study, trials):
    """Exact counts, one MLflow run per Optuna trial that started, nothing left RUNNING."""
    runs = trial_runs(root, study)
    by_id = {r.info.run_id: r for r in runs}
    assert len(by_id) == len(runs)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    claimed = []
    for key, ts in trials_of(root, spec_path).items():
        counted = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                   and "interrupted" not in t.user_attrs]
        assert len(counted) == trials, key
        assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        claimed += [t.user_attrs["mlflow_run_id"] for t in ts if "mlflow_run_id" in t.user_attrs]
    for ts in trials_of(root, spec_path, "replicate").values():
        assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        claimed += [t.user_attrs["mlflow_run_id"] for t in ts if "mlflow_run_id" in t.user_attrs]
    assert len(set(claimed)) == len(claimed)  # no run shared by two trials
    assert set(claimed) == set(by_id)  # and no run without its trial
    return runs


KILL = """\
name: killme
seed: 1
tasks: [{task: adding, seq_len: 40}]
variants: [lstm, gru]
model: {hidden_size: 32}
train: {steps: 200, eval_every: 20, eval_size: 64, batch_size: 32}
search_space: {lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
trials: 3
replicates: 1
pruner: none
"""


@pytest.mark.slow
def test_kill_9_mid_trial_then_resume(tmp_path):
    spec_path, root = write_spec(tmp_path, KILL), tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "rnnbench", "run", str(spec_path), "--root", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait for: one trial ended, another one mid-way with its MLflow run
            time.sleep(0.5)
            if not (root / "optuna.journal").exists():
                continue
            try:
                ts = [t for v in trials_of(root, spec_path).values() for t in v]
            except KeyError:
                continue
            running = [t for t in ts if t.state == TrialState.RUNNING and t.intermediate_values]
            if running and any(t.state == TrialState.COMPLETE for t in ts):
                break
        else:
            pytest.fail("the study never reached a mid-trial state")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [r for r in trial_runs(root, "killme") if r.info.status == "RUNNING"]  # the kill left a run open

    rnnbench("run", spec_path, "--root", root)
    runs = assert_consistent(root, spec_path, "killme", trials=3)
    interrupted = [r for r in runs if "rnnbench.interrupted" in r.data.tags]
    assert interrupted and all(r.info.status == "KILLED" for r in interrupted)
    interrupted_trials = [t for v in trials_of(root, spec_path).values() for t in v if "interrupted" in t.user_attrs]
    assert len(interrupted_trials) == len(interrupted)
    assert len([r for r in runs if r.data.tags["rnnbench.kind"] == "replicate"
                and "rnnbench.interrupted" not in r.data.tags]) == 2


STOP = """\
name: stopme
seed: 1
tasks: [{task: adding, seq_len: 20}]
variants: [rnn, gru]
model: {hidden_size: 16}
train: {steps: 100000, eval_every: 5, eval_size: 32, batch_size: 8, population: off}
trials: 2
replicates: 0
pruner: none
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_a_two_worker_run_closes_every_trial_in_hand(tmp_path, sig):
    """Ctrl-C in a terminal (SIGINT to the whole process group) or `timeout` (SIGTERM to it): each worker
    gets that signal and then the launcher's SIGTERM, while it closes its trial; nothing is left RUNNING."""
    spec_path, root = write_spec(tmp_path, STOP), tmp_path / "runs"
    # As from a terminal: Ctrl-C delivered even where pytest itself was started ignoring it (in the background
    # of a script), which the launcher and its workers would inherit and keep (a test below)
    proc = subprocess.Popen([sys.executable, "-m", "rnnbench", "run", str(spec_path), "--root", str(root),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # both workers mid-trial, each with its MLflow run
            time.sleep(0.5)
            try:
                running = [t for v in trials_of(root, spec_path).values() for t in v
                           if t.state == TrialState.RUNNING and t.intermediate_values]
            except (KeyError, FileNotFoundError):
                continue
            if len(running) == 2:
                break
        else:
            pytest.fail("the two workers never had a trial each")
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "stopped: the trials in hand were closed as interrupted" in out, out
    logs = "".join(p.read_text() for p in (root / "logs").glob("worker-*.log"))
    assert "Traceback" not in logs, logs
    ts = [t for v in trials_of(root, spec_path).values() for t in v]
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    assert len([t for t in ts if "interrupted" in t.user_attrs]) == 2
    assert not [r for r in trial_runs(root, "stopme") if r.info.status == "RUNNING"]


def test_divergence_fails_one_trial_not_the_study(tmp_path):
    spec_path = write_spec(tmp_path, """\
        name: broken
        tasks: [{task: adding, seq_len: 10}, {task: copy_memory, seq_len: 5, n_copy: 2}]
        variants: [rnn]
        model: {hidden_size: 16}
        train: {steps: 20, eval_every: 10, eval_size: 32, batch_size: 8, grad_clip: null}
        search_space: {lr: {type: categorical, choices: [0.001, 1.0e+30]}}
        sampler: grid
        trials: 2
        replicates: 1
        """)
    root = tmp_path / "runs"
    proc = rnnbench("run", spec_path, "--root", root)
    assert "failed trials" in proc.stdout
    assert_consistent(root, spec_path, "broken", trials=2)
    runs = trial_runs(root, "broken")
    search = [r for r in runs if r.data.tags["rnnbench.kind"] == "search"]
    failed = [r for r in search if r.info.status == "FAILED"]
    assert {r.data.params["lr"] for r in failed} == {"1e+30"}  # only diverging trials fail
    assert failed and all(r.data.tags["rnnbench.error"].startswith("Divergence") for r in failed)
    replicates = [r for r in runs if r.data.tags["rnnbench.kind"] == "replicate"]
    assert len(replicates) == 2 and all(r.info.status == "FINISHED" for r in replicates)  # the study went on
    status = rnnbench("status", spec_path, "--root", root).stdout
    assert "copy_memory(seq_len=5,n_copy=2)/rnn" in status and "1/1" in status


def test_changed_search_space_is_refused(tiny_study, tmp_path):
    text = tiny_study.spec.read_text().replace("high: 1.0e-2", "high: 2.0e-2")
    changed = write_spec(tmp_path, text, "tiny.yaml")
    proc = rnnbench("run", changed, "--root", tiny_study.root, check=False)
    assert proc.returncode == 2 and proc.stdout == ""  # one line: no header of a study that does not start
    assert "changed this cell's definition" in proc.stderr and "new 'name'" in proc.stderr
    client = MlflowClient(Store(tiny_study.root).tracking_uri)
    note = client.get_experiment_by_name("tiny").tags["mlflow.note.content"]
    assert "high: 1.0e-2" in note  # the stored study file is untouched


def test_busy_root_is_refused(tmp_path):
    store = Store(tmp_path / "runs")
    fd = store.lock()
    try:
        proc = rnnbench("run", "quickstart", "--root", store.root, check=False)
        assert proc.returncode == 2 and "another `rnnbench run`" in proc.stderr and proc.stdout == ""
    finally:
        os.close(fd)


def test_prepare_names_the_cells_another_file_of_the_same_name_added(tmp_path):
    from studies.launcher import prepare

    store = Store(tmp_path / "runs")
    storage, client = store.optuna_storage(), store.mlflow_client()
    both = write_spec(tmp_path, KILL)
    only_gru = tmp_path / "other.yaml"
    only_gru.write_text(KILL.replace("[lstm, gru]", "[gru]"))
    for path, others in ((both, []), (only_gru, ["adding(seq_len=40)/lstm"]), (both, [])):
        spec, _, _ = specs.load(path)
        assert prepare(spec, path.read_text(), store, storage, client)[2] == others


def prepared_kill_study(tmp_path):
    """The KILL study prepared and topped up on an embedded store, no worker: (spec, its path, store, Optuna
    storage, MLflow client, experiment id)."""
    from studies.launcher import prepare, top_up

    spec_path = write_spec(tmp_path, KILL)
    spec, _, _ = specs.load(spec_path)
    store = Store(tmp_path / "runs")
    storage, client = store.optuna_storage(), store.mlflow_client()
    exp_id, _, _ = prepare(spec, spec_path.read_text(), store, storage, client)
    top_up(spec, storage)
    return spec, spec_path, store, storage, client, exp_id


def test_a_deleted_journal_is_refused_rather_than_its_trials_run_again(tmp_path):
    from studies import queue
    from studies.launcher import prepare
    from studies.tracking import LostTrials

    spec, spec_path, store, storage, client, exp_id = prepared_kill_study(tmp_path)
    study = queue.open_study(storage, optuna_name(spec, specs.cells(spec)[0], "search"))
    trial = queue.claim(study)
    client.create_run(exp_id, tags={"rnnbench.role": "trial", "rnnbench.trial": str(trial.number),
                                    "rnnbench.optuna_study": study.study_name})
    prepare(spec, spec_path.read_text(), store, storage, client)  # the trial is there: fine
    (store.root / "optuna.journal").unlink()
    fresh = Store(store.root).optuna_storage()
    with pytest.raises(LostTrials, match=r"holds 1 trial run\(s\) whose Optuna trials are gone \(e.g. "
                                         r"adding\(seq_len=40\)/lstm trial 0\)"):
        prepare(spec, spec_path.read_text(), store, fresh, client)


def test_reap_closes_dead_or_silent_workers_trials_only(tmp_path):
    from studies import queue
    from studies.launcher import reap, top_up

    spec, _, _, storage, client, exp_id = prepared_kill_study(tmp_path)
    lstm, gru = specs.cells(spec)
    now = time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    workers = {"remote:1": (lstm, now - 100), "remote:2": (lstm, now - 5),  # silent / alive elsewhere
               f"{os.uname().nodename}:{dead.pid}": (gru, now)}  # this machine, process gone
    claimed = {}
    for worker, (cell, beat) in workers.items():
        study = queue.open_study(storage, optuna_name(spec, cell, "search"))
        trial = queue.claim(study)
        run_id = client.create_run(exp_id, tags={"rnnbench.role": "trial", "rnnbench.trial": str(trial.number),
                                                 "rnnbench.optuna_study": study.study_name}).info.run_id
        queue.record(storage, queue.trial_id(trial), worker, beat)
        queue.set_attr(storage, queue.trial_id(trial), "mlflow_run_id", run_id)
        claimed[worker] = (trial.number, cell, run_id)

    assert reap(spec, storage, client, exp_id, stale_after=50) == 2
    for worker, (number, cell, run_id) in claimed.items():
        t = queue.open_study(storage, optuna_name(spec, cell, "search")).trials[number]
        if worker == "remote:2":
            assert t.state == TrialState.RUNNING and client.get_run(run_id).info.status == "RUNNING"
        else:
            assert t.state == TrialState.FAIL and "interrupted" in t.user_attrs
            assert client.get_run(run_id).info.status == "KILLED"
    top_up(spec, storage)  # the two interrupted trials are replaced: still exactly 3 per cell to come
    for cell in (lstm, gru):
        ts = queue.open_study(storage, optuna_name(spec, cell, "search")).trials
        assert sum(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in ts) == 3
        assert sorted(queue.slot(t) for t in ts if queue.holds(t)) == [0, 1, 2]  # the freed slots came back


TPE = """\
name: tpe
seed: 11
tasks: [{task: adding, seq_len: 6}]
variants: [rnn]
model: {hidden_size: 4}
search_space: {lr: {type: float, low: 1.0e-4, high: 1.0, log: true}}
trials: 16
replicates: 0
generation: 4
pruner: median
"""


@pytest.mark.parametrize("population", ["off", pytest.param("auto", marks=pytest.mark.slow)])
def test_results_do_not_depend_on_the_number_of_workers(tmp_path, population):
    """Issue case 10: 16 TPE trials (the last 4 sampled by TPE itself, after its 10 random startup
    trials) with the median pruner give the same params, values and states with 1 and 2 workers; with
    populations on, search trials also train in groups that depend on timing, and still give the same."""
    spec_path = write_spec(tmp_path, TPE + f"train: {{steps: 12, eval_every: 4, eval_size: 16, batch_size: 4, "
                                           f"population: {population}}}\n")
    outcomes = []
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        rnnbench("run", spec_path, "--root", root, "--workers", workers)
        (ts,) = trials_of(root, spec_path).values()
        outcomes.append(sorted((t.user_attrs["slot"], t.params["lr"], t.value, t.state.name) for t in ts))
        runs = trial_runs(root, "tpe")
        if workers == 2 and population == "off":
            assert len({r.data.tags["rnnbench.worker"] for r in runs}) == 2
        if population == "auto":
            assert any("rnnbench.population" in r.data.tags for r in runs)
    assert outcomes[0] == outcomes[1]
    assert len({lr for _, lr, _, _ in outcomes[0]}) == 16


def test_a_worker_with_an_edited_study_file_is_refused(tiny_study, tmp_path):
    """Issue case 7: a remote worker given another search space must not sample into the study."""
    edited = write_spec(tmp_path, tiny_study.spec.read_text().replace("steps: 40", "steps: 41"), "tiny.yaml")
    proc = rnnbench("worker", edited, "--root", tiny_study.root, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cell adding(seq_len=8)/rnn" in proc.stderr and "changed this cell's definition" in proc.stderr


@pytest.mark.slow
def test_a_grid_with_fewer_trials_than_points_samples_it_evenly(tmp_path):
    """Issue case 8: 3 trials of a 3x3 grid take 3 distinct points in a seeded random order (not the
    first row of the grid product), the same on every run."""
    from studies.launcher import grid_point

    spec_path = write_spec(tmp_path, """\
        name: grid
        seed: 2
        tasks: [{task: adding, seq_len: 6}]
        variants: [rnn]
        model: {hidden_size: 4}
        train: {steps: 4, eval_every: 4, eval_size: 8, batch_size: 4}
        search_space:
          lr: {type: categorical, choices: [0.001, 0.01, 0.1]}
          batch_size: {type: categorical, choices: [4, 8, 16]}
        sampler: grid
        trials: 3
        replicates: 0
        """)
    spec, _, _ = specs.load(spec_path)
    (cell,) = specs.cells(spec)
    points = [grid_point(spec, cell, s) for s in range(9)]
    assert len({tuple(p.items()) for p in points}) == 9  # a permutation of the grid
    assert {p["lr"] for p in points[:3]} != {0.001}  # not the first lr three times
    rnnbench("run", spec_path, "--root", tmp_path / "runs")
    (ts,) = trials_of(tmp_path / "runs", spec_path).values()
    assert sorted((t.user_attrs["slot"], t.params["lr"], t.params["batch_size"]) for t in ts) == \
        [(s, points[s]["lr"], points[s]["batch_size"]) for s in range(3)]


@pytest.mark.slow
def test_growing_a_study_gives_the_new_best_its_own_replicates(tmp_path):
    """Issue case 6: replicates belong to one source trial. Raising `trials` until another trial is
    best adds that trial's replicates; the old ones stay, superseded; raising `replicates` adds runs of
    the current best only."""
    from studies.launcher import grid_point

    text = """\
        name: grow
        seed: {seed}
        tasks: [{{task: adding, seq_len: 6}}]
        variants: [gru]
        model: {{hidden_size: 8}}
        train: {{steps: 30, eval_every: 10, eval_size: 32, batch_size: 16}}
        search_space: {{lr: {{type: categorical, choices: [1.0e-6, 0.05]}}}}
        sampler: grid
        pruner: none
        trials: {trials}
        replicates: {replicates}
        """
    seed = next(s for s in range(50) if grid_point(specs.load(write_spec(tmp_path, text.format(
        seed=s, trials=1, replicates=2)))[0], specs.cells(specs.load(write_spec(tmp_path, text.format(
            seed=s, trials=1, replicates=2)))[0])[0], 0)["lr"] == 1e-6)  # slot 0 gets the useless lr
    root = tmp_path / "runs"
    from studies import queue
    from studies.store import Store

    def state(trials, replicates):
        spec_path = write_spec(tmp_path, text.format(seed=seed, trials=trials, replicates=replicates))
        rnnbench("run", spec_path, "--root", root)
        spec, _, _ = specs.load(spec_path)
        (row,) = queue.progress(spec, Store(root).optuna_storage())
        reps = [(queue.source(t), queue.slot(t)) for t in row.replicate_trials if queue.counted(t)]
        return row, sorted(reps)

    row, reps = state(1, 2)
    assert row.best.number == 0 and reps == [(0, 0), (0, 1)]
    row, reps = state(2, 2)  # lr 0.05 beats 1e-6: trial 1 is the new best and gets its own replicates
    assert row.best.number == 1 and reps == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert row.superseded == 2 and row.replicate["counted"] == 2
    row, reps = state(2, 3)  # one more replicate: of the current best only
    assert reps == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    status = rnnbench("status", tmp_path / "s.yaml", "--root", root).stdout
    assert "3/3 (+2 superseded)" in status


def test_replicates_trained_as_a_population_match_runs_alone(tmp_path):
    """`train.population: 4` trains a cell's 4 replicate runs as one module; the study's MLflow runs,
    counts and statuses are those of `population: off`, and each replicate's objective agrees (that a run's
    numbers do not depend on how runs were grouped is checked with TPE trials on 1 and 2 workers)."""
    text = """\
        name: pop
        seed: 4
        tasks: [{task: adding, seq_len: 8}]
        variants: [peephole]
        model: {hidden_size: 8}
        train: {steps: 30, eval_every: 10, eval_size: 32, batch_size: 8, population: %s}
        search_space: {lr: {type: categorical, choices: [0.01]}}
        sampler: grid
        trials: 1
        replicates: 4
        """
    outcome = {}
    for setting in ("off", "4"):
        spec_path = write_spec(tmp_path, text % setting, f"{setting}.yaml")
        rnnbench("run", spec_path, "--root", tmp_path / setting)
        runs = assert_consistent(tmp_path / setting, spec_path, "pop", trials=1)
        outcome[setting] = {(r.data.tags["rnnbench.cell"], r.data.tags["rnnbench.kind"], r.data.tags["rnnbench.slot"]):
                            (r.info.status, r.data.metrics["objective"], r.data.tags.get("rnnbench.population"))
                            for r in runs}
    assert outcome["off"].keys() == outcome["4"].keys() and len(outcome["off"]) == 1 + 4
    for key, (status, value, group) in outcome["4"].items():
        alone_status, alone, no_group = outcome["off"][key]
        assert status == alone_status == "FINISHED" and no_group is None
        assert value == pytest.approx(alone, rel=0.01)
        assert (group is not None) == (key[1] == "replicate")  # replicates trained together, tagged so


@pytest.mark.parametrize("budget, pooled", [("steps: 30", 16), ("seconds: 0.5", 1), ("{steps: 30, seconds: 9}", 1)])
def test_a_seconds_budget_trains_every_run_on_its_own_clock(tmp_path, budget, pooled):
    """Members of a population share one wall clock: under `train.seconds` each would get a fraction of the
    budget that a run trained alone gets, so a worker trains these peephole replicates (which `auto` pools
    under a steps budget) one by one."""
    from types import SimpleNamespace

    from studies.worker import Worker
    train = budget if budget.startswith("{") else "{" + budget + "}"
    spec, _, _ = specs.load(write_spec(tmp_path, f"""\
        name: clock
        tasks: [{{task: adding, seq_len: 8}}]
        variants: [peephole]
        model: {{hidden_size: 8}}
        train: {train}
        """))
    cell = specs.cells(spec)[0]
    job = SimpleNamespace(cell=cell, kind="replicate", trial=optuna.trial.FixedTrial({}))
    assert Worker.population_size(SimpleNamespace(spec=spec, device="cpu"), job) == pooled


def test_run_names_lead_with_what_differs(tiny_study):
    """Parent runs `lstm · adding T=12`, search runs `... · #<slot>`, replicate runs `... · seed <index>`;
    trial runs carry what MLflow's chart view groups by (variant, task, ladder value; lr, hidden_size)."""
    client = MlflowClient(Store(tiny_study.root).tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`rnnbench.cell` != ''", max_results=1000)
    names = {(r.data.tags["rnnbench.cell"], r.data.tags.get("rnnbench.kind"), r.data.tags.get("rnnbench.slot")):
             r.info.run_name for r in runs}
    assert names[("adding(seq_len=12)/lstm", None, None)] == "lstm · adding T=12"
    assert names[("copy_memory(seq_len=5,n_copy=2)/rnn", None, None)] == "rnn · copy_memory T=5 n_copy=2"
    assert names[("adding(seq_len=12)/lstm", "search", "1")] == "lstm · adding T=12 · #1"
    assert names[("adding(seq_len=8)/rnn", "replicate", "0")] == "rnn · adding T=8 · seed 0"
    trial = next(r for r in runs if r.data.tags.get("rnnbench.role") == "trial")
    assert {"rnnbench.variant", "rnnbench.task", "rnnbench.ladder_value"} <= set(trial.data.tags)
    assert {"lr", "hidden_size"} <= set(trial.data.params)


@pytest.mark.slow
def test_a_cell_whose_first_trials_fail_alike_is_stopped(tmp_path):
    """A cell whose first 3 trials all fail with the same error (numbers aside) is stopped: said at once,
    no more trials, counted as done; `run` exits 1 saying the study did not complete; the cell stays
    stopped until --retry-stopped. The other cell runs to the end. (Also: workers get the launcher's --set.)"""
    from studies import queue

    spec_path = write_spec(tmp_path, """\
        name: stops
        tasks: [{task: adding, seq_len: 6}]
        variants:
          - gru
          - {variant: rnn, search_space: {lr: {type: categorical, choices: [1.0e+30]}}}
        model: {hidden_size: 4}
        train: {steps: 40, eval_every: 10, eval_size: 16, batch_size: 4, grad_clip: null}
        search_space: {lr: {type: float, low: 1.0e-3, high: 1.0e-2}}
        trials: 10
        generation: 3
        replicates: 0
        pruner: none
        """)
    root, sets = tmp_path / "runs", ["--set", "train.steps=10", "--set", "train.eval_every=5"]

    def rnn_trials():
        spec, _, _ = specs.load(spec_path, ["train.steps=10", "train.eval_every=5"])
        gru, rnn = queue.progress(spec, Store(root).optuna_storage())
        return gru, rnn

    proc = rnnbench("run", spec_path, "--root", root, *sets, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("study stops did not complete: 1 cell(s) stopped")
    assert proc.stdout.splitlines()[-1].endswith("so run that as a study of another name")  # Divergence's hint
    line = next(l for l in proc.stdout.splitlines() if "stopped: its first 3 trials failed with" in l)
    assert "cell adding(seq_len=6)/rnn stopped" in line and "Divergence" in line
    gru, rnn = rnn_trials()
    assert gru.done() and gru.search["counted"] == 10 and gru.stopped is None
    assert rnn.done() and rnn.stopped.startswith("Divergence")
    first = rnn.search["counted"]
    assert first == 3 and rnn.search["FAIL"] - rnn.search["interrupted"] == first
    assert not [t for t in rnn.search_trials if t.state in queue.LIVE]
    status = rnnbench("status", spec_path, "--root", root, *sets).stdout
    assert "stopped: Divergence" in status and "2/2 cells done (1 stopped)" in status
    parents = {r.data.tags["rnnbench.cell"]: r for r in MlflowClient(Store(root).tracking_uri).search_runs(
        [MlflowClient(Store(root).tracking_uri).get_experiment_by_name("stops").experiment_id],
        "tags.`rnnbench.role` = 'cell'")}
    assert parents["adding(seq_len=6)/rnn"].info.status == "FAILED"
    assert parents["adding(seq_len=6)/rnn"].data.tags["rnnbench.stopped"].startswith("Divergence")

    again = rnnbench("run", spec_path, "--root", root, *sets, check=False)  # stays stopped: nothing runs
    assert again.returncode == 1 and rnn_trials()[1].search["counted"] == first

    retry = rnnbench("run", spec_path, "--root", root, *sets, "--retry-stopped", check=False)
    assert retry.returncode == 1  # the learning rate still diverges: three new failures stop it again
    _, rnn = rnn_trials()
    assert rnn.stopped is not None and rnn.stop_check_from > 0 and rnn.search["counted"] == first + 3


@pytest.mark.slow
def test_report_and_status_take_the_study_file_too(tiny_study, tmp_path):
    """`report` names a study as `run` and `status` do: by its file (its `name` is used) or a store name."""
    out = rnnbench("report", tiny_study.spec, "--root", tiny_study.root, "--out", tmp_path / "r").stdout
    assert "experiment tiny" in out and (tmp_path / "r" / "index.html").exists()
    assert "cells done" in rnnbench("status", tiny_study.spec, "--root", tiny_study.root).stdout
    missing = rnnbench("report", "quickstart", "--root", tiny_study.root, "--out", tmp_path / "q", check=False)
    assert missing.returncode == 2 and "quickstart" in missing.stderr  # the shipped study: its name, not in this store


def test_a_worker_id_other_than_the_hostname_is_left_to_the_heartbeat_rule():
    """`rnnbench worker --worker-id NAME` signs trials NAME:pid: a reaper on this host must not take a dead
    pid of its own for that worker's (containers sharing a hostname), only a silent heartbeat."""
    from types import SimpleNamespace

    from studies.launcher import why_dead

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, now = os.uname().nodename, time.time()

    def trial(worker, beat):
        return SimpleNamespace(user_attrs={"worker": worker, "heartbeat": beat}, datetime_start=None)
    assert why_dead(trial(f"{host}:{dead.pid}", now), host, now, 900, 60) is not None  # hostname: pid checked
    assert why_dead(trial(f"node-7:{dead.pid}", now), host, now, 900, 60) is None  # worker id: not ours to check
    assert why_dead(trial(f"node-7:{dead.pid}", now - 1000), host, now, 900, 60) is not None  # silent: reaped


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_this_machine_lacks_is_one_line_before_anything_is_written(tmp_path):
    proc = rnnbench("run", "quickstart", "--root", tmp_path / "runs", "--device", "cuda", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --device:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_worker_keeps_ignoring_a_signal_it_was_started_ignoring():
    """`rnnbench run ... &` in a shell script: the shell makes the launcher ignore Ctrl-C (SIGINT), its
    workers inherit that, and must not take Ctrl-C as a stop; SIGTERM still stops them."""
    from studies import worker
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        worker.stop_on_signals()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is worker._stop
        signal.signal(signal.SIGINT, signal.default_int_handler)
        worker.stop_on_signals()
        assert signal.getsignal(signal.SIGINT) is worker._stop
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_stop_signal_waits_for_the_store_call_in_progress():
    """Ctrl-C or SIGTERM during a talk with Optuna or MLflow takes effect when it is done, in the launcher as in
    a worker: cut short, a `search_runs` left MLflow's SQLite database locked while the launcher waited for its
    workers, which then could not close their trials (a two-worker stop timed out in CI)."""
    from studies import launcher
    saved = signal.signal(signal.SIGINT, launcher.stop)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with launcher.store_calls():
                with launcher.store_calls():  # nested, as a worker's bookkeeping around top-ups
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.1)  # the handler has run: held back
                    done.append("inner")
                done.append("outer")
        assert done == ["inner", "outer"]  # the whole talk ran, then the stop
        with pytest.raises(KeyboardInterrupt):  # outside a store call: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, saved)


def test_the_launcher_talks_to_the_stores_inside_store_calls(tmp_path, monkeypatch):
    """The store calls of the launcher's loop (progress, reaping, top-ups) run inside store_calls: a launcher
    without workers, stopped at its third wait, with each such call noting whether it is shielded."""
    from studies import launcher
    seen, waits = [], []

    def noting(fn):
        def call(*args, **kwargs):
            seen.append((fn.__name__, launcher._SHIELD["depth"] > 0))
            return fn(*args, **kwargs)
        return call
    for name in ("stop_failing", "reap", "top_up"):
        monkeypatch.setattr(launcher, name, noting(getattr(launcher, name)))

    def wait(seconds):
        waits.append(seconds)
        if len(waits) == 3:
            raise KeyboardInterrupt
        time_sleep(0.02)  # past 10 polls: the loop reaps
    time_sleep = time.sleep
    monkeypatch.setattr(launcher.time, "sleep", wait)
    spec_path = write_spec(tmp_path, STOP)
    spec, _, sha = specs.load(spec_path)
    with pytest.raises(KeyboardInterrupt):
        launcher.run_study(spec, spec_path, sha, Store(tmp_path / "runs"), workers=0, poll=0.001)
    # before the loop, one reap and one top-up run unshielded: no worker exists yet to wait on a lock they leave
    assert seen[:2] == [("reap", False), ("top_up", False)], seen
    assert {name for name, _ in seen[2:]} == {"stop_failing", "reap", "top_up"} and all(s for _, s in seen[2:]), seen
