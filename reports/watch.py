"""A live study page (`rnnbench report STUDY --watch`): the report regenerated every few seconds while the
study runs (when its logs changed), served on loopback with a page that reloads itself, until Ctrl-C.

    watch(regenerate, host="127.0.0.1", port=8050, interval=10)

``regenerate()`` writes the report as `rnnbench report` does (``ROOT/reports/STUDY/``) and returns its
index.html, or None when the study has nothing new since its last report (the page stays as it is). The server
never serves that folder: after each regeneration the folder is copied into a snapshot, and only the
snapshot's index.html gets the ``<meta http-equiv="refresh">`` tag. So the saved report stays byte for byte
what `rnnbench report --from` writes, and a browser never sees a report half written: the server switches to a
new snapshot once it is complete.
"""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from reports.dashboard import PortInUse, answers

WAITING = ("<!doctype html><html><head><meta charset='utf-8'><title>rnnbench: waiting</title></head>"
           "<body><h1>rnnbench: waiting for the first report</h1><p>{}</p></body></html>\n")


def with_refresh(page: str, seconds: float) -> str:
    """``page`` with a ``<meta http-equiv="refresh">`` tag at the end of its head (after the charset)."""
    tag = f'<meta http-equiv="refresh" content="{max(1, round(seconds))}">'
    end = re.search(r"</head\s*>", page, re.IGNORECASE)
    return page[:end.start()] + tag + page[end.start():] if end else tag + page


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    folder: Path  # the snapshot being served; replaced whole by the watch loop


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, request, client_address, server):
        super().__init__(request, client_address, server, directory=str(server.folder))

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")  # a reload must fetch the new figures too
        super().end_headers()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # one line per request would bury the watch loop's own lines


class LivePage:
    """The server and its snapshots. ``publish(folder)`` serves a copy of ``folder``; ``stop()`` ends it."""

    def __init__(self, host: str, port: int, refresh: float):
        self.refresh = refresh
        self.snapshots = Path(tempfile.mkdtemp(prefix="rnnbench-watch-"))
        self.count = 0
        self.served: list[Path] = []
        try:
            self.server = _Server((host, port), _Handler, bind_and_activate=False)
            self.server.allow_reuse_address = True
            self.server.server_bind()
            self.server.server_activate()
        except OSError as e:
            shutil.rmtree(self.snapshots, ignore_errors=True)
            raise PortInUse(f"port {port} on {host} is already in use ({e.strerror}); stop what holds it or "
                            "pass another --port") from None
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        self.waiting("starting")
        self.thread = threading.Thread(target=self.server.serve_forever, name="live-report", daemon=True)
        self.thread.start()

    def _next(self) -> Path:
        self.count += 1
        return self.snapshots / str(self.count)

    def _switch(self, snapshot: Path) -> None:
        self.server.folder = snapshot
        self.served.append(snapshot)
        for old in self.served[:-2]:  # the previous one may still be answering a request
            shutil.rmtree(old, ignore_errors=True)
        self.served = self.served[-2:]

    def waiting(self, why: str) -> None:
        """Serve a page that says why there is no report yet (and reloads itself too)."""
        import html
        snapshot = self._next()
        snapshot.mkdir()
        (snapshot / "index.html").write_text(with_refresh(WAITING.format(html.escape(why)), self.refresh))
        self._switch(snapshot)

    def publish(self, folder: Path) -> None:
        snapshot = self._next()
        shutil.copytree(folder, snapshot)
        index = snapshot / "index.html"
        index.write_text(with_refresh(index.read_text(), self.refresh))
        self._switch(snapshot)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.snapshots, ignore_errors=True)


def watch(regenerate: Callable[[], Path], host: str = "127.0.0.1", port: int = 8050, interval: float = 10.0,
          echo=print) -> int:
    """Regenerate the report, serve it, wait ``interval`` seconds, again, until Ctrl-C; returns 0.

    A regeneration that fails (the study is not in MLflow yet, a store busy for a moment) keeps the page
    it had and is tried again at the next tick; ``LookupError`` (no such study yet) reads as waiting.
    Raises :class:`PortInUse` at once if the port is taken.
    """
    page = LivePage(host, port, interval)
    stop, saved, unchanged = threading.Event(), None, False

    def interrupt(signum, frame):  # noted too: Python drops a KeyboardInterrupt raised inside a finalizer
        stop.set()
        raise KeyboardInterrupt
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt) if main else None
    try:
        if not answers(page.url):
            raise RuntimeError(f"the live page's server at {page.url} does not answer")
        echo(f"live report: {page.url}  (checked every {interval:g} s, redrawn when the study moved; Ctrl-C to stop)")
        while not stop.is_set():
            started = time.monotonic()
            try:
                index = regenerate()
            except LookupError as e:
                if saved is None:
                    page.waiting(str(e))
                echo(f"[{time.strftime('%H:%M:%S')}] waiting: {e}")
            except Exception as e:  # noqa: BLE001 - a failed regeneration is retried; the page stays
                echo(f"[{time.strftime('%H:%M:%S')}] report not regenerated: {type(e).__name__}: {e}")
            else:
                if index is not None:
                    saved, unchanged = index, False
                    page.publish(saved.parent)
                    echo(f"[{time.strftime('%H:%M:%S')}] report regenerated in {time.monotonic() - started:.1f} s")
                elif not unchanged:  # said once, until something new comes
                    unchanged = True
                    echo(f"[{time.strftime('%H:%M:%S')}] nothing new since the last report; it stays")
            stop.wait(max(0.0, interval - (time.monotonic() - started)))  # every interval s, from start to start
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        page.stop()
    echo("stopped" + (f"; the last report is in {saved.parent}" if saved else ""))
    return 0
