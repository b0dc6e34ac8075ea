"""`rnnbench dashboard` for real: the MLflow UI, driven by headless Chromium, lists the study and its
runs; optuna-dashboard serves the study's Optuna studies; Ctrl-C stops both servers."""

import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, wait_for
from studies.store import Store

CHROMIUM = shutil.which("chromium")


def exited_output(proc):
    """The server's output for an error message; a live server's pipe is not read (it would block)."""
    return lambda: proc.stdout.read() if proc.poll() is not None else "(still running)"

OPTUNA_DASHBOARD = importlib.util.find_spec("optuna_dashboard") is not None  # the `dashboard` extra
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no headless browser here: apt-get install -y chromium")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=20000", "--window-size=1400,1000"]




def chromium(tmp_path, *args) -> str:
    """Run headless Chromium on a fresh profile; returns what it prints (the DOM with --dump-dom)."""
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True,
                          text=True, timeout=120)
    return proc.stdout


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_dashboard_shows_the_study_in_a_browser_and_stops_cleanly(tiny_study, tmp_path):
    port, optuna_port = free_port(), free_port()
    optuna = ["--optuna", "--optuna-port", str(optuna_port)] if OPTUNA_DASHBOARD else []
    proc = subprocess.Popen([sys.executable, "-m", "rnnbench", "dashboard", "--root", str(tiny_study.root),
                             "--port", str(port), *optuna], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, exited_output(proc))
        if OPTUNA_DASHBOARD:
            studies = json.loads(wait_for(f"http://127.0.0.1:{optuna_port}/api/studies", proc, exited_output(proc), timeout=60))
            names = {s["study_name"] for s in studies["study_summaries"]}
            assert {"tiny/adding(seq_len=8)/rnn", "tiny/adding(seq_len=8)/rnn/replicates"} <= names

        exp = MlflowClient(Store(tiny_study.root).tracking_uri).get_experiment_by_name("tiny")
        url = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs"
        shot = tmp_path / "mlflow-ui.png"
        dom = chromium(tmp_path, "--dump-dom", f"--screenshot={shot}", url)  # the page after its scripts ran
        assert "tiny" in dom and "matching runs" in dom
        cells = ["adding(seq_len=8)/rnn", "adding(seq_len=8)/lstm", "adding(seq_len=12)/rnn",
                 "adding(seq_len=12)/lstm", "copy_memory(seq_len=5,n_copy=2)/rnn", "copy_memory(seq_len=5,n_copy=2)/lstm"]
        listed = [c for c in cells if c in dom]
        assert len(listed) >= 3, f"runs listed in the MLflow UI: {listed}"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        shutil.copyfile(shot, tiny_study.root / "mlflow-ui.png")  # kept with the study for a look by hand
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"MLflow UI: http://127.0.0.1:{port}" in out
    assert refused(port)  # the server and MLflow's uvicorn worker are gone
    if OPTUNA_DASHBOARD:
        assert f"optuna-dashboard: http://127.0.0.1:{optuna_port}" in out and refused(optuna_port)
