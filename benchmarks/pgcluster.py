"""A throwaway PostgreSQL cluster for the distributed tests and the sizing benchmark: its own folder,
127.0.0.1 only, a password, no fsync (the data is thrown away). As root, initdb and the server run as the
``postgres`` user (they refuse root). Debian's PostgreSQL: ``apt-get install -y postgresql``."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server's bin folder (Debian keeps them out of PATH), or None."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """``start()``, ``url(database)``, ``create_database(name)``, ``restart(seconds)``, ``stop()``."""

    def __init__(self, prefix: str = "rnnbench-pg-"):
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install -y postgresql")
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))  # not under pytest's root-only tmp
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.user, self.password, self.port = "rnnbench", secrets.token_hex(16), _free_port()
        (self.dir / "pw").write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.dir / "pw", "postgres")
        self.started = False

    def _run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        argv = [str(self.bindir / cmd[0]), *cmd[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        # A session of its own: a Ctrl-C in the terminal reaches the caller, which stops the server itself.
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, start_new_session=True)
        if check and proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{log}")
        return proc

    def start(self):
        self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={self.dir / 'pw'}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        self._start()

    def _start(self):
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        self.started = True  # from here on, stop() tries to stop it
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def restart(self, down_seconds: float) -> float:
        """Stop the server (closing every connection), keep it down, start it again; returns the seconds
        it was really down."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        down = time.monotonic()
        time.sleep(down_seconds)
        self._start()
        return time.monotonic() - down

    def url(self, database: str, driver: str = "", password: bool = True) -> str:
        """An SQLAlchemy URL; without ``password`` clients read it from PGPASSWORD."""
        scheme = "postgresql+" + driver if driver else "postgresql"
        secret = f":{self.password}" if password else ""
        return f"{scheme}://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database)
        conn.autocommit = True
        return conn

    def create_database(self, name: str):
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def stop(self):
        try:
            if self.started:
                if self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop",
                             check=False).returncode != 0:
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop",
                              check=False)
                self.started = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
