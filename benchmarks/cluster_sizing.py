"""How many workers one PostgreSQL server and one MLflow tracking server carry (issue 14's sizing note).

For each N of --workers (2 4 8) the script runs one small, fixed study of many short trials the way a
lab runs a cluster study: a coordinator, `rnnbench run SPEC --workers 0` (it prepares the study and keeps
the queue, and trains nothing), and N separate `rnnbench worker` processes, each with a root of its own,
as Slurm array tasks or other machines' workers would be (`rnnbench run --workers N` would start the same
workers, but as children of the launcher, which then keeps the queue alone; standalone workers also keep
it when idle, which is load on the database a cluster's workers do put on it). All of them meet in one
PostgreSQL server (Optuna's trials) and one MLflow tracking server (PostgreSQL backend, artifacts served
through it), both started here on 127.0.0.1 and stopped at the end, also on Ctrl-C or an error. Each N
gets fresh databases (and so a fresh MLflow server), so no N sees another's trials.

Per N it prints one row of a markdown table:

* trials ended / asked (ended: counted COMPLETE, PRUNED or FAIL; asked: cells x (trials + replicates)),
  and whether every cell got exactly its trials and replicate runs with none left waiting or running;
* trials per minute: ended trials / the time from the study's first claim to its last end (Optuna's
  datetime_start of the first claimed trial, datetime_complete of the last);
* bookkeeping share: 1 - (sum over trials of their training time) / (sum over workers of their wall
  time, process start to exit). A trial's training time is what its worker recorded on its MLflow run:
  `wall_seconds` (claim to end) less `bookkeeping_seconds` (the part of it inside Optuna and MLflow calls):
  building the model, the training steps and the evaluations. Everything else a worker spends its life on
  is the share: Optuna + MLflow calls inside trials (also a column of its own, and in ms per trial),
  start-up (interpreter, imports, waiting for the study to be prepared, to its first claim), and idle
  time (nothing claimable: generation barriers, the study's tail, polling, exit);
* PostgreSQL: the peak number of client connections (pg_stat_activity, sampled every 0.5 s);
* MLflow: the latency of one cheap request that reads the backend (experiments/get-by-name), sent every
  0.5 s from this script while the study runs: median and 95th percentile in ms.

Trials train alone (`train.population: off`), so a run's wall time is its own worker's time.

    python benchmarks/cluster_sizing.py [--workers 2 4 8] [--trials 24] [--replicates 2] [--steps 40]
                                        [--mlflow-workers 2] [--json FILE] [--keep DIR]

Needs the PostgreSQL server binaries (Debian: apt-get install -y postgresql) and psycopg2 (the `test`
extra). As root, PostgreSQL runs as the `postgres` user. Timings depend on the machine and on what else
runs on it: on 2 cores, 8 workers contend for CPU with each other and with both servers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pgcluster import Postgres  # noqa: E402  (beside this script)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SPEC = """\
name: sizing
seed: 0
tasks: [{{task: adding, seq_len: [10, 20]}}]
variants: [rnn, gru]
model: {{hidden_size: 16}}
train: {{steps: {steps}, eval_every: {eval_every}, eval_size: 64, batch_size: 16, population: "off"}}
search_space: {{lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}}}
trials: {trials}
replicates: {replicates}
generation: 8
pruner: none
"""


class Stop(Exception):
    """SIGTERM or SIGHUP: stop like Ctrl-C, cleaning up on the way."""


def _raise_stop(signum, frame):
    raise Stop(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_groups(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM the processes (started with start_new_session=True) still running, each with its whole group
    (a worker closes its trial in hand as interrupted), wait up to ``timeout`` s for them all, SIGKILL what
    is left of those groups, and empty ``procs`` (a reaped pid may be reused: never signal it again)."""
    alive = [proc for proc in procs if proc.poll() is None]
    for proc in alive:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout
    for proc in alive:
        try:
            proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in alive:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (mlflow server -> its workers)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    procs.clear()


class MlflowServer:
    """`mlflow server` over a fresh database of the cluster, artifacts served through it, telemetry off."""

    def __init__(self, postgres: Postgres, database: str, base: Path, workers: int):
        postgres.create_database(database)
        self.backend, self.base, self.workers = postgres.url(database, "psycopg2", password=False), base, workers
        self.port, self.log = free_port(), base / "mlflow-server.log"
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None
        self.env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runners

    def start(self, timeout: float = 300):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend, "--serve-artifacts",
                 "--artifacts-destination", str(self.base / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self):
        if self.proc is not None:
            kill_groups([self.proc])
            self.proc = None


class Monitor(threading.Thread):
    """Every 0.5 s: PostgreSQL's client connections, and the latency of one MLflow request."""

    def __init__(self, postgres: Postgres, tracking: str, study: str):
        super().__init__(daemon=True)
        self.postgres, self.probe = postgres, f"{tracking}/api/2.0/mlflow/experiments/get-by-name?experiment_name={study}"
        self.connections: list[int] = []
        self.latencies: list[float] = []
        self.errors = 0
        self.done = threading.Event()

    def run(self):
        conn = self.postgres.connect()
        try:
            while not self.done.is_set():
                tick = time.monotonic()
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                "AND pid <> pg_backend_pid()")
                    self.connections.append(cur.fetchone()[0])
                start = time.perf_counter()
                try:
                    with urllib.request.urlopen(self.probe, timeout=60) as r:
                        r.read()
                    self.latencies.append(time.perf_counter() - start)
                except urllib.error.HTTPError as e:  # 404 before the study's experiment exists: still a query
                    self.latencies.append(time.perf_counter() - start)
                    self.errors += e.code >= 500
                except OSError:
                    self.errors += 1
                self.done.wait(max(0.0, 0.5 - (time.monotonic() - tick)))
        finally:
            conn.close()


def rnnbench(args: list, log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "rnnbench", *map(str, args)], cwd=log.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def measure(n: int, spec_path: Path, postgres: Postgres, base: Path, args, procs: list) -> dict:
    """Run the study with a coordinator and ``n`` workers over fresh databases; return its row."""
    from mlflow.tracking import MlflowClient

    from studies import queue
    from studies import spec as specs
    from studies.store import Store

    spec, _, _ = specs.load(spec_path)
    cells = specs.cells(spec)
    base.mkdir(parents=True)
    postgres.create_database(f"optuna_w{n}")
    storage = postgres.url(f"optuna_w{n}", "psycopg2", password=False)
    server = MlflowServer(postgres, f"mlflow_w{n}", base, args.mlflow_workers)
    monitor = None
    try:
        server.start()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        common = ["--storage", storage, "--tracking-uri", server.url]
        monitor = Monitor(postgres, server.url, spec.name)
        monitor.start()
        coordinator = rnnbench(["run", spec_path, "--workers", 0, "--root", base / "coordinator", *common],
                               base / "coordinator.log", env)
        procs.append(coordinator)
        workers = {}  # pid -> [process, start, exit]
        for i in range(n):
            p = rnnbench(["worker", spec_path, "--root", base / f"worker-{i}", "--threads", 1, *common],
                         base / f"worker-{i}.log", env)
            procs.append(p)
            workers[p.pid] = [p, time.time(), None]
        end = time.monotonic() + args.timeout
        while any(w[2] is None for w in workers.values()) or coordinator.poll() is None:
            for w in workers.values():
                if w[2] is None and w[0].poll() is not None:
                    w[2] = time.time()
            if time.monotonic() > end:
                raise RuntimeError(f"{n} workers: the study did not end within {args.timeout:.0f} s; logs in {base}")
            time.sleep(0.2)
        failed = {name: p.returncode for name, p in [("coordinator", coordinator)]
                  + [(f"worker pid {pid}", w[0]) for pid, w in workers.items()] if p.returncode != 0}
        if failed:
            raise RuntimeError(f"{n} workers: {failed} exited non-zero; logs in {base}")
        monitor.done.set()
        monitor.join(timeout=60)

        # Optuna: exact counts, the claim-to-end window, each worker's first claim.
        optuna_storage = Store(base / "check", storage).optuna_storage()
        import optuna
        ended, exact, window, first_claim = 0, True, [], {}
        host = socket.gethostname()
        for cell in cells:
            for kind, wanted in (("search", spec.trials), ("replicate", spec.replicates)):
                ts = optuna.load_study(study_name=queue.optuna_name(spec, cell, kind),
                                       storage=optuna_storage).get_trials(deepcopy=False)
                counted = [t for t in ts if queue.counted(t)]
                ended += len(counted)
                exact &= len(counted) == wanted and not [t for t in ts if t.state in queue.LIVE]
                for t in counted:
                    window += [t.datetime_start.timestamp(), t.datetime_complete.timestamp()]
                    pid = t.user_attrs["worker"].rpartition(":")[2]
                    if t.user_attrs["worker"] == f"{host}:{pid}" and pid.isdigit():
                        first_claim[int(pid)] = min(first_claim.get(int(pid), float("inf")),
                                                    t.datetime_start.timestamp())
        asked = len(cells) * (spec.trials + spec.replicates)

        # MLflow: each trial's wall time and the part of it in Optuna and MLflow calls.
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name(spec.name)
        runs = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=10000)
        finished = [r for r in runs if r.info.status != "RUNNING" and "wall_seconds" in r.data.metrics]
        calls = sum(r.data.metrics["bookkeeping_seconds"] for r in finished)
        training = sum(r.data.metrics["wall_seconds"] - r.data.metrics["bookkeeping_seconds"] for r in finished)
        per_worker = {pid: sum(r.data.tags.get("rnnbench.worker") == f"{host}:{pid}" for r in finished)
                      for pid in workers}
    finally:
        if monitor is not None:
            monitor.done.set()
        kill_groups(procs)  # nothing left on success; on an error or Ctrl-C, before their server goes
        server.stop()
    life = sum(w[2] - w[1] for w in workers.values())
    startup = sum(first_claim.get(pid, w[2]) - w[1] for pid, w in workers.items())
    span = max(window) - min(window)
    lat = sorted(monitor.latencies)
    return {
        "workers": n, "ended": ended, "asked": asked, "exact": bool(exact and len(finished) == ended),
        "trials_per_worker": [min(per_worker.values()), max(per_worker.values())],
        "window_seconds": span, "trials_per_minute": ended / span * 60,
        "worker_seconds": life, "training_seconds": training, "calls_seconds": calls, "startup_seconds": startup,
        "bookkeeping_share": 1 - training / life, "calls_share": calls / life, "startup_share": startup / life,
        "idle_share": max(0.0, 1 - (training + calls + startup) / life),
        "calls_ms_per_trial": calls / max(len(finished), 1) * 1000,
        "pg_connections_peak": max(monitor.connections, default=0),
        "mlflow_latency_ms_p50": statistics.median(lat) * 1000 if lat else float("nan"),
        "mlflow_latency_ms_p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1000 if lat else float("nan"),
        "mlflow_probe_errors": monitor.errors,
    }


def table(rows: list[dict]) -> str:
    head = ("| workers | trials ended / asked | exact | trials per worker | trials/min | bookkeeping share "
            "| Optuna+MLflow calls | start-up | idle | calls per trial | PostgreSQL connections (peak) "
            "| MLflow latency p50 / p95 |\n"
            "|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lo, hi = r["trials_per_worker"]
        lines.append(f"| {r['workers']} | {r['ended']} / {r['asked']} | {'yes' if r['exact'] else 'NO'} "
                     f"| {lo}–{hi} | {r['trials_per_minute']:.1f} | {r['bookkeeping_share']:.1%} "
                     f"| {r['calls_share']:.1%} | {r['startup_share']:.1%} | {r['idle_share']:.1%} "
                     f"| {r['calls_ms_per_trial']:.0f} ms | {r['pg_connections_peak']} "
                     f"| {r['mlflow_latency_ms_p50']:.0f} / {r['mlflow_latency_ms_p95']:.0f} ms |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8], help="worker counts to measure")
    ap.add_argument("--trials", type=int, default=24, help="search trials per cell (4 cells)")
    ap.add_argument("--replicates", type=int, default=2, help="replicate runs per cell")
    ap.add_argument("--steps", type=int, default=40, help="training steps per trial (2 evaluations)")
    ap.add_argument("--mlflow-workers", type=int, default=2, help="the MLflow server's --workers (the docs' 2)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one N may take")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="keep the study file and the processes' logs in DIR (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.workers) or args.trials < 1 or args.replicates < 0 or args.steps < 2:
        ap.error("--workers >= 1, --trials >= 1, --replicates >= 0, --steps >= 2")
    if importlib.util.find_spec("psycopg2") is None:
        raise SystemExit("error: psycopg2 is not installed (pip install -e '.[test]')")

    work = args.keep or Path(tempfile.mkdtemp(prefix="rnnbench-sizing-"))
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "sizing.yaml"
    spec_path.write_text(textwrap.dedent(SPEC.format(steps=args.steps, eval_every=args.steps // 2,
                                                     trials=args.trials, replicates=args.replicates)))
    print(f"study: 4 cells (adding T=10, 20 x rnn, gru; hidden 16, {args.steps} steps) x {args.trials} trials "
          f"+ {args.replicates} replicates = {4 * (args.trials + args.replicates)} trials per N; "
          f"coordinator `rnnbench run --workers 0` + N `rnnbench worker`; one PostgreSQL, one MLflow server "
          f"(--workers {args.mlflow_workers}); {os.cpu_count()} CPUs", flush=True)
    previous = {signum: signal.signal(signum, _raise_stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    procs: list[subprocess.Popen] = []
    postgres = None
    rows, code, finished = [], 0, False
    try:
        postgres = Postgres(prefix="rnnbench-sizing-pg-")
        # libpq reads the password from here, in this process (the check reads Optuna's trials) and in every
        # process it starts: no URL carries it.
        os.environ["PGPASSWORD"] = postgres.password
        postgres.start()
        for n in args.workers:
            started = time.monotonic()
            rows.append(measure(n, spec_path, postgres, work / f"w{n}", args, procs))
            print(f"{n} workers: {time.monotonic() - started:.0f} s", flush=True)
        finished = True
    except (KeyboardInterrupt, Stop) as e:
        print(f"stopped ({e or 'Ctrl-C'}): cleaning up", file=sys.stderr)
        code = 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        kill_groups(procs)
        if postgres is not None:
            postgres.stop()
        if args.keep is None and (finished or code == 130):
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep is None:  # an error: keep the logs it names
            print(f"logs kept in {work}", file=sys.stderr)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if rows:
        print()
        print(table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if code == 0 and not all(r["exact"] for r in rows):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
