"""Where a study's results live: one Optuna storage and one MLflow tracking store.

Embedded default, under ``--root`` (``./runs``):

    runs/optuna.journal    Optuna JournalStorage (file backend): safe for several local processes
    runs/mlflow.db         MLflow tracking store (SQLite), artifacts in runs/artifacts/
    runs/reports/<study>/  reports
    runs/logs/             worker logs
    runs/run.lock          held while `rnnbench run` and its workers are alive

Distributed: ``--storage postgresql://...`` (Optuna RDB) and ``--tracking-uri http://HOST:PORT``
(an MLflow tracking server) replace the first two; everything else stays local.
"""

from __future__ import annotations

import fcntl
import logging
import importlib.util
import os
import time
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


class RootBusy(RuntimeError):
    """Another `rnnbench run` (or one of its workers) is using this root."""


@dataclass(frozen=True)
class Store:
    root: Path
    storage_url: str | None = None  # Optuna RDB URL; None: the journal file under root
    tracking: str | None = None  # MLflow tracking URI; None: sqlite under root

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def tracking_uri(self) -> str:
        return self.tracking or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def distributed(self) -> bool:
        return self.storage_url is not None

    def optuna_storage(self) -> optuna.storages.BaseStorage:
        if self.storage_url:
            # Several processes meeting an empty database at once race to create Optuna's tables
            # (PostgreSQL: "duplicate key ... pg_type_typname_nsp_index"); the loser's retry finds them.
            for attempt in range(6):
                try:
                    return optuna.storages.RDBStorage(rdb_url(self.storage_url), engine_kwargs={"pool_pre_ping": True})
                except sqlalchemy.exc.SQLAlchemyError:
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

    def lock(self) -> int:
        """Take the root's run lock; returns its file descriptor (inherited by workers, so the lock
        lives until the launcher and every worker are gone)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RootBusy(f"{self.root}: another `rnnbench run` or its workers are still running here; "
                           "wait for it, stop it, or use another --root") from None
        return fd
