"""Browse a study store live: the MLflow UI (runs, metrics, the report run's artifacts) and, on request,
optuna-dashboard (the search itself: trials, parameter importances, history).

Both servers bind loopback by default (neither has a login) and run in their own process groups,
so stopping the command (Ctrl-C or SIGTERM) stops them and every worker process they started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

OPTUNA_SERVER = ("import sys, optuna_dashboard; "
                 "optuna_dashboard.run_server(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]))")


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    command: list[str]


def mlflow_ui(tracking_uri: str, artifact_root: str | None, host: str, port: int, workers: int = 1) -> Server:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", str(workers)]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    return Server("MLflow UI", f"http://{host}:{port}", cmd)


def optuna_dashboard(storage: str, host: str, port: int) -> Server:
    """``storage``: an RDB URL, or the path of the journal file (optuna-dashboard opens it as a
    JournalStorage with a file backend, read through the same file lock as the workers)."""
    return Server("optuna-dashboard", f"http://{host}:{port}", [sys.executable, "-c", OPTUNA_SERVER,
                                                                 storage, host, str(port)])


def serve(servers: list[Server], echo=print) -> int:
    """Start every server, print its URL, wait until Ctrl-C/SIGTERM or until one exits; stop them all.
    Returns the exit code: 0 when stopped by the user, else the code of the server that exited."""
    # Ctrl-C must reach us even when a non-interactive shell started us with SIGINT ignored.
    old = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs: list[subprocess.Popen] = []
    code = 0
    try:
        for s in servers:
            procs.append(subprocess.Popen(s.command, env=env, start_new_session=True))
            echo(f"{s.name}: {s.url}")
        echo("Ctrl-C to stop")
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = next(p for p in procs if p.poll() is not None)
        code = dead.returncode or 1
        echo(f"{servers[procs.index(dead)].name} exited with code {dead.returncode}; stopping the others")
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        stop(procs)
        for s, handler in old.items():
            signal.signal(s, handler)
    return code


def stop(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM each server's process group (uvicorn workers included), SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
