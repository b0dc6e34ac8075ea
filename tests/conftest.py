"""Shared fixtures. ``tiny_study`` runs one real study (spec -> Optuna -> MLflow) once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TINY = textwrap.dedent("""\
    name: tiny
    seed: 3
    tasks:
      - task: adding
        seq_len: [8, 12]
      - task: copy_memory
        seq_len: 5
        n_copy: 2
    variants: [rnn, lstm]
    model: {hidden_size: 16}
    train: {steps: 40, eval_every: 20, eval_size: 64, batch_size: 16}
    search_space:
      lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
    trials: 2
    replicates: 2
    pruner: none
    """)


def rnnbench(*args, cwd=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "rnnbench", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"rnnbench {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, output=lambda: "", timeout: float = 180) -> bytes:
    """GET ``url`` until it answers; fail early, with ``output()``, if the server ``proc`` exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{output()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{output()}")


@dataclass
class StudyRun:
    spec: Path
    root: Path
    name: str
    stdout: str


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> StudyRun:
    base = tmp_path_factory.mktemp("tiny")
    spec = base / "tiny.yaml"
    spec.write_text(TINY)
    proc = rnnbench("run", spec, "--root", base / "runs")
    return StudyRun(spec, base / "runs", "tiny", proc.stdout)


@pytest.fixture
def registries(tmp_path_factory):
    """Leave VARIANTS, TASKS and sys.modules as found: tests register user cells and tasks (from examples/
    and from pytest's tmp folders), and other tests list every registered name. Only modules from those
    folders are forgotten: a checkout or its venv may itself live under /tmp."""
    from tasks import TASKS
    from variants import VARIANTS

    before = dict(VARIANTS), dict(TASKS), set(sys.modules)
    yield
    for registry, old in zip((VARIANTS, TASKS), before):
        for name in set(registry) - set(old):
            del registry[name]
    folders = (str(Path(__file__).resolve().parent.parent / "examples"), str(tmp_path_factory.getbasetemp()))
    for name in set(sys.modules) - before[2]:
        where = getattr(sys.modules[name], "__file__", None) or ""
        if name == "examples" or where.startswith(folders):
            del sys.modules[name]
