"""`rnnbench report STUDY --watch`: a live page over a study that is running for real, loaded twice in
headless Chromium; the saved report stays the plain one (no refresh tag), as `--from` writes it."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from conftest import free_port, rnnbench
from reports.watch import with_refresh
from test_dashboard import Lines, chromium, is_png, keep_screenshot, needs_chromium

# One task, two variants, trials long enough that the page has time to change between two loads.
LIVE = textwrap.dedent("""\
    name: live
    seed: 3
    tasks: [{task: adding, seq_len: 8}]
    variants: [rnn, lstm]
    model: {hidden_size: 16}
    train: {steps: 150, eval_every: 50, eval_size: 64, batch_size: 16}
    search_space:
      lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
    trials: 6
    replicates: 0
    pruner: none
    """)
RUNS = re.compile(r"(\d+) runs \(listed in manifest\.json\)")


def test_the_refresh_tag_goes_at_the_end_of_the_head():
    page = "<!doctype html><html><head><meta charset='utf-8'><title>t</title></head><body>x</body></html>"
    assert with_refresh(page, 10) == page.replace("</head>", '<meta http-equiv="refresh" content="10"></head>')
    assert with_refresh("<p>no head</p>", 0.2) == '<meta http-equiv="refresh" content="1"><p>no head</p>'


def test_the_page_is_redrawn_only_when_the_study_has_something_new(tmp_path, monkeypatch):
    """regenerate() returns None when nothing changed: the page stays, said once per quiet stretch."""
    from reports import watch as live
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.html").write_text("<html><head></head><body>report</body></html>")
    ticks = iter([report / "index.html", None, None, report / "index.html", None])
    published, lines = [], []
    monkeypatch.setattr(live.LivePage, "publish", lambda page, folder: published.append(folder))

    def regenerate():
        try:
            return next(ticks)
        except StopIteration:
            raise KeyboardInterrupt from None  # what Ctrl-C raises: the end of the watch
    assert live.watch(regenerate, port=free_port(), interval=0, echo=lines.append) == 0
    assert published == [report, report]
    said = [line.split("] ")[1].split(" in ")[0] for line in lines if line.startswith("[")]
    assert said == ["report regenerated", "nothing new since the last report; it stays", "report regenerated",
                    "nothing new since the last report; it stays"]


def test_watch_needs_a_study_name(tmp_path):
    proc = rnnbench("report", "--from", tmp_path, "--watch", check=False)
    assert proc.returncode == 2 and "--watch follows a study" in proc.stderr


def served_runs(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            found = RUNS.search(r.read().decode())
    except OSError:
        return -1
    return int(found.group(1)) if found else -1


def wait_until(condition, timeout: float, what: str, *procs):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"{what}: a process exited with {p.returncode}"
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
@pytest.mark.timeout(240)
def test_live_page_follows_a_running_study(tmp_path):
    spec, root, port = tmp_path / "live.yaml", tmp_path / "runs", free_port()
    spec.write_text(LIVE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    study = subprocess.Popen([sys.executable, "-m", "rnnbench", "run", str(spec), "--root", str(root)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    watch = subprocess.Popen([sys.executable, "-m", "rnnbench", "report", "live", "--root", str(root), "--watch",
                              "--interval", "2", "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = Lines(watch)
    url = f"http://127.0.0.1:{port}/"
    try:
        assert out.wait_for("live report:", timeout=60) == \
            f"live report: {url}  (checked every 2 s, redrawn when the study moved; Ctrl-C to stop)"
        first = wait_until(lambda: max(served_runs(url), 0), 120, "a report with runs", study, watch)

        shot1 = tmp_path / "live-1.png"
        dom1 = chromium(tmp_path, "--dump-dom", f"--screenshot={shot1}", url, virtual_time_ms=1000)
        runs1 = int(RUNS.search(dom1).group(1))
        assert runs1 >= first and "rnnbench report: live" in dom1

        wait_until(lambda: served_runs(url) > runs1, 120, "a report with more runs", study, watch)
        shot2 = tmp_path / "live-2.png"
        dom2 = chromium(tmp_path, "--dump-dom", f"--screenshot={shot2}", url, virtual_time_ms=1000)
        runs2 = int(RUNS.search(dom2).group(1))
        assert runs2 > runs1, (runs1, runs2)  # the same URL, loaded again, shows the study further on
        assert is_png(shot1) and is_png(shot2)
        keep_screenshot(shot2, "live-report.png")
        assert 'http-equiv="refresh"' in dom2  # the served copy reloads itself...
    finally:
        watch.send_signal(signal.SIGINT)  # what Ctrl-C sends
        study.send_signal(signal.SIGINT)
        watch.wait(timeout=60)
        study.wait(timeout=120)
    assert watch.returncode == 0, out.text()
    assert "stopped; the last report is in" in out.text()
    saved = (root / "reports" / "live" / "index.html").read_text()
    assert "http-equiv" not in saved and "rnnbench report: live" in saved  # ...the saved report does not
