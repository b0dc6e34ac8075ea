"""Where a study's results live: one Optuna storage and one MLflow tracking store.

Embedded default, under ``--root`` (``./runs``):

    runs/optuna.journal    Optuna JournalStorage (file backend): safe for several local processes
    runs/optuna.journal.top-up.lock   taken by whoever enqueues trials (studies.queue.exclusive)
    runs/mlflow.db         MLflow tracking store (SQLite), artifacts in runs/artifacts/
    runs/reports/<study>/  reports
    runs/logs/             worker logs
    runs/run.lock          held while `rnnbench run` and its workers are alive

Distributed: ``--storage postgresql://...`` (Optuna RDB) and ``--tracking-uri http://HOST:PORT``
(an MLflow tracking server) replace the first two; everything else stays local.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported anywhere
# With a tracking server, MlflowClient.set_terminated prints two "View run ... at: URL" lines per run
# (and fetches the run again to do so): noise in worker logs that also breaks the launcher's live bar.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402

logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables..."
import optuna  # noqa: E402
import sqlalchemy.exc  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from optuna.storages.journal import JournalFileBackend, JournalStorage  # noqa: E402


def rdb_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare ``postgresql://`` as the psycopg 3 driver; when only psycopg2 (what
    the ``test`` extra installs) is here, name it, so the documented URL works as written."""
    if (url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None
            and importlib.util.find_spec("psycopg2") is not None):
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


# How long a process waits for a database that stopped answering before it gives up (seconds).
OUTAGE_SECONDS = float(os.environ.get("RNNBENCH_OUTAGE_SECONDS", 300))


class StoreUnavailable(RuntimeError):
    """The Optuna database did not answer for ``OUTAGE_SECONDS``."""


class StoreURLError(ValueError):
    """A ``--storage`` that SQLAlchemy cannot read as a database URL."""


# A server that answers and refuses the login or names no such database: waiting will not help.
_REFUSED = ("authentication failed", "no password supplied", "pg_hba.conf", "does not exist")


def _connection_error(error: BaseException) -> BaseException | None:
    """The error (``error`` or one it was raised from) saying the database connection failed, as opposed to
    a query the database refused; None if there is none. Optuna wraps both in StorageInternalError
    ("invalid data...")."""
    while error is not None:
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or \
                getattr(error, "connection_invalidated", False):
            return error
        error = error.__cause__ or error.__context__
    return None


def _riding_outages(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        waited, delay, said = 0.0, 0.5, False
        while True:
            try:
                return method(self, *args, **kwargs)
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
                lost = _connection_error(e)
                if lost is None:
                    raise
                why = str(getattr(lost, "orig", None) or lost).strip().splitlines()
                if any(words in str(lost) for words in _REFUSED):  # a refused login is no outage
                    raise StoreUnavailable(f"the Optuna database {self.url_for_humans} refused the connection: "
                                           f"{why[0] if why else type(lost).__name__}") from e
                said_by_server = next((line.strip() for line in why if "FATAL:" in line), None)
                if waited >= OUTAGE_SECONDS:
                    raise StoreUnavailable(f"the Optuna database {self.url_for_humans} did not answer for "
                                           f"{waited:.0f} s" + (f" ({said_by_server})" if said_by_server else "")
                                           + "; the study is safe: run the same command again once it is back") from e
                if not said:
                    print(f"[{time.strftime('%H:%M:%S')}] the Optuna database is not answering "
                          f"({type(e.__cause__ or e).__name__}" + (f": {said_by_server}" if said_by_server else "")
                          + f"); retrying for up to {OUTAGE_SECONDS:.0f} s", file=sys.stderr, flush=True)
                    said = True
                delay = min(delay, OUTAGE_SECONDS - waited)  # give up at OUTAGE_SECONDS, not up to 10 s later
                time.sleep(delay)
                waited += delay
                delay = min(2 * delay, 10.0)
    return call


class OutageTolerantRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose every call rides out a database outage (a restart, a lost connection):
    it retries with backoff for up to ``OUTAGE_SECONDS``, then raises :class:`StoreUnavailable`.

    A retried write whose first attempt got through before the connection died is harmless in the
    trial protocol: a second claim of a trial fails (the trial goes RUNNING without a worker and is
    reaped), a second ``tell`` finds the trial ended and the worker mirrors its state, a second enqueue
    leaves a duplicate slot that ``studies.queue.claim`` closes."""

    def __init__(self, url: str, **kwargs):
        self.url_for_humans = url.split("@")[-1] if "@" in url else url  # no password in messages
        _riding_outages(optuna.storages.RDBStorage.__init__)(self, url, **kwargs)

    @contextmanager
    def exclusive(self, name: str):
        """Hold the lock ``name`` for the block against every process using this database: a PostgreSQL
        transaction-level advisory lock, released when the block's connection closes, or by the server if this
        process dies or loses the connection. Other databases: no lock."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        conn = self._locked(key)
        try:
            yield
        finally:
            try:
                conn.close()  # rolls back: the lock goes with the transaction
            except sqlalchemy.exc.SQLAlchemyError:
                pass  # the connection is gone, and the lock with it

    @_riding_outages
    def _locked(self, key: int):
        conn = self.engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        except BaseException:
            conn.close()
            raise
        return conn


# Every method that opens a session of its own, private ones included: Optuna's _CachedStorage (which
# every Study puts in front of an RDBStorage) calls some of those.
for _name, _member in vars(optuna.storages.RDBStorage).items():
    if (inspect.isfunction(_member) and not _name.startswith("__")
            and "session" not in inspect.signature(_member).parameters):
        setattr(OutageTolerantRDBStorage, _name, _riding_outages(_member))


def tracking_lost(error: BaseException) -> bool:
    """Whether ``error`` is MLflow's client giving up on the tracking server (after its own retries), not a
    request the server refused."""
    from mlflow.exceptions import MlflowException
    text = str(error)
    return isinstance(error, MlflowException) and ("Max retries exceeded" in text or "Connection" in text)


def tracking_lost_message(error: BaseException) -> str:
    """One line for :func:`tracking_lost`: the server (no credentials), why, and what to do."""
    text = str(error)
    why = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text) or re.search(r"Caused by (\w+)", text)
    uri = re.sub(r"://[^/@]*@", "://", mlflow.get_tracking_uri())
    return (f"the MLflow tracking server {uri} did not answer ({why.group(1) if why else 'no connection'}) after "
            "MLflow's retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES); the study is safe: run the same command again "
            "once it is back")


def probe_tracking(uri: str | None, timeout: float = 5.0) -> str | None:
    """A note if the tracking server ``uri`` (http) does not answer its /health now, else None: MLflow's client
    would otherwise retry it silently for minutes."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    import urllib.request
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        return None
    except Exception as e:  # noqa: BLE001 - any failure: refused, timeout, an HTTP error, a bad name
        reason = getattr(e, "reason", None) or e
        return (f"note: the MLflow tracking server {re.sub(r'://[^/@]*@', '://', uri)} does not answer ({reason}); "
                "MLflow's client retries it for about 4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES) before this stops")


class RootBusy(RuntimeError):
    """Another `rnnbench run` (or one of its workers) is using this root."""


@dataclass(frozen=True)
class Store:
    root: Path
    storage_url: str | None = None  # Optuna RDB URL; None: the journal file under root
    tracking: str | None = None  # MLflow tracking URI; None: sqlite under root

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())
        if self.storage_url:
            try:
                sqlalchemy.engine.make_url(rdb_url(self.storage_url)).get_dialect()
            except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as e:
                raise StoreURLError(f"--storage {self.storage_url!r} is not a database URL such as "
                                    f"postgresql://user@host/db ({e}); the embedded store under --root needs "
                                    "no --storage") from None

    @property
    def tracking_uri(self) -> str:
        return self.tracking or f"sqlite:///{self.mlflow_db}"

    @property
    def distributed(self) -> bool:
        return self.storage_url is not None

    def optuna_storage(self) -> optuna.storages.BaseStorage:
        if self.storage_url:
            # Several processes meeting an empty database at once race to create Optuna's tables
            # (PostgreSQL: "duplicate key ... pg_type_typname_nsp_index"); the loser's retry finds them.
            for attempt in range(6):
                try:
                    return OutageTolerantRDBStorage(rdb_url(self.storage_url), engine_kwargs={"pool_pre_ping": True})
                except sqlalchemy.exc.SQLAlchemyError:  # connection errors were retried inside
                    if attempt == 5:
                        raise
                    time.sleep(0.5 * (attempt + 1))
        self.root.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.journal)))

    def mlflow_client(self) -> MlflowClient:
        if self.tracking is None:
            self.root.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        return MlflowClient(self.tracking_uri)

    def experiment_id(self, client: MlflowClient, study: str, create: bool = False) -> str | None:
        exp = client.get_experiment_by_name(study)
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        location = None if self.tracking else (self.root / "artifacts").as_uri()
        return client.create_experiment(study, artifact_location=location)

    def reports_dir(self, study: str) -> Path:
        return self.root / "reports" / study

    def logs_dir(self) -> Path:
        path = self.root / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def journal(self) -> Path:
        return self.root / "optuna.journal"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    def journal_id(self) -> tuple[int, int] | None:
        """The journal file's identity (device, inode), None while there is none: another one mid-run means
        the file was deleted or replaced under the study."""
        try:
            st = self.journal.stat()
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def repair_journal(self) -> None:
        """Undo what a process killed while writing the journal leaves behind: a stale lock file
        (Optuna would wait 30 s for it) and a last line cut short (it would break the next read once
        more lines follow). Only safe while holding the run lock: then nobody else writes."""
        for stale in self.root.glob("optuna.journal.lock*"):
            stale.unlink(missing_ok=True)
        if not self.journal.exists():
            return
        data = self.journal.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.journal, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def lock(self, wait_for_orphans: float = 60.0) -> int:
        """Take the root's run lock; returns its file descriptor (inherited by workers, so the lock
        lives until the launcher and every worker are gone). The lock file names the launcher's pid:
        if that launcher is dead, the holders are its workers, closing their trials on the way out
        (they die with their launcher), so wait up to ``wait_for_orphans`` seconds for them."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "run.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_for_orphans
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = path.read_text().strip()
                if not (owner.isdigit() and not pid_alive(int(owner))) or time.monotonic() > deadline:
                    os.close(fd)
                    raise RootBusy(f"{self.root}: another `rnnbench run` or its workers are still running here"
                                   + (f" (launcher pid {owner})" if owner.isdigit() else "")
                                   + "; wait for it, stop it, or use another --root") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
