"""benchmarks/cluster_sizing.py, the sizing note's measurement, at 2 workers and a tiny budget: its own
PostgreSQL and MLflow server, a coordinator and two `rnnbench worker` processes; the table's counts are
exact and its shares are fractions; nothing it started outlives it, also after a Ctrl-C.

Marked slow and postgres; skips, saying why, without the PostgreSQL server binaries (Debian:
`apt-get install -y postgresql`) or psycopg2, as tests/test_distributed.py does."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "cluster_sizing.py"

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _skip_reason() -> str | None:
    try:
        from test_distributed import skip_reason
    except ImportError as e:  # e.g. psycopg2 missing
        return f"tests/test_distributed.py is not importable: {e}"
    return skip_reason()


@pytest.fixture(autouse=True)
def _needs_postgres():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


PG_PREFIX = str(Path(tempfile.gettempdir()) / "rnnbench-sizing-pg-")  # the script's database folders


def pg_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("rnnbench-sizing-pg-*"))


def processes_under(folder: Path | str) -> list[str]:
    """Command lines of live processes that name ``folder`` (the script's workers, coordinator, servers; a
    string: any path starting with it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in args:
            found.append(args)
    return found


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.timeout(900)
def test_two_workers_exact_counts_and_a_share_between_0_and_1(tmp_path):
    before = pg_folders()
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workers", "2", "--trials", "2", "--replicates", "1",
                           "--steps", "20", "--json", str(tmp_path / "rows.json"), "--keep", str(work)],
                          capture_output=True, text=True, timeout=840, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out

    # The markdown table: a header, its rule, one row for N = 2.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(lines) == 3, out
    head, row = cells(lines[0]), dict(zip(cells(lines[0]), cells(lines[2])))
    assert head[:3] == ["workers", "trials ended / asked", "exact"], head
    assert row["workers"] == "2"
    assert row["trials ended / asked"] == "12 / 12"  # 4 cells x (2 trials + 1 replicate)
    assert row["exact"] == "yes"
    lo, hi = map(int, row["trials per worker"].split("–"))
    assert lo + hi == 12
    share = float(row["bookkeeping share"].rstrip("%")) / 100
    assert 0 < share < 1, row
    assert float(row["trials/min"]) > 0
    assert int(row["PostgreSQL connections (peak)"]) > 0
    assert re.fullmatch(r"\d+ / \d+ ms", row["MLflow latency p50 / p95"]), row

    [data] = json.loads((tmp_path / "rows.json").read_text())
    assert (data["ended"], data["asked"], data["exact"]) == (12, 12, True)
    assert 0 < data["bookkeeping_share"] < 1 and data["training_seconds"] > 0
    parts = data["calls_share"] + data["startup_share"] + data["idle_share"]
    assert parts == pytest.approx(data["bookkeeping_share"], abs=1e-6) or data["idle_share"] == 0, data
    assert data["mlflow_probe_errors"] == 0

    # Both servers and every process are gone, the database's folder removed.
    assert pg_folders() == before
    assert not processes_under(work) and not processes_under(PG_PREFIX)
    assert {p.name for p in work.iterdir()} == {"sizing.yaml", "w2"}


@pytest.mark.timeout(600)
def test_ctrl_c_stops_every_process_and_server_it_started(tmp_path):
    before = pg_folders()
    work = tmp_path / "work"
    log = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--workers", "2", "--keep", str(work)], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        end = time.monotonic() + 300
        worker_log = work / "w2" / "worker-1.log"
        while not (worker_log.exists() and processes_under(work / "w2" / "worker-1")):
            assert proc.poll() is None and time.monotonic() < end, (tmp_path / "out.log").read_text()
            time.sleep(0.5)
        time.sleep(5)  # mid-study
        assert pg_folders() != before and processes_under(work)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends (its children have sessions of their own)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = (tmp_path / "out.log").read_text()
    assert proc.returncode == 130, out
    assert "cleaning up" in out
    assert pg_folders() == before, out
    assert not processes_under(work) and not processes_under(PG_PREFIX), processes_under(work)
