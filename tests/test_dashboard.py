"""`rnnbench dashboard` for real: the MLflow UI, driven by headless Chromium, opens the study in its
model-training view and lists its runs; optuna-dashboard serves the study's Optuna studies; a URL is
printed only once its server answers; a taken port fails at once; Ctrl-C stops both servers.

Set ``RNNBENCH_SCREENSHOTS=docs`` to keep the browser's screenshots in docs/ (the README's pictures).
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, rnnbench, wait_for
from studies import spec as specs
from studies.store import Store
from studies.tracking import run_name

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless browser here: apt-get install -y chromium")
OPTUNA_DASHBOARD = importlib.util.find_spec("optuna_dashboard") is not None  # the `dashboard` extra
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000"]


def chromium(tmp_path, *args, virtual_time_ms: int = 20000) -> str:
    """Run headless Chromium on a fresh profile; returns what it prints (the DOM with --dump-dom).
    ``virtual_time_ms``: how long the page's scripts (and timers) run before the dump."""
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--virtual-time-budget={virtual_time_ms}",
                           f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True, text=True, timeout=120)
    return proc.stdout


def keep_screenshot(shot: Path, name: str) -> None:
    """Copy a screenshot into $RNNBENCH_SCREENSHOTS (e.g. docs), if set."""
    folder = os.environ.get("RNNBENCH_SCREENSHOTS")
    if folder:
        target = Path(__file__).resolve().parent.parent / folder if not Path(folder).is_absolute() else Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target / name)


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


class Lines:
    """A server's output, read line by line in a thread, so that a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [l for l in self.lines if l.lstrip().startswith(prefix)]
            if found:
                return found[0]
            if self.proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line starting with {prefix!r} within {timeout} s:\n" + "\n".join(self.lines))

    def text(self) -> str:
        self.thread.join(timeout=10)
        return "\n".join(self.lines)


# The command in a fresh interpreter, then the slow modules it imported (none, to fail at once)
IN_PROCESS = """
import sys
from click.testing import CliRunner
from rnnbench import cli
result = CliRunner().invoke(cli, sys.argv[1:])
print(result.output, end="")
print("exit", result.exit_code, *sorted(m for m in ("torch", "mlflow", "optuna", "pandas") if m in sys.modules))
"""


@pytest.mark.parametrize("command", [["dashboard"], ["report", "somestudy", "--watch"]])
def test_a_taken_port_fails_at_once_in_one_line(tmp_path, command):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run([sys.executable, "-c", IN_PROCESS, *command, "--root", str(tmp_path / "runs"),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    *output, last = proc.stdout.splitlines()
    assert output == [f"error: port {port} on 127.0.0.1 is already in use (Address already in use); stop what "
                      "holds it or pass another --port"], proc.stdout + proc.stderr
    assert last == "exit 2"  # and nothing slow imported: no torch, MLflow, Optuna or pandas before the check
    assert not (tmp_path / "runs").exists()


def test_a_taken_optuna_port_names_its_own_option(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = rnnbench("dashboard", "--root", tmp_path / "runs", "--port", free_port(), "--optuna",
                        "--optuna-port", port, check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.endswith("stop what holds it or pass another --optuna-port\n"), \
        proc.stderr


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_dashboard_opens_the_study_in_the_training_view_and_stops_cleanly(tiny_study, tmp_path):
    port, optuna_port = free_port(), free_port()
    optuna = ["--optuna", "--optuna-port", str(optuna_port)] if OPTUNA_DASHBOARD else []
    proc = subprocess.Popen([sys.executable, "-m", "rnnbench", "dashboard", "--root", str(tiny_study.root),
                             "--port", str(port), *optuna], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = Lines(proc)
    try:
        ui = out.wait_for("MLflow UI:")
        assert answers(f"http://127.0.0.1:{port}/health"), "the URL was printed before the server answered"
        assert ui == f"MLflow UI: http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning"
        exp = MlflowClient(Store(tiny_study.root).tracking_uri).get_experiment_by_name("tiny")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        link = out.wait_for("study tiny:").split(": ", 1)[1]
        assert link == f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        if OPTUNA_DASHBOARD:
            out.wait_for("optuna-dashboard:")
            studies = json.loads(wait_for(f"http://127.0.0.1:{optuna_port}/api/studies", proc, timeout=10))
            names = {s["study_name"] for s in studies["study_summaries"]}
            assert {"tiny/adding(seq_len=8)/rnn", "tiny/adding(seq_len=8)/rnn/replicates"} <= names

        shot = tmp_path / "mlflow-runs.png"
        dom = chromium(tmp_path, "--dump-dom", f"--screenshot={shot}", link)  # the page after its scripts ran
        assert "tiny" in dom and "matching runs" in dom  # the runs table...
        assert "Judges" not in dom and "Sessions" not in dom  # ...not the GenAI view (traces, sessions, judges)
        cells = [run_name(c) for c in specs.cells(specs.load(tiny_study.spec)[0])]  # e.g. "rnn · adding T=8"
        listed = [c for c in cells if c in dom]
        assert len(listed) >= 3, f"runs listed in the MLflow UI: {listed}"
        assert is_png(shot)
        keep_screenshot(shot, "mlflow-runs.png")
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        proc.wait(timeout=60)
    text = out.text()
    assert proc.returncode == 0, text
    assert refused(port)  # the server and MLflow's uvicorn worker are gone
    if OPTUNA_DASHBOARD:
        assert f"optuna-dashboard: http://127.0.0.1:{optuna_port}" in text and refused(optuna_port)
