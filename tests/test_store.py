"""How the Optuna storage tells an outage (wait and retry) from a refused login (one line, at once)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy

from conftest import free_port, rnnbench
from studies import store


class _Flaky:
    url_for_humans = "postgresql+psycopg2://host/db"

    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    @store._riding_outages
    def call(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "answer"


def _operational(message: str) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(message))


def test_a_lost_connection_is_retried_until_the_database_answers(monkeypatch, capsys):
    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    flaky = _Flaky([_operational('connection to server at "127.0.0.1", port 5432 failed: Connection refused')] * 3)
    assert flaky.call() == "answer" and flaky.calls == 4
    assert "not answering" in capsys.readouterr().err


@pytest.mark.parametrize("message", ['FATAL:  password authentication failed for user "rnnbench"',
                                     'FATAL:  database "rnnbenhc" does not exist'])
def test_a_refused_login_is_one_line_at_once(monkeypatch, message):
    monkeypatch.setattr(store.time, "sleep", lambda s: pytest.fail("a refused login is not an outage"))
    flaky = _Flaky([_operational(message)])
    with pytest.raises(store.StoreUnavailable) as e:
        flaky.call()
    assert flaky.calls == 1 and "\n" not in str(e.value)
    assert str(e.value) == f"the Optuna database postgresql+psycopg2://host/db refused the connection: {message}"


def test_an_outage_longer_than_the_limit_ends_in_one_line(monkeypatch):
    slept = []
    monkeypatch.setattr(store.time, "sleep", slept.append)
    monkeypatch.setattr(store, "OUTAGE_SECONDS", 5)
    flaky = _Flaky([_operational("server closed the connection unexpectedly")] * 100)
    with pytest.raises(store.StoreUnavailable, match="did not answer for 5 s;"):  # not the backoff's overshoot
        flaky.call()
    assert flaky.calls < 10 and sum(slept) == 5


def test_a_full_database_says_so(monkeypatch, capsys):
    """The server's own reason ("too many connections") rides along in the waiting line and the final error."""
    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    monkeypatch.setattr(store, "OUTAGE_SECONDS", 1)
    flaky = _Flaky([_operational("FATAL:  sorry, too many clients already")] * 100)
    with pytest.raises(store.StoreUnavailable, match="too many clients already"):
        flaky.call()
    assert "too many clients already" in capsys.readouterr().err


def test_a_tracking_server_that_does_not_answer_is_one_line(tmp_path):
    """A note at once (MLflow's client would retry silently for minutes), then one line, exit 2, nothing a bug."""
    url = f"http://127.0.0.1:{free_port()}"
    assert "does not answer" in store.probe_tracking(url) and store.probe_tracking(None) is None
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.run([sys.executable, "-m", "rnnbench", "run", "quickstart", "--root", tmp_path / "runs",
                           "--tracking-uri", url, "--workers", "0"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    note, error = proc.stderr.splitlines()
    assert note.startswith(f"note: the MLflow tracking server {url} does not answer"), proc.stderr
    assert error.startswith(f"error: the MLflow tracking server {url} did not answer"), proc.stderr
    assert "the study is safe" in error


def test_a_storage_password_is_never_shown():
    from rnnbench import _shown
    assert _shown("postgresql+psycopg2://rnnbench:s3cret@db:5432/optuna") == "postgresql+psycopg2://rnnbench@db:5432/optuna"
    assert _shown("postgresql://rnnbench@db/optuna") == "postgresql://rnnbench@db/optuna"


@pytest.mark.parametrize("url", ["/tmp/runs/optuna.journal", "bogus://host/db"])
def test_a_storage_that_is_no_database_url_is_one_line(tmp_path, url):
    with pytest.raises(store.StoreURLError, match="is not a database URL such as postgresql://user@host/db"):
        store.Store(tmp_path, url)
    proc = rnnbench("worker", "quickstart", "--root", tmp_path / "runs", "--storage", url, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --storage"), \
        proc.stderr
