"""The `rnnbench` command: run studies, watch them, report on them.

    rnnbench run SPEC [--root DIR] [--workers N]     run (or resume) a study
    rnnbench worker SPEC [--storage URL ...]         an extra worker, e.g. on another machine
    rnnbench status SPEC                             trials per cell
    rnnbench report STUDY | --from DIR --out DIR     tables, statistics, figures, index.html
    rnnbench dashboard [--optuna]                    the MLflow UI (and optuna-dashboard) over the store
    rnnbench list variants|tasks                     what exists
    rnnbench bench                                   speed of every variant against nn.LSTM
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import click  # noqa: E402

ROOT = click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
                    show_default=True, help="Folder of the embedded study store.")
STORAGE = click.option("--storage", default=None, metavar="URL",
                       help="Optuna RDB storage shared by several machines, e.g. postgresql://user@host/db.")
TRACKING = click.option("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking server shared by several machines, e.g. http://host:5000.")
THREADS = click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
                       help="torch threads per worker.")


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def user_errors(fn):
    """Turn the project's user-facing errors into one line on stderr and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from studies.engine import StudyChanged
        from studies.spec import SpecError
        from studies.store import RootBusy
        from tasks import TaskSettingError
        try:
            return fn(*args, **kwargs)
        except (SpecError, StudyChanged, RootBusy, TaskSettingError, LookupError) as e:
            raise UserError(str(e).strip("'\"")) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Benchmarks and ablation studies of recurrent cells on long-dependency tasks."""


def _store(root, storage=None, tracking_uri=None):
    from studies.store import Store
    return Store(root, storage, tracking_uri)


@cli.command()
@click.argument("spec")
@ROOT
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Worker processes.")
@THREADS
@STORAGE
@TRACKING
@click.option("--stale-after", type=float, default=900, show_default=True,
              help="Seconds without a heartbeat after which a remote worker's trial is closed as interrupted.")
@user_errors
def run(spec, root, workers, threads, storage, tracking_uri, stale_after):
    """Run (or resume) the study in SPEC: a study file, or the name of a shipped one (e.g. quickstart)."""
    from studies import spec as specs
    from studies.engine import run_study
    from studies.progress import Display

    parsed, path, sha = specs.load(spec)
    store = _store(root, storage, tracking_uri)
    click.echo(f"study {parsed.name}: {len(specs.cells(parsed))} cells x {parsed.trials} trials "
               f"(+{parsed.replicates} replicates each), {workers} worker(s), store {store.root}")
    try:
        with Display(parsed) as display:
            rows = run_study(parsed, path, sha, store, workers=workers, threads=threads, stale_after=stale_after,
                             on_progress=display.update)
    except KeyboardInterrupt:
        click.echo("stopped: the trials in hand were closed as interrupted; run the same command to resume", err=True)
        sys.exit(130)
    failed = sum(r.search["FAIL"] - r.search["interrupted"] + r.replicate["FAIL"] - r.replicate["interrupted"]
                 for r in rows)
    click.echo(f"done: {parsed.name}" + (f" ({failed} failed trials; see `rnnbench status`)" if failed else ""))
    where = f"--storage {storage} --tracking-uri {tracking_uri}" if storage else f"--root {root}"
    if tracking_uri and not storage:
        where += f" --tracking-uri {tracking_uri}"
    click.echo(f"report:    rnnbench report {parsed.name} {where}")
    click.echo(f"dashboard: {tracking_uri}" if tracking_uri and tracking_uri.startswith("http")
               else f"dashboard: rnnbench dashboard {where}")


@cli.command()
@click.argument("spec")
@ROOT
@THREADS
@STORAGE
@TRACKING
@user_errors
def worker(spec, root, threads, storage, tracking_uri):
    """Run trials of a study prepared by `rnnbench run` until it is done (start more on other machines)."""
    from studies import spec as specs
    from studies.engine import run_worker

    parsed, _, sha = specs.load(spec)
    try:
        n = run_worker(parsed, sha, _store(root, storage, tracking_uri), threads)
    except KeyboardInterrupt:
        click.echo("worker stopped; its trial in hand was closed as interrupted", err=True)
        sys.exit(130)
    click.echo(f"worker done: {n} trials")


@cli.command()
@click.argument("spec")
@ROOT
@STORAGE
@user_errors
def status(spec, root, storage):
    """Trials finished/pruned/failed/running per cell, best objective, replication progress."""
    from studies import spec as specs
    from studies.engine import progress
    from studies.progress import status_table

    parsed, _, _ = specs.load(spec)
    store = _store(root, storage)
    if not store.distributed and not (store.root / "optuna.journal").exists():
        raise UserError(f"{store.root}: no study store here yet; run `rnnbench run {spec} --root {root}` first")
    status_table(parsed, progress(parsed, store.optuna_storage()))


@cli.command()
@click.argument("study", required=False)
@ROOT
@STORAGE
@TRACKING
@click.option("--from", "source", type=click.Path(exists=True, path_type=Path), default=None, metavar="TABLE",
              help="Regenerate from a saved report (its folder or its results.parquet) alone: no MLflow, no Optuna.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where to write the report. Default: ROOT/reports/STUDY, or the --from folder.")
@click.option("--reference", default=None, metavar="VARIANT",
              help="Variant label the statistics compare every other variant with. "
                   "Default: the study file's `reference`, else lstm, else the first variant.")
@user_errors
def report(study, root, storage, tracking_uri, source, out, reference):
    """Write tables, statistics, figures and index.html for STUDY (or regenerate them with --from).

    \b
    rnnbench report STUDY [--root DIR]        collect from MLflow + Optuna, write ROOT/reports/STUDY/
    rnnbench report --from TABLE --out DIR    redraw everything from a saved report, byte for byte
    """
    from reports import tables as saved
    from reports.build import build_report, publish

    if (study is None) == (source is None):
        raise UserError("give a STUDY name or --from TABLE (a saved report folder), not both or neither")
    if source is not None:
        folder = saved.locate(source)
        index = build_report(saved.load(folder), out or folder, reference, source=folder)
    else:
        from reports.collect import collect

        store = _store(root, storage, tracking_uri)
        if tracking_uri is None and not (store.root / "mlflow.db").exists():
            raise UserError(f"{store.root}: no study store here; run a study first or pass --root")
        optuna_storage = store.optuna_storage() if storage or (store.root / "optuna.journal").exists() else None
        client = store.mlflow_client()
        index = build_report(collect(client, study, optuna_storage), out or store.reports_dir(study), reference)
        run_id = publish(client, study, index.parent)
        click.echo(f"logged to MLflow: experiment {study}, run {run_id} (tag rnnbench.role=report)")
    click.echo(f"report: {index}")
    click.echo(f"open it: xdg-open {index}   (or python -m http.server -d {index.parent})")


@cli.command()
@ROOT
@STORAGE
@TRACKING
@click.option("--port", type=int, default=5000, show_default=True, help="Port of the MLflow UI.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; keep loopback unless you mean it.")
@click.option("--optuna", "with_optuna", is_flag=True, help="Also start optuna-dashboard over the Optuna storage.")
@click.option("--optuna-port", type=int, default=8080, show_default=True, help="Port of optuna-dashboard.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="MLflow UI server processes (one is plenty for one person).")
def dashboard(root, storage, tracking_uri, port, host, with_optuna, optuna_port, workers):
    """Start the MLflow UI over the study store, and with --optuna optuna-dashboard (Ctrl-C stops both)."""
    from reports import dashboard as dash
    from studies.store import rdb_url

    store = _store(root, storage, tracking_uri)
    servers = []
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        click.echo(f"MLflow UI: {tracking_uri}  (the tracking server is the dashboard)")
    else:
        servers.append(dash.mlflow_ui(store.tracking_uri, None if tracking_uri else (store.root / "artifacts").as_uri(),
                                      host, port, workers))
    if with_optuna:
        import importlib.util
        if importlib.util.find_spec("optuna_dashboard") is None:
            raise UserError("optuna-dashboard is not installed: pip install 'rnnbench[dashboard]'")
        journal = store.root / "optuna.journal"
        if storage is None and not journal.exists():
            raise UserError(f"{journal}: no Optuna storage here; run a study first or pass --root/--storage")
        servers.append(dash.optuna_dashboard(rdb_url(storage) if storage else str(journal), host, optuna_port))
    click.echo(f"store: {store.tracking_uri}" + (f" and {storage or journal}" if with_optuna else ""))
    if servers:
        sys.exit(dash.serve(servers, click.echo))


@cli.command("list")
@click.argument("what", type=click.Choice(["variants", "tasks"]))
def list_(what):
    """List the variants or tasks a study file can name."""
    if what == "variants":
        from variants import VARIANTS
        for v in VARIANTS.values():
            click.echo(f"{v.name:14s} {v.description}  [{v.paper}]")
    else:
        from tasks import TASKS
        for name, t in TASKS.items():
            click.echo(f"{name:20s} {t.description}  [{t.paper}]")


@cli.command()
@click.option("--variants", "names", multiple=True, help="Variants to time (repeatable); default all.")
@click.option("--batch", type=click.IntRange(1), default=64, show_default=True)
@click.option("--hidden", type=click.IntRange(1), default=128, show_default=True)
@click.option("--seq-len", type=click.IntRange(1), default=200, show_default=True)
@click.option("--input-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True)
def bench(names, batch, hidden, seq_len, input_size, threads, repeats):
    """Forward and backward milliseconds per batch of every variant, and the ratio to torch.nn.LSTM
    measured in the same run (medians after warm-up)."""
    from variants import VARIANTS
    from variants.bench import benchmark, format_table

    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    click.echo(f"B={batch} H={hidden} T={seq_len} input={input_size} threads={threads}, median of {repeats}")
    rows = benchmark(list(names) or None, batch=batch, hidden=hidden, seq_len=seq_len, threads=threads,
                     input_size=input_size, repeats=repeats)
    click.echo(format_table(rows))


def main():
    cli(prog_name="rnnbench")


if __name__ == "__main__":
    main()
