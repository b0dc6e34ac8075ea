"""`rnnbench slurm`: the sbatch script's text (unit tests), the docs' docker-compose file, and, marked
slow and postgres, a real one-node Slurm cluster on this machine running a tiny study's workers as an
array job next to a `rnnbench run` coordinator, over a throwaway PostgreSQL and an MLflow server.

The cluster test needs Slurm and MUNGE (Debian: `apt-get install -y slurm-wlm munge`) and root (the
daemons run as root here); it skips, saying why, without them. It installs nothing and leaves no daemon
or job behind."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import TINY, free_port, rnnbench
from studies import spec as specs
from studies.queue import ENDED, optuna_name
from studies.slurm import check_stores, sbatch_script, shell_quote
from studies.store import Store

REPO = Path(__file__).resolve().parent.parent

ARGS = dict(workers=3, storage="postgresql+psycopg2://rnnbench@db.lab:5432/optuna", tracking_uri="http://db.lab:5000",
            folder=Path("/lab/runs/slurm/tiny"), python="/lab/.venv/bin/python", workdir=Path("/lab"))


def script(**changes) -> str:
    return sbatch_script(Path("/lab/tiny.yaml"), "tiny", **{**ARGS, **changes})


def directives(text: str) -> dict[str, str]:
    return dict(line.removeprefix("#SBATCH --").split("=", 1) for line in text.splitlines()
                if line.startswith("#SBATCH "))


def test_script_is_an_array_of_workers_over_the_shared_stores():
    text = script()
    assert text.startswith("#!/bin/bash\n")
    assert directives(text) == {"job-name": "rnnbench-tiny", "array": "0-2", "ntasks": "1", "cpus-per-task": "1",
                                "output": "/lab/runs/slurm/tiny/%x-%A_%a.out", "chdir": "/lab"}
    # #SBATCH lines must come before the first command, or sbatch ignores them
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert "root=/lab/runs/slurm/tiny/task-$SLURM_ARRAY_TASK_ID\n" in text
    assert ("exec /lab/.venv/bin/python -m rnnbench worker /lab/tiny.yaml "
            "--storage postgresql+psycopg2://rnnbench@db.lab:5432/optuna --tracking-uri http://db.lab:5000 "
            '--root "$root" --threads 1\n') in text
    assert 'worker $(hostname):$$' in text  # the task's rnnbench.worker tag, in its Slurm log


def test_script_options_become_sbatch_lines_and_threads():
    text = script(workers=1, time="02:30:00", partition="gpu", cpus_per_task=4, mem="8G", stale_after=300.0)
    d = directives(text)
    assert ((d["array"], d["time"], d["partition"], d["cpus-per-task"], d["mem"])
            == ("0-0", "02:30:00", "gpu", "4", "8G"))
    assert '--tracking-uri http://db.lab:5000 --stale-after 300 --root "$root" --threads 4\n' in text
    assert "--stale-after" not in script()  # the worker's own default


def test_script_quotes_what_the_shell_would_split():
    text = script(storage="postgresql://u:p&w@db/optuna", python="/opt/my env/bin/python")
    assert ("exec '/opt/my env/bin/python' -m rnnbench worker /lab/tiny.yaml "
            "--storage 'postgresql://u:p&w@db/optuna'") in text
    assert "--storage URL --tracking-uri URI" in text  # the comment names no store (passwords)
    assert text.count("p&w") == 1


def worker_args(text: str, root: str = "/tmp/task-0") -> list[str]:
    """The arguments bash gives the script's worker: its exec line run with printf instead of exec."""
    line = next(line for line in text.splitlines() if line.startswith("exec "))
    proc = subprocess.run(["bash", "-c", f"root={shell_quote(root)}; printf '%s\\0' {line.removeprefix('exec ')}"],
                          capture_output=True, text=True, check=True)
    return proc.stdout.split("\0")[:-1]


def sets_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


# What a shell must not split, expand or end a line at: spaces, quotes, globs, $, ;, a newline.
AWKWARD = ("train.steps=20", "tasks[0].seq_len=[10, 20]", "name=it's $HOME; `id` *", "description=a\nb\tc\\d")


def test_script_passes_the_overrides_to_every_worker_quoted():
    plain, text = script(), script(overrides=AWKWARD, stale_after=60.0)
    assert len(text.splitlines()) == len(plain.splitlines())  # every override on its one line
    assert ("--tracking-uri http://db.lab:5000 --stale-after 60 --set train.steps=20 "
            "--set 'tasks[0].seq_len=[10, 20]' --set 'name=it'\"'\"'s $HOME; `id` *' "
            "--set $'description=a\\nb\\tc\\\\d' --root \"$root\" --threads 1\n") in text
    args = worker_args(text)
    assert args == ["/lab/.venv/bin/python", "-m", "rnnbench", "worker", "/lab/tiny.yaml",
                    "--storage", ARGS["storage"], "--tracking-uri", ARGS["tracking_uri"], "--stale-after", "60",
                    *(arg for o in AWKWARD for arg in ("--set", o)), "--root", "/tmp/task-0", "--threads", "1"]
    # the coordinator command in the header names the same overrides (and no store)
    header = next(line for line in text.splitlines() if line.startswith("#   rnnbench run"))
    assert header.startswith("#   rnnbench run /lab/tiny.yaml --workers 0 --storage URL --tracking-uri URI --set ")
    assert sets_of(worker_args(f"exec {header.removeprefix('#   rnnbench run ')}")) == list(AWKWARD)
    assert "--set" not in plain


@pytest.mark.parametrize("changes, message", [
    ({"workers": 0}, "--workers 0"),
    ({"cpus_per_task": 0}, "--cpus-per-task 0"),
    ({"folder": Path("runs/slurm")}, "absolute"),
    ({"python": "python3"}, "absolute"),
    ({"time": "1 day"}, "--time"),
    ({"partition": ""}, "--partition"),
])
def test_script_refuses(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        script(**changes)


@pytest.mark.parametrize("storage, tracking, message", [
    (None, "http://db:5000", "--storage is required"),
    ("postgresql://u@db/o", None, "--tracking-uri is required"),
    (None, None, "--storage and --tracking-uri are required"),
    ("postgresql://u@db/o", "sqlite:///runs/mlflow.db", "tracking server"),
    ("sqlite:///optuna.db", "http://db:5000", "PostgreSQL"),
])
def test_stores_a_cluster_cannot_share_are_refused(storage, tracking, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_stores(storage, tracking)


def test_command_writes_the_script_and_refuses_in_one_line(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    common = ["--storage", "postgresql://rnnbench:s3cret@db.lab/optuna", "--tracking-uri", "http://db.lab:5000"]
    for args, message in ((["--workers", 2, "--tracking-uri", "http://db.lab:5000"], "--storage is required"),
                          (["--workers", 0, *common], "--workers 0")):
        proc = rnnbench("slurm", spec, *args, "--root", tmp_path / "runs", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()

    proc = rnnbench("slurm", spec, "--workers", 2, *common, "--cpus-per-task", 2, "--root", tmp_path / "runs",
                    cwd=tmp_path)
    out = tmp_path / "runs" / "slurm" / "tiny" / "tiny.sbatch"
    assert f"wrote {out}" in proc.stdout and f"submit: sbatch {out}" in proc.stdout
    assert "--workers 0" in proc.stdout and "s3cret" not in proc.stdout + proc.stderr
    text = out.read_text()
    assert out.stat().st_mode & 0o077 == 0  # it holds the storage URL
    assert directives(text)["array"] == "0-1"
    assert f"exec {sys.executable} -m rnnbench worker {spec} " in text and "--threads 2\n" in text


def test_command_gives_the_workers_the_studys_overrides(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    common = ["--workers", 2, "--storage", "postgresql://rnnbench@db.lab/optuna", "--tracking-uri",
              "http://db.lab:5000", "--root", tmp_path / "runs"]
    # An override the study refuses is one line, exit 2, before anything is written.
    proc = rnnbench("slurm", spec, *common, "--set", "train.steps=30", "--set", "train.stepz=3", cwd=tmp_path,
                    check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: --set train.stepz=3: ") and "train.stepz" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()

    overrides = ["train.steps=30", "tasks[0].seq_len=[8, 10]"]
    proc = rnnbench("slurm", spec, *common, *(a for o in overrides for a in ("--set", o)), cwd=tmp_path)
    text = (tmp_path / "runs" / "slurm" / "tiny" / "tiny.sbatch").read_text()
    assert "--set train.steps=30 --set 'tasks[0].seq_len=[8, 10]' --root \"$root\"" in text
    args = worker_args(text)
    assert sets_of(args) == overrides
    # The workers' study is the coordinator's: same effective text, same hash.
    assert specs.load(args[4], sets_of(args))[2] == specs.load(spec, overrides)[2] != specs.load(spec)[2]
    coordinator = next(line for line in proc.stdout.splitlines() if line.startswith("  rnnbench run "))
    assert coordinator.endswith("--workers 0 --storage postgresql://rnnbench@db.lab/optuna --tracking-uri "
                                "http://db.lab:5000 --set train.steps=30 --set 'tasks[0].seq_len=[8, 10]'"), proc.stdout


def test_docker_compose_file_binds_loopback_and_wires_mlflow_to_postgres():
    path = REPO / "docs" / "docker-compose.yml"
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow"}
    for service in services.values():
        assert service["ports"] and all(str(p).startswith("127.0.0.1:") for p in service["ports"]), service
    mlflow = services["mlflow"]
    assert "--serve-artifacts" in mlflow["command"]
    env = mlflow["environment"]
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    # the +psycopg2 form: SQLAlchemy 2 reads a bare postgresql:// as psycopg 3
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://rnnbench:")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert "CREATE DATABASE mlflow" in compose["configs"]["mlflow-database"]["content"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "rnnbench"


def test_docker_compose_accepts_the_compose_file():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` here to validate docs/docker-compose.yml with")
    proc = subprocess.run([docker, "compose", "-f", str(REPO / "docs" / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, env={**os.environ, "POSTGRES_PASSWORD": "x"})
    assert proc.returncode == 0, proc.stderr


# --- a real one-node Slurm cluster ----------------------------------------------------------------------

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged")


def slurm_skip_reason() -> str | None:
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        return f"no {', '.join(missing)}: apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "the one-node Slurm cluster runs its daemons as root (SlurmUser=root)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """munged, slurmctld and slurmd of a one-node cluster ``localhost``, all in one temporary folder."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="rnnbench-slurm-"))
        self.dir.chmod(0o755)  # munged wants its socket's folder searchable by all
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self):
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._daemon("munged", _binary("munged"), "-F", f"--key-file={key}", f"--socket={d / 'munge.sock'}",
                     f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                     f"--seed-file={d / 'munged.seed'}")
        self._wait(lambda: (d / "munge.sock").exists(), "munged's socket", "munged")
        self.conf.write_text(f"""\
ClusterName=rnnbench-test
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge.sock'}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon("slurmctld", _binary("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._daemon("slurmd", _binary("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait(self._node_idle, "node localhost to be idle", "slurmd")

    def _daemon(self, name, *cmd):
        log = open(self.dir / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _node_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env)
        return proc.returncode == 0 and proc.stdout.strip() == "idle"

    def _wait(self, ready, what: str, daemon: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")))

    def jobs(self, job: str) -> list[str]:
        """The job's array tasks Slurm still holds (pending or running)."""
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True,
                              env=self.env)
        return proc.stdout.split("\n") if proc.stdout.strip() else []

    def cancel(self, job: str):
        """scancel the job and wait (30 s at most) until Slurm holds none of its tasks."""
        subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=30)
        end = time.monotonic() + 30
        while self.jobs(job) and time.monotonic() < end:
            time.sleep(0.5)

    def stop(self):
        """Cancel every job of this cluster (its tasks get SIGTERM), stop the daemons, remove the folder."""
        if all(self.procs.get(name) and self.procs[name].poll() is None for name in ("slurmctld", "slurmd")):
            subprocess.run(["scancel", "--partition", "debug"], env=self.env, capture_output=True, timeout=30)
            end = time.monotonic() + 30
            while time.monotonic() < end and subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                                            text=True).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _pg_fixtures():
    """tests/test_distributed.py's PostgreSQL and MLflow server fixtures, when it is importable."""
    try:
        import test_distributed
    except ImportError as e:  # e.g. psycopg2 missing; the test then skips
        return None, e
    return test_distributed, None


test_distributed, _import_error = _pg_fixtures()
if test_distributed is not None:
    postgres = test_distributed.postgres
    tracking_server = test_distributed.tracking_server
else:
    @pytest.fixture(scope="module")
    def postgres():
        pytest.skip(f"tests/test_distributed.py is not importable: {_import_error}")

    @pytest.fixture(scope="module")
    def tracking_server(postgres):
        pytest.skip("no PostgreSQL")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_workers_run_as_a_slurm_array_job(slurm_cluster, postgres, tracking_server, tmp_path):
    postgres.create_database("slurm")
    storage_url = postgres.url("slurm")
    tracking, _ = tracking_server
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(TINY)
    overrides = ["--set", "train.steps=30"]  # the array's workers must get them, or they refuse the study
    spec, _, _ = specs.load(spec_path, overrides[1::2])
    cells = specs.cells(spec)
    common = ["--storage", storage_url, "--tracking-uri", tracking, *overrides]
    env = {**slurm_cluster.env, "PYTHONUNBUFFERED": "1"}

    log = tmp_path / "coordinator.log"
    job = None
    coordinator = None
    try:
        # The array first: its tasks wait for the study to be prepared.
        submit = subprocess.run([sys.executable, "-m", "rnnbench", "slurm", spec_path, "--workers", "2", *common,
                                 "--root", tmp_path / "runs", "--time", "00:15:00", "--stale-after", "600",
                                 "--submit"],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        job = re.search(r"submitted job (\d+)", submit.stdout).group(1)
        with open(log, "wb") as out:
            coordinator = subprocess.Popen([sys.executable, "-m", "rnnbench", "run", spec_path, "--root",
                                            tmp_path / "coordinator", "--workers", "0", "--stale-after", "600",
                                            *common],
                                           stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                           start_new_session=True)
        coordinator.wait(timeout=600)
        end = time.monotonic() + 120  # the tasks exit once they see the study done
        while slurm_cluster.jobs(job) and time.monotonic() < end:
            time.sleep(1)
        task_logs = sorted((tmp_path / "runs" / "slurm" / "tiny").glob(f"rnnbench-tiny-{job}_*.out"))
        report = (f"coordinator (exit {coordinator.returncode}):\n{log.read_text()[-3000:]}\n"
                  + "".join(f"--- {p.name}:\n{p.read_text()[-3000:]}\n" for p in task_logs)
                  + f"squeue: {slurm_cluster.jobs(job)}\n{slurm_cluster.logs()}")
        assert coordinator.returncode == 0, report
        assert not slurm_cluster.jobs(job), report
        job_done = job
        job = None  # nothing left to cancel
    finally:
        if coordinator is not None and coordinator.poll() is None:
            os.killpg(coordinator.pid, signal.SIGTERM)
            coordinator.wait(timeout=60)
        if job is not None:
            slurm_cluster.cancel(job)  # the cluster itself stops with its fixture

    # Two array tasks, each one worker, both finished the study.
    assert [p.name for p in task_logs] == [f"rnnbench-tiny-{job_done}_{i}.out" for i in (0, 1)], report
    names = {}
    for i, p in enumerate(task_logs):
        text = p.read_text()
        assert "worker done" in text, report
        names[i] = re.search(rf"task {i} of job {job_done}: worker (\S+)", text).group(1)
        assert (tmp_path / "runs" / "slurm" / "tiny" / f"task-{i}").is_dir()
    assert len(set(names.values())) == 2, names

    # Exact counts in Optuna, nothing interrupted.
    storage = Store(tmp_path / "check", storage_url).optuna_storage()
    workers = set()
    for cell in cells:
        for kind, wanted in (("search", spec.trials), ("replicate", spec.replicates)):
            ts = optuna.load_study(study_name=optuna_name(spec, cell, kind), storage=storage).get_trials()
            assert len([t for t in ts if t.state in ENDED]) == wanted == len(ts), (cell.key, kind, ts)
            assert not [t for t in ts if "interrupted" in t.user_attrs]
            workers |= {t.user_attrs["worker"] for t in ts}

    # Every run came from one of the two Slurm tasks: the coordinator (`run --workers 0`) trains nothing.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=1000)
    assert len(runs) == len(cells) * (spec.trials + spec.replicates)
    assert {r.data.params["steps"] for r in runs} == {"30"}  # trained as overridden
    tags = {r.data.tags["rnnbench.worker"] for r in runs}
    assert tags == workers == set(names.values()), (tags, workers, names)
    per_task = {i: sum(r.data.tags["rnnbench.worker"] == w for r in runs) for i, w in names.items()}
    print(f"\nruns per Slurm task: {per_task}")
