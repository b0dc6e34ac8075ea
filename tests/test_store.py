"""How the Optuna storage tells an outage (wait and retry) from a refused login (one line, at once)."""

from __future__ import annotations

import pytest
import sqlalchemy

from conftest import rnnbench
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
    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    monkeypatch.setattr(store, "OUTAGE_SECONDS", 5)
    flaky = _Flaky([_operational("server closed the connection unexpectedly")] * 100)
    with pytest.raises(store.StoreUnavailable, match="did not answer for"):
        flaky.call()
    assert flaky.calls < 10


@pytest.mark.parametrize("url", ["/tmp/runs/optuna.journal", "bogus://host/db"])
def test_a_storage_that_is_no_database_url_is_one_line(tmp_path, url):
    with pytest.raises(store.StoreURLError, match="is not a database URL such as postgresql://user@host/db"):
        store.Store(tmp_path, url)
    proc = rnnbench("worker", "quickstart", "--root", tmp_path / "runs", "--storage", url, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --storage"), \
        proc.stderr
