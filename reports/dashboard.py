"""Browse a study store live: the MLflow UI (runs, metrics, the report run's artifacts) and, on request,
optuna-dashboard (the search itself: trials, parameter importances, history).

Both servers bind loopback by default (neither has a login) and run in their own process groups,
so stopping the command (Ctrl-C or SIGTERM) stops them and every worker process they started.
A port already in use is refused before anything starts (:func:`check_port`), and a server's URL is
printed only once it answers.

MLflow 3.17 opens experiments in its GenAI view (traces, sessions, judges). What decides the view is the
UI's workflow switch (the sidebar's "GenAI | Model training" toggle), which it reads from the URL's
``workflowType`` query parameter before the browser's saved choice: the links printed here carry
``workflowType=machine_learning``, so they open the runs table. Each study's experiment is also tagged
``mlflow.experimentKind = custom_model_development`` (``studies.tracking.describe_experiment``), the
experiment type the UI's own type selector records.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

OPTUNA_SERVER = ("import sys, optuna_dashboard; "
                 "optuna_dashboard.run_server(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]))")


TRAINING_VIEW = "workflowType=machine_learning"  # the MLflow UI's "Model training" view, not GenAI


class PortInUse(OSError):
    """Something already listens on the port a server was asked to use."""


def check_port(host: str, port: int, option: str = "--port") -> None:
    """Raise :class:`PortInUse` if ``host:port`` cannot be bound now (as a server would bind it: with
    SO_REUSEADDR, so a port left in TIME_WAIT by a stopped server counts as free); the message names the
    command-line ``option`` that sets the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUse(f"port {port} on {host} is already in use ({e.strerror}); stop what holds it or "
                            f"pass another {option}") from None


@dataclass(frozen=True)
class Server:
    name: str
    url: str  # where to point a browser
    command: list[str]
    ready: str = ""  # a URL that answers once the server serves
    pages: tuple[tuple[str, str], ...] = field(default=())  # (label, URL) printed under ``url``


def mlflow_ui(tracking_uri: str, artifact_root: str | None, host: str, port: int, workers: int = 1,
              experiments: dict[str, str] | None = None) -> Server:
    """``experiments``: study name -> experiment id, each printed as a link to its runs table."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", str(workers)]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    base = f"http://{host}:{port}"
    pages = tuple((f"study {name}", experiment_url(base, exp_id)) for name, exp_id in (experiments or {}).items())
    return Server("MLflow UI", f"{base}/#/experiments?{TRAINING_VIEW}", cmd, f"{base}/health", pages)


def experiment_url(base: str, experiment_id: str) -> str:
    """An experiment's runs table in the MLflow UI, in the model-training view."""
    return f"{base}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def optuna_dashboard(storage: str, host: str, port: int) -> Server:
    """``storage``: an RDB URL, or the path of the journal file (optuna-dashboard opens it as a
    JournalStorage with a file backend, read through the same file lock as the workers)."""
    base = f"http://{host}:{port}"
    return Server("optuna-dashboard", base, [sys.executable, "-c", OPTUNA_SERVER, storage, host, str(port)],
                  f"{base}/api/studies")


def answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 500
    except OSError:  # refused, reset, timed out, HTTP errors
        return False


def serve(servers: list[Server], echo=print, ready_timeout: float = 300.0) -> int:
    """Start every server, print its URL once it answers, wait until Ctrl-C/SIGTERM or until one exits;
    stop them all. Returns the exit code: 0 when stopped by the user, else the code of the server that
    exited (1 if one did not answer within ``ready_timeout`` seconds)."""
    # Ctrl-C must reach us even when a non-interactive shell started us with SIGINT ignored.
    old = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs: list[subprocess.Popen] = []
    code = 0
    try:
        for s in servers:
            procs.append(subprocess.Popen(s.command, env=env, start_new_session=True))
        waiting = list(zip(servers, procs))
        deadline = time.monotonic() + ready_timeout
        while waiting and all(p.poll() is None for p in procs):
            for s, p in list(waiting):
                if answers(s.ready or s.url):
                    echo(f"{s.name}: {s.url}")
                    for label, url in s.pages:
                        echo(f"  {label}: {url}")
                    waiting.remove((s, p))
            if waiting and time.monotonic() > deadline:
                echo(f"{waiting[0][0].name} did not answer within {ready_timeout:.0f} s; stopping")
                return 1
            if waiting:
                time.sleep(0.25)
        if not waiting:
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
