"""Distributed mode for real: a throwaway PostgreSQL cluster (Optuna RDB storage, and the MLflow
server's backend), an MLflow tracking server on 127.0.0.1, `rnnbench run` with one worker of its own and
two `rnnbench worker` processes with roots of their own standing in for other machines (one of them
started before the launcher). Then: exact trial counts in Optuna, exactly one MLflow run per started
trial read back through the server, parent/child runs intact, artifacts uploaded through the server, and
trials spread over more than one worker process.

Needs the PostgreSQL server binaries (Debian: `apt-get install -y postgresql`; CI installs them); skips,
saying why, without them. Installs nothing and leaves no server running."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import TINY, free_port, rnnbench, wait_for
from studies import spec as specs
from studies import queue
from studies.queue import ENDED, optuna_name
from studies.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from pgcluster import Postgres, pg_bindir  # noqa: E402
from test_queue import two_top_ups_at_once  # noqa: E402

pytestmark = pytest.mark.postgres


def skip_reason() -> str | None:
    if pg_bindir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install -y postgresql"
    if os.geteuid() == 0:
        try:
            import pwd
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def postgres():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    pg = Postgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()




def stop(proc: subprocess.Popen, timeout: float = 30):
    """SIGTERM a process started with start_new_session=True and everything it started, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (mlflow server -> uvicorn)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class MlflowServer:
    """`mlflow server` with a database of the cluster as backend store, artifacts proxied to a folder;
    it can be stopped and started again on the same port."""

    def __init__(self, postgres, base: Path, database: str):
        postgres.create_database(database)
        self.backend = postgres.url(database, "psycopg2")  # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
        self.base, self.port, self.log = base, free_port(), base / "server.log"
        self.url, self.artifacts, self.proc = f"http://127.0.0.1:{self.port}", base / "artifacts", None

    def start(self):
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes: 2 cores here
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                                          "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
                                          "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for(f"{self.url}/health", self.proc, lambda: self.log.read_text()[-5000:])

    def stop(self):
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    server = MlflowServer(postgres, tmp_path_factory.mktemp("mlflow-server"), "mlflow")
    try:
        server.start()
        yield server.url, server.artifacts
    finally:
        server.stop()


def start(args, log: Path, cwd: Path) -> subprocess.Popen:
    out = open(log, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "rnnbench", *map(str, args)], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        out.close()


def test_two_top_ups_at_once_take_turns_on_a_postgresql_advisory_lock(postgres, tmp_path, monkeypatch):
    """A launcher and a launcher-less worker topping up at once (what left a duplicate trial, closed as
    interrupted, in the study below): each slot is enqueued once."""
    postgres.create_database("topup")
    url = postgres.url("topup")
    slots = two_top_ups_at_once(tmp_path, lambda: Store(tmp_path / "store", url).optuna_storage(), monkeypatch)
    assert len(slots) == 4 and all(s == [0, 1] for s in slots.values()), slots


OUTAGE = 30  # seconds the database is down mid-study


def wait_for_trials(storage_url: str, spec, ended: int, procs: dict, timeout: float = 240) -> None:
    """Until ``ended`` search trials of the study have ended (fail early if a process exits)."""
    storage = Store(Path(tempfile.mkdtemp()), storage_url).optuna_storage()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert all(p.poll() is None for p in procs.values()), "a process exited before the outage"
        n = 0
        for cell in specs.cells(spec):
            try:
                n += sum(t.state in ENDED for t in optuna.load_study(
                    study_name=optuna_name(spec, cell, "search"), storage=storage).get_trials(deepcopy=False))
            except KeyError:
                pass
        if n >= ended:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {ended} trials ended in {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_launcher_and_remote_workers_share_postgres_and_a_tracking_server(postgres, tracking_server, tmp_path):
    postgres.create_database("optuna")
    storage_url = postgres.url("optuna")  # the plain URL the docs show
    tracking, artifacts = tracking_server
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(TINY.replace("replicates: 2", "replicates: 1").replace("steps: 40", "steps: 200"))
    spec, _, _ = specs.load(spec_path)
    cells = specs.cells(spec)
    common = ["--storage", storage_url, "--tracking-uri", tracking]

    logs = {name: tmp_path / f"{name}.log" for name in ("early", "launcher", "late")}
    procs = {}
    try:
        # A remote worker started before the launcher waits for the study to be prepared.
        procs["early"] = start(["worker", spec_path, "--root", tmp_path / "early", *common], logs["early"], tmp_path)
        time.sleep(3)
        procs["launcher"] = start(["run", spec_path, "--root", tmp_path / "launcher", "--workers", 1, *common],
                                  logs["launcher"], tmp_path)
        procs["late"] = start(["worker", spec_path, "--root", tmp_path / "late", *common], logs["late"], tmp_path)
        # Mid-study, the database goes down for 30 s (the MLflow server loses its backend too): every
        # process must wait for it and go on.
        wait_for_trials(storage_url, spec, ended=3, procs=procs)
        down = postgres.restart(OUTAGE)
        restarted = time.monotonic()
        end = time.monotonic() + 480
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        report = "\n".join(f"--- {n} (exit {p.poll()}):\n{logs[n].read_text()[-3000:]}" for n, p in procs.items())
        assert all(p.poll() == 0 for p in procs.values()), report
    finally:
        for proc in procs.values():
            stop(proc)
    out = {name: log.read_text() for name, log in logs.items()}
    print(f"\nPostgreSQL down {down:.1f} s; the study finished {time.monotonic() - restarted:.1f} s after it "
          f"came back; processes that said they were waiting: "
          f"{sorted(n for n, text in out.items() if 'database is not answering' in text)}")
    assert "database is not answering" in "".join(out.values())  # the outage was seen, and ridden out
    assert "worker done" in out["early"] and "worker done" in out["late"], out
    assert "done: tiny" in out["launcher"], out["launcher"]
    assert "View run" not in "".join(out.values())  # MLflow's per-run URL lines are silenced

    # Optuna, read from PostgreSQL: exact counts, nothing left running or waiting, nothing interrupted.
    storage = Store(tmp_path / "check", storage_url, tracking).optuna_storage()
    trials = {}
    for cell in cells:
        for kind, wanted in (("search", spec.trials), ("replicate", spec.replicates)):
            ts = optuna.load_study(study_name=optuna_name(spec, cell, kind), storage=storage).get_trials()
            assert len([t for t in ts if t.state in ENDED]) == wanted == len(ts), \
                (cell.key, kind, [(t.number, t.state.name, t.datetime_start, t.user_attrs) for t in ts])
            assert not [t for t in ts if "interrupted" in t.user_attrs]
            trials[(cell.key, kind)] = ts
    started = [t for ts in trials.values() for t in ts]
    assert all("mlflow_run_id" in t.user_attrs for t in started)

    # MLflow, through the tracking server: one run per started trial, statuses matching, parents intact.
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    assert len(by_id) == len(runs) == len(started)
    assert set(by_id) == {t.user_attrs["mlflow_run_id"] for t in started}
    status_of = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    for t in started:
        assert by_id[t.user_attrs["mlflow_run_id"]].info.status == status_of[t.state], t
    parents = {r.info.run_id: r for r in
               client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'cell'", max_results=1000)}
    assert sorted(r.data.tags["rnnbench.cell"] for r in parents.values()) == sorted(c.key for c in cells)
    assert all(r.info.status == "FINISHED" for r in parents.values())
    for (key, kind), ts in trials.items():
        for t in ts:
            run = by_id[t.user_attrs["mlflow_run_id"]]
            parent = parents[run.data.tags["mlflow.parentRunId"]]
            assert parent.data.tags["rnnbench.cell"] == run.data.tags["rnnbench.cell"] == key
            assert run.data.tags["rnnbench.kind"] == kind
            assert run.data.tags["rnnbench.worker"] == t.user_attrs["worker"]

    # Replicate runs' artifact went through the server into its artifact store.
    replicate_runs = [r for r in runs if r.data.tags["rnnbench.kind"] == "replicate"]
    assert len(replicate_runs) == len(cells) * spec.replicates
    for run in replicate_runs:
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["grad_by_lag.json"]
    grads = json.loads(Path(client.download_artifacts(replicate_runs[0].info.run_id, "grad_by_lag.json",
                                                      str(tmp_path))).read_text())
    assert set(grads) == {"init", "trained"}
    assert len(list(artifacts.rglob("grad_by_lag.json"))) == len(cells) * spec.replicates
    assert not (tmp_path / "launcher" / "artifacts").exists() and not (tmp_path / "launcher" / "mlflow.db").exists()

    # More than one process did the work (three ran; at least two must have got trials).
    assert len({r.data.tags["rnnbench.worker"] for r in runs}) >= 2

    status = rnnbench("status", spec_path, "--storage", storage_url, cwd=tmp_path).stdout
    total = len(cells) * (spec.trials + spec.replicates)
    assert f"{total}/{total} trials ended, 0 running, {len(cells)}/{len(cells)} cells done" in status


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_study_rides_out_a_minute_without_its_database_a_tracking_server_restart_and_a_dead_launcher(
        postgres, tmp_path):
    """A lab's bad day: PostgreSQL down for 60 s, then the MLflow server restarted, then the launcher
    killed (kill -9) and started again; a remote worker lives through all of it and the counts are exact."""
    postgres.create_database("optuna2")
    storage_url = postgres.url("optuna2")
    server = MlflowServer(postgres, tmp_path, "mlflow2")
    server.start()
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(TINY.replace("name: tiny", "name: badday").replace("replicates: 2", "replicates: 1")
                         .replace("steps: 40", "steps: 300"))
    spec, _, _ = specs.load(spec_path)
    common = ["--storage", storage_url, "--tracking-uri", server.url]
    logs = {name: tmp_path / f"{name}.log" for name in ("launcher", "remote", "launcher2")}
    procs = {}
    try:
        procs["launcher"] = start(["run", spec_path, "--root", tmp_path / "l", "--workers", 1, *common],
                                  logs["launcher"], tmp_path)
        procs["remote"] = start(["worker", spec_path, "--root", tmp_path / "r", *common], logs["remote"], tmp_path)
        wait_for_trials(storage_url, spec, ended=2, procs=procs)
        down = postgres.restart(60)
        server.stop()
        server.start()
        wait_for_trials(storage_url, spec, ended=4, procs=procs, timeout=400)
        os.kill(procs["launcher"].pid, signal.SIGKILL)  # the launcher alone; its worker dies with it
        procs["launcher"].wait()
        del procs["launcher"]
        procs["launcher2"] = start(["run", spec_path, "--root", tmp_path / "l", "--workers", 1, *common],
                                   logs["launcher2"], tmp_path)
        for name, proc in procs.items():
            proc.wait(timeout=900)
        report = "\n".join(f"--- {n} (exit {p.poll()}):\n{logs[n].read_text()[-3000:]}" for n, p in procs.items())
        assert all(p.returncode == 0 for p in procs.values()), report
    finally:
        for proc in procs.values():
            stop(proc)
        server.stop()
    out = {name: log.read_text() for name, log in logs.items()}
    print(f"\nPostgreSQL down {down:.1f} s, MLflow server restarted, launcher killed and restarted")
    assert "database is not answering" in "".join(out.values())
    storage = Store(tmp_path / "check", storage_url, server.url).optuna_storage()
    for cell in specs.cells(spec):
        for kind, wanted in (("search", spec.trials), ("replicate", spec.replicates)):
            ts = optuna.load_study(study_name=optuna_name(spec, cell, kind), storage=storage).get_trials()
            assert len([t for t in ts if queue.counted(t)]) == wanted, (cell.key, kind, ts)
            assert not [t for t in ts if t.state in queue.LIVE]
    server.start()
    try:
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("badday")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert not [r for r in runs if r.info.status == "RUNNING"]
    finally:
        server.stop()
