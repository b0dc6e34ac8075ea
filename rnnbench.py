"""The `rnnbench` command: run studies, watch them, report on them.

    rnnbench run SPEC [--root DIR] [--workers N]     run (or resume) a study
    rnnbench plan SPEC [--workers N]                 check a study, estimate its cost; runs nothing
    rnnbench worker SPEC [--storage URL ...]         an extra worker, e.g. on another machine
    rnnbench slurm SPEC --workers N --storage URL ...  workers as a Slurm array job (sbatch script)
    rnnbench status SPEC                             trials per cell
    rnnbench report STUDY | --from DIR --out DIR     tables, statistics, figures, index.html
    rnnbench dashboard [--optuna]                    the MLflow UI (and optuna-dashboard) over the store
    rnnbench list variants|tasks                     what exists
    rnnbench check variant|task NAME [--imports F]   a cell or task (yours too) against the interface
    rnnbench bench                                   speed of every variant against nn.LSTM
"""

from __future__ import annotations

import os
import re
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
DEVICE = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                      help="Where workers train: auto = cuda when torch sees a GPU, else cpu.")
STALE_AFTER = click.option("--stale-after", type=float, default=900, show_default=True,
                           help="Seconds without a heartbeat after which a worker's trial is closed as interrupted.")
SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                   help="Override a field of the study file, VALUE read as YAML (repeatable): train.steps=200, "
                        "tasks[0].seq_len=[10,20]. Workers of the study need the same --set.")
THREADS = click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
                       help="torch threads per worker.")


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def _user_error_types() -> tuple[type[Exception], ...]:
    """The project's own error types: imported only when an error is being handled (they live in
    modules that are slow to import)."""
    from studies.launcher import JournalLost, WorkersDying
    from studies.queue import StudyChanged
    from studies.spec import SpecError
    from studies.store import RootBusy, StoreUnavailable, StoreURLError
    from studies.tracking import LostTrials
    from tasks import TaskSettingError
    return (SpecError, StudyChanged, RootBusy, StoreUnavailable, StoreURLError, WorkersDying, JournalLost,
            TaskSettingError, LostTrials)


def user_errors(fn):
    """Turn the project's user-facing errors into one line on stderr and exit code 2.

    Only the project's own error types, plain ``LookupError``, which reports/ raises for a study or saved
    report that is not there, an ``OSError`` saying a folder cannot be written (read-only, permission,
    disk full, a file where a folder of its path should be), and MLflow's client giving up on a tracking
    server that does not answer. Anything else is a bug: :class:`Cli` shows its traceback.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:  # said already (a UserError, a usage error): nothing slow to import
            raise
        except OSError as e:
            import errno
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.ENOTDIR):
                raise
            raise UserError(f"{e.filename or 'a file'}: {e.strerror} (a store, report or cache folder must be "
                            "writable: check --root, --out)") from None
        except Exception as e:
            from studies.store import tracking_lost, tracking_lost_message
            if tracking_lost(e):  # MLflow's client gave up on the tracking server: an outage, not a bug
                raise UserError(tracking_lost_message(e)) from None
            if not (isinstance(e, _user_error_types()) or type(e) is LookupError):
                raise  # KeyError, IndexError...: a bug, not a missing study or report
            if _debug():  # the traceback behind it: e.g. inside a study file's own module, else where it was said
                import traceback
                traceback.print_exception(e.__cause__ or e, file=sys.stderr)
            raise UserError(str(e)) from None
    return wrapper


class Cli(click.Group):
    """The command group. An exception no command turned into a one-line error is a bug: show its
    traceback and say so, exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:  # Ctrl-C in a command that keeps no state of its own: one line, not "Aborted!"
            click.echo(f"rnnbench {ctx.invoked_subcommand}: stopped", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `rnnbench list variants | head`: the reader has gone; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except Exception:
            import traceback
            traceback.print_exc()
            click.echo("rnnbench: internal error (a bug); please report it with the traceback above", err=True)
            ctx.exit(1)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rnnbench", prog_name="rnnbench", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="With an error, also show the traceback behind it "
                                            "(e.g. inside a module a study file imports).")
def cli(debug):
    """Benchmarks and ablation studies of recurrent cells on long-dependency tasks."""


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def _device(name: str) -> str:
    """Check a --device value at once (one line if this machine has no such device)."""
    from studies.training import resolve_device
    try:
        return str(resolve_device(name))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--device: {e}") from None


def _shown(url):
    """A URL as rnnbench shows it: without a password (libpq reads it from ~/.pgpass or PGPASSWORD)."""
    return re.sub(r"(://[^:/@]+):[^@/]+@", r"\1@", url) if url else url


def _probe(tracking_uri):
    from studies.store import probe_tracking
    note = probe_tracking(tracking_uri)
    if note:
        click.echo(note, err=True)


def _store(root, storage=None, tracking_uri=None):
    from studies.store import Store
    return Store(root, storage, tracking_uri)


@cli.command()
@click.argument("spec")
@ROOT
@click.option("--workers", type=click.IntRange(0), default=1, show_default=True,
              help="Worker processes on this machine; 0: only coordinate (workers run elsewhere).")
@THREADS
@STORAGE
@TRACKING
@STALE_AFTER
@DEVICE
@SET
@click.option("--retry-stopped", is_flag=True,
              help="Run again the cells stopped because their first trials all failed with the same error.")
@user_errors
def run(spec, root, workers, threads, storage, tracking_uri, stale_after, device, overrides, retry_stopped):
    """Run (or resume) the study in SPEC: a study file, or the name of a shipped one (e.g. quickstart)."""
    from studies import spec as specs
    from studies.launcher import run_study
    from studies.progress import Display

    parsed, path, sha = specs.load(spec, overrides)
    store = _store(root, storage, tracking_uri)
    _device(device)  # before anything is written
    _probe(tracking_uri)
    header = (f"study {parsed.name}: {len(specs.cells(parsed))} cells x {parsed.trials} trials "
              f"(+{parsed.replicates} replicates each), {workers} worker(s), store "
              + (" and ".join(u for u in (_shown(storage), tracking_uri) if u) + f" (logs in {store.root})"
                 if storage or tracking_uri else str(store.root)))
    try:
        with Display(parsed) as display:
            rows = run_study(parsed, path, sha, store, workers=workers, threads=threads, stale_after=stale_after,
                             on_progress=display.update, device=_device(device), retry_stopped=retry_stopped,
                             on_note=display.note, on_start=lambda: display.note(header))
    except KeyboardInterrupt:
        click.echo("stopped: the trials in hand were closed as interrupted; run the same command to resume", err=True)
        sys.exit(130)
    failed = sum(r.search["FAIL"] - r.search["interrupted"] + r.replicate["FAIL"] - r.replicate["interrupted"]
                 for r in rows)
    stopped = [r.cell.key for r in rows if r.stopped is not None]
    reasons = [str(r.stopped) for r in rows if r.stopped is not None]
    if any(re.search(r"^Divergence.* at step 1\b", why) for why in reasons):
        hint = ("; a loss already non-finite at step 1, before any update, is the cell's or the task's doing: "
                "`rnnbench check variant|task NAME`")
    elif any(why.startswith("Divergence") for why in reasons):
        hint = ("; a loss that diverged is the hyperparameters' doing: a narrower search space changes the cells' "
                "definition, so run that as a study of another name")
    else:
        hint = ""
    if not stopped:
        click.echo(f"done: {parsed.name}" + (f" ({failed} failed trials; see `rnnbench status`)" if failed else ""))
    where = f"--storage {_shown(storage)} --tracking-uri {tracking_uri}" if storage else f"--root {root}"
    if tracking_uri and not storage:
        where += f" --tracking-uri {tracking_uri}"
    click.echo(f"report:    rnnbench report {parsed.name} {where}")
    click.echo(f"dashboard: {tracking_uri}" if tracking_uri and tracking_uri.startswith("http")
               else f"dashboard: rnnbench dashboard {where}")
    if stopped:
        click.echo(f"study {parsed.name} did not complete: {len(stopped)} cell(s) stopped, their first trials all "
                   f"failed with the same error ({', '.join(stopped)}); see `rnnbench status`, fix the cause, then "
                   f"rerun with --retry-stopped{hint}")
        sys.exit(1)


@cli.command()
@click.argument("spec")
@ROOT
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Worker processes the estimate is for (as `rnnbench run --workers`).")
@SET
@user_errors
def plan(spec, root, workers, overrides):
    """Check SPEC and estimate its cost without running it: cells, parameter counts, runs, and wall time
    for --workers, from a short calibration on this machine (cached in ROOT/plan-cache.json, the only file
    it writes)."""
    from studies import spec as specs
    from studies.plan import estimate, format_plan

    parsed, path, _ = specs.load(spec, overrides)
    click.echo(f"study {parsed.name} ({path}): valid")
    live = sys.stderr.isatty()

    def calibrating(i, n, cell):  # on a terminal: one line, rewritten (a cell may take seconds to time)
        if live:
            click.echo(f"\r\033[Kcalibrating cell {i + 1}/{n}: {cell.key}", err=True, nl=False)

    plan = estimate(parsed, root, workers, on_cell=calibrating)
    if live:
        click.echo("\r\033[K", err=True, nl=False)
    click.echo(format_plan(plan))


@cli.command()
@click.argument("spec")
@ROOT
@THREADS
@STORAGE
@TRACKING
@STALE_AFTER
@DEVICE
@click.option("--worker-id", default=None, metavar="NAME",
              help="How this worker is named on its trials (NAME:pid) instead of the hostname: give one where "
                   "machines share a hostname (containers).")
@SET
@user_errors
def worker(spec, root, threads, storage, tracking_uri, stale_after, device, worker_id, overrides):
    """Run trials of a study prepared by `rnnbench run` until it is done (start more on other machines)."""
    from studies import spec as specs
    from studies.worker import run_worker

    parsed, _, sha = specs.load(spec, overrides)
    _probe(tracking_uri)
    try:
        n = run_worker(parsed, sha, _store(root, storage, tracking_uri), threads, stale_after=stale_after,
                       device=_device(device), worker_id=worker_id)
    except KeyboardInterrupt:
        click.echo("worker stopped; the trials it had in hand, if any, were closed as interrupted", err=True)
        sys.exit(130)
    click.echo(f"worker done: {n} trials")


@cli.command()
@click.argument("spec")
@click.option("--workers", type=int, required=True, help="Array tasks, one worker each.")
@STORAGE
@TRACKING
@click.option("--time", "time_limit", default=None, metavar="HH:MM:SS",
              help="Time limit of each task (sbatch --time). Default: the partition's.")
@click.option("--partition", default=None, metavar="P", help="Slurm partition. Default: the cluster's.")
@click.option("--cpus-per-task", type=int, default=1, show_default=True,
              help="CPUs of each task; also the worker's torch --threads.")
@click.option("--mem", default=None, metavar="M", help="Memory of each task (sbatch --mem, e.g. 4G).")
@click.option("--python", default=None, metavar="PATH",
              help="The interpreter (with rnnbench installed) the tasks run. Default: this one.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="The script, the tasks' Slurm logs and their roots go to ROOT/slurm/STUDY/ (on a filesystem "
                   "the compute nodes share).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Where to write the script. Default: ROOT/slurm/STUDY/STUDY.sbatch.")
@click.option("--stale-after", type=float, default=None, metavar="SECONDS",
              help="The workers' --stale-after; give the coordinator's. Default: the worker's (900).")
@click.option("--submit", is_flag=True, help="Also submit it with sbatch and print the job id.")
@SET
@user_errors
def slurm(spec, workers, storage, tracking_uri, time_limit, partition, cpus_per_task, mem, python, root, out,
          stale_after, submit, overrides):
    """Write an sbatch script running --workers workers of SPEC as a Slurm array job (and --submit it).

    The study's coordinator runs outside the job: `rnnbench run SPEC --workers 0` with the same --storage
    and --tracking-uri (on the login node, say): it prepares the study and keeps its queue. The tasks wait
    until the study is prepared, and exit when every cell is done. Give it, and the coordinator, the same
    --set as the study: the tasks' workers get them too. See docs/distributed.md.
    """
    import subprocess

    from studies import spec as specs
    from studies.slurm import check_stores, sbatch_script, shell_join

    try:
        check_stores(storage, tracking_uri)
    except ValueError as e:
        raise UserError(str(e)) from None
    if workers < 1:  # one line (click's range error is a usage block), before the study file is read
        raise UserError(f"--workers {workers}: an array job needs at least 1 task")
    # a mistake in the study file or an override is refused now, not on the nodes
    parsed, path, _ = specs.load(spec, overrides)
    folder = (root / "slurm" / parsed.name).absolute()
    out = (out or folder / f"{parsed.name}.sbatch").absolute()
    try:
        text = sbatch_script(path.absolute(), parsed.name, workers=workers, storage=storage,
                             tracking_uri=tracking_uri, folder=folder,
                             python=str(Path(python or sys.executable).absolute()), workdir=Path.cwd(),
                             time=time_limit, partition=partition, cpus_per_task=cpus_per_task, mem=mem,
                             stale_after=stale_after, overrides=overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    folder.mkdir(parents=True, exist_ok=True)  # sbatch does not create the folder of --output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o600)  # the storage URL may hold a password
    for name, url in (("--storage", storage), ("--tracking-uri", tracking_uri)):
        host = url.split("@")[-1].split("://")[-1].split("/")[0].rsplit(":", 1)[0]
        if host in ("localhost", "127.0.0.1", "[::1]"):
            click.echo(f"note: {name} names {host}: every compute node must reach the server at that address "
                       "(a one-node cluster, or a tunnel on each node)", err=True)
    click.echo(f"wrote {out}: {workers} worker(s) of study {parsed.name} as a Slurm array job")
    click.echo("the coordinator (it prepares the study and keeps its queue), on a machine that stays up:")
    coordinator = [path, "--workers", "0", "--storage", _shown(storage), "--tracking-uri", tracking_uri]
    coordinator += ["--stale-after", f"{stale_after:g}"] if stale_after is not None else []
    coordinator += [arg for override in overrides for arg in ("--set", override)]
    click.echo(f"  rnnbench run {shell_join(coordinator)}")
    if not submit:
        click.echo(f"submit: sbatch {shell_join([out])}")
        return
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(out)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError(f"sbatch is not on PATH: submit {out} from a machine of the cluster") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UserError(f"sbatch {out} exited {proc.returncode}: {said[-1] if said else 'no message'}")
    job = proc.stdout.strip().split(";")[0]
    click.echo(f"submitted job {job}: tasks 0-{workers - 1}, logs {folder}/rnnbench-{parsed.name}-{job}_N.out")
    click.echo(f"watch: squeue -j {job}   stop: scancel {job}")


@cli.command()
@click.argument("spec")
@ROOT
@STORAGE
@SET
@user_errors
def status(spec, root, storage, overrides):
    """Trials finished/pruned/failed/running per cell, best objective, replication progress. SPEC: a study
    file or a shipped study's name, with the --set the study was run with."""
    from studies import spec as specs
    from studies.queue import check_fingerprints, ended_slots, optuna_name, prepared_as_defined, progress
    from studies.progress import status_table

    # Without torch where it can (its import is most of this command's time): the study file is checked in
    # full, as `run` checks it, unless the store holds every cell as the file defines it (`run` checked those).
    try:
        parsed, _, _ = specs.load(spec, overrides, deep=False)
    except specs.SpecError:
        parsed, _, _ = specs.load(spec, overrides)  # the error `run` gives
    if storage:
        optuna_storage = _store(root, storage).optuna_storage()
    else:  # the journal alone (Store.journal's path): studies.store would import MLflow, most of this command's time
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        journal = root.resolve() / "optuna.journal"
        if not journal.exists():
            specs.load(spec, overrides)  # a mistake in the study file is said first
            raise UserError(f"{root.resolve()}: no study store here yet; run `rnnbench run {spec} --root {root}` first")
        optuna_storage = JournalStorage(JournalFileBackend(str(journal)))
    names = [s.study_name for s in optuna_storage.get_all_studies()]  # read once: the held studies, and the note below
    held = sorted({n.split("/")[0] for n in names if "/" in n})
    if parsed.name not in held:  # a mistyped --root or --set name=: not a table of zeros
        where = f"--storage {_shown(storage)}" if storage else str(root.resolve())
        raise UserError(f"{where}: no study {parsed.name!r} here (it holds: {', '.join(held) or 'none'}); "
                        f"run `rnnbench run {spec}` with this store first, or check --root and --set")
    if not parsed.deep and not prepared_as_defined(parsed, optuna_storage):
        parsed, _, _ = specs.load(spec, overrides)
    if parsed.deep:  # reloaded, or a study file with imports (always loaded deeply): its cells as prepared?
        # a cell whose only change is code it imports: the table counts the trials run with the earlier version
        check_fingerprints(parsed, optuna_storage, "give `status` the study file and --set the study was run with",
                           lambda what: click.echo(f"note: {what}; the table counts the trials run with the earlier "
                                                   "version (`rnnbench run` refuses to add to them)", err=True))
    rows = progress(parsed, optuna_storage)
    status_table(parsed, rows)
    beyond = max((len(ended_slots(r.search_trials)) for r in rows), default=0)
    if beyond > parsed.trials:  # e.g. grown with --set trials=N, asked about without it
        click.echo(f"note: the store holds up to {beyond} ended search trials per cell, more than the {parsed.trials} "
                   "this study file asks for: give `status` the --set trials= the study was run with (the totals "
                   "above count the file's)", err=True)
    stored = {n for n in names if n.startswith(f"{parsed.name}/")}
    named = {optuna_name(parsed, cell, "search") for cell in specs.cells(parsed)}
    missing, others = named - stored, {n for n in stored - named if not n.endswith("/replicates")}
    if missing and others:  # e.g. run with --set tasks[0].seq_len=[6,8], status without it
        click.echo(f"note: {len(missing)} of this file's cells are not in the store, which holds {len(others)} other "
                   f"cell(s) of study {parsed.name}: give `status` the --set the study was run with", err=True)


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
@click.option("--watch", is_flag=True,
              help="Regenerate the report every --interval seconds while the study runs and serve it, reloading "
                   "itself, on 127.0.0.1:--port until Ctrl-C (it is logged to MLflow only without --watch).")
@click.option("--interval", type=click.FloatRange(1), default=10, show_default=True,
              help="With --watch: seconds between regenerations.")
@click.option("--port", type=click.IntRange(0, 65535), default=8050, show_default=True,
              help="With --watch: port of the live page.")
@user_errors
def report(study, root, storage, tracking_uri, source, out, reference, watch, interval, port):
    """Write tables, statistics, figures and index.html for STUDY (or regenerate them with --from).

    \b
    rnnbench report STUDY [--root DIR]        collect from MLflow + Optuna, write ROOT/reports/STUDY/
    rnnbench report --from TABLE --out DIR    redraw everything from a saved report, byte for byte
    rnnbench report STUDY --watch             the same, every 10 s, served at http://127.0.0.1:8050/

    STUDY: a study's name in the store, a study file, or a shipped study's name (its `name` is used).
    """
    if study is not None:
        from studies.spec import study_name
        study = study_name(study)
    if watch:
        if study is None or source is not None:
            raise UserError("--watch follows a study as it runs: give a STUDY name, not --from")
        from reports import dashboard as dash
        try:  # before the slow imports: a taken port fails at once
            dash.check_port("127.0.0.1", port)
        except dash.PortInUse as e:
            raise UserError(str(e)) from None
        sys.exit(_live_report(_store(root, storage, tracking_uri), study, out, reference, interval, port))
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
        if tracking_uri is None and not store.mlflow_db.exists():
            raise UserError(f"{store.root}: no study store here; run a study first, or pass the --root it ran with")
        optuna_storage = store.optuna_storage() if storage or store.journal.exists() else None
        client = store.mlflow_client()
        index = build_report(collect(client, study, optuna_storage), out or store.reports_dir(study), reference)
        run_id = publish(client, study, index.parent)
        click.echo(f"logged to MLflow: experiment {study}, run {run_id} (tag rnnbench.role=report)")
    click.echo(f"report: {index}")
    click.echo(f"open it: xdg-open {index}   (or python -m http.server -d {index.parent})")


def _live_report(store, study, out, reference, interval, port) -> int:
    """`report --watch`: regenerate (never publish) the report every ``interval`` s and serve it."""
    from reports.build import build_report
    from reports.collect import collect
    from reports.dashboard import PortInUse
    from reports.watch import watch

    opened = {}

    def regenerate():
        if "client" not in opened:
            if not store.distributed:
                # Open MLflow's SQLite store only once the launcher has set it up (it records each cell's
                # parent run in the journal after creating the experiment): two processes creating its
                # tables at once can break the launcher's.
                journal = store.journal
                storage = store.optuna_storage() if journal.exists() else None
                if storage is None or not any(s.study_name.startswith(f"{study}/") and "mlflow_parent_run_id" in s.user_attrs
                                              for s in storage.get_all_studies()):
                    raise LookupError(f"study {study!r} is not prepared in {store.root} yet")
                opened["storage"] = storage
            else:
                opened["storage"] = store.optuna_storage()
            opened["client"] = store.mlflow_client()
        tables = collect(opened["client"], study, opened["storage"])
        digest = tables.digest()
        if digest == opened.get("digest"):
            return None  # nothing new since the last report: no redraw
        index = build_report(tables, out or store.reports_dir(study), reference)
        opened["digest"] = digest
        return index

    try:
        return watch(regenerate, "127.0.0.1", port, interval, click.echo)
    except PortInUse as e:
        raise UserError(str(e)) from None


@cli.command()
@ROOT
@STORAGE
@TRACKING
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True,
              help="Port of the MLflow UI.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; keep loopback unless you mean it.")
@click.option("--optuna", "with_optuna", is_flag=True, help="Also start optuna-dashboard over the Optuna storage.")
@click.option("--optuna-port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port of optuna-dashboard.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="MLflow UI server processes (one is plenty for one person).")
def dashboard(root, storage, tracking_uri, port, host, with_optuna, optuna_port, workers):
    """Start the MLflow UI over the study store, and with --optuna optuna-dashboard (Ctrl-C stops both)."""
    from reports import dashboard as dash

    remote_ui = bool(tracking_uri and tracking_uri.startswith(("http://", "https://")))
    try:  # before the slow imports: a taken port fails at once
        for wanted, option in ([] if remote_ui else [(port, "--port")]) + (
                [(optuna_port, "--optuna-port")] if with_optuna else []):
            dash.check_port(host, wanted, option)
    except dash.PortInUse as e:
        raise UserError(str(e)) from None
    from studies.store import rdb_url

    store = _store(root, storage, tracking_uri)
    if not tracking_uri and not store.mlflow_db.exists():
        click.echo(f"note: {store.root} holds no study store yet (a mistyped --root?); the dashboard starts on an "
                   "empty one, and studies run with this --root appear as they start")
    servers = []
    if remote_ui:
        click.echo(f"MLflow UI: {tracking_uri}  (the tracking server is the dashboard)")
    else:
        studies = {}
        if tracking_uri or store.mlflow_db.exists():
            studies = {e.name: e.experiment_id for e in store.mlflow_client().search_experiments()
                       if "rnnbench.study_meta" in e.tags}
        servers.append(dash.mlflow_ui(store.tracking_uri, None if tracking_uri else (store.root / "artifacts").as_uri(),
                                      host, port, workers, studies))
    if with_optuna:
        import importlib.util
        if importlib.util.find_spec("optuna_dashboard") is None:
            raise UserError("optuna-dashboard is not installed: pip install 'rnnbench[dashboard]'")
        journal = store.journal
        if storage is None and not journal.exists():
            raise UserError(f"{journal}: no Optuna storage here; run a study first or pass --root/--storage")
        servers.append(dash.optuna_dashboard(rdb_url(storage) if storage else str(journal), host, optuna_port))
    click.echo(f"store: {store.tracking_uri}" + (f" and {_shown(storage) or journal}" if with_optuna else ""))
    if servers:
        sys.exit(dash.serve(servers, click.echo))


IMPORTS = click.option("--imports", multiple=True, metavar="FILE|MODULE",
                       help="A Python file or dotted module to import first, as a study file's `imports:`, e.g. "
                            "one that calls variants.register or tasks.register (repeatable).")


def _import_user(imports) -> None:
    """Import ``--imports`` (from the working directory); a failure is one line (with --debug, its traceback)."""
    from variants.imports import UserModuleError, import_user_modules

    try:
        import_user_modules(imports, Path.cwd())
    except UserModuleError as e:
        if _debug():
            import traceback
            traceback.print_exception(e.__cause__ or e, file=sys.stderr)
        raise UserError(f"--imports {e}") from None


@cli.command("list")
@click.argument("what", type=click.Choice(["variants", "tasks"]))
@IMPORTS
def list_(what, imports):
    """List the variants or tasks a study file can name (with --imports: yours too)."""
    _import_user(imports)
    if what == "variants":
        from variants import VARIANTS
        for v in VARIANTS.values():
            click.echo(f"{v.name:14s} {v.description}  [{v.paper}]")
    else:
        from tasks import TASKS
        for name, t in TASKS.items():
            click.echo(f"{name:20s} {t.description}  [{t.paper}]")


@cli.group()
def check():
    """Check a variant or a task, yours too (--imports), against the interface studies rely on."""


@check.command("variant")
@click.argument("name")
@click.option("--switch", "pairs", multiple=True, metavar="K=V", help="A switch; V is read as YAML (repeatable).")
@IMPORTS
def check_variant(name, pairs, imports):
    """Run the variant contract (variants/contract.py) on NAME: shapes, state, chunked calls, gradients,
    seeds, dropout, gradcheck. Exit code 1 if a check fails."""
    _check("variant", name, _key_values(pairs, "--switch"), imports)


@check.command("task")
@click.argument("name")
@click.option("--set", "pairs", multiple=True, metavar="K=V", help="A task setting; V is read as YAML (repeatable).")
@IMPORTS
def check_task(name, pairs, imports):
    """Run the task contract (tasks/contract.py) on NAME: batch layout, seeds, settings, baseline.
    Exit code 1 if a check fails."""
    _check("task", name, _key_values(pairs, "--set"), imports)


def _key_values(pairs, option):
    from studies.spec import read_yaml

    values = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UserError(f"{option} {pair}: expected KEY=VALUE")
        values[key] = read_yaml(value)
    return values


def _check(kind, name, values, imports):
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    _import_user(imports)
    try:
        # A mistyped switch or setting is the user's mistake, said in one line; the contracts check the refusals
        if kind == "variant":
            from variants import check_switches
            from variants.contract import check as contract
            check_switches(name, values)
        else:
            from tasks import build_task
            from tasks.contract import check as contract
            build_task(name, **values)
        results = contract(name, **values)
    except ValueError as e:  # an unknown variant or task, switch or setting
        hint = " (your own? pass --imports FILE)" if str(e).startswith("unknown") and not imports else ""
        raise UserError(f"{e}{hint}") from None
    table = Table(title=f"{kind} {name}" + "".join(f" {k}={v!r}" for k, v in values.items()))
    for column in ("check", "result", "reason"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, Text("pass", "green") if r.passed else Text("FAIL", "bold red"), Text(r.reason))
    Console().print(table)
    failed = sum(not r.passed for r in results)
    click.echo(f"{len(results) - failed}/{len(results)} checks passed")
    if failed:
        sys.exit(1)


@cli.command()
@click.option("--variants", "names", multiple=True, help="Variants to time (repeatable); default all.")
@click.option("--batch", type=click.IntRange(1), default=64, show_default=True)
@click.option("--hidden", type=click.IntRange(1), default=128, show_default=True)
@click.option("--seq-len", type=click.IntRange(1), default=200, show_default=True)
@click.option("--input-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True,
              help="Timed repeats (with --population: default 3).")
@click.option("--population", is_flag=True,
              help="Instead: training steps of populations of 1-32 replicates against sequential runs "
                   "(B=64, T=100, hidden 32/64/128, --threads; more knobs: benchmarks/population.py).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda[:N] or auto (on CUDA, nn.LSTM is cuDNN's).")
@IMPORTS
def bench(names, batch, hidden, seq_len, input_size, threads, repeats, population, device, imports):
    """Forward and backward milliseconds per batch of every variant, and the ratio to torch.nn.LSTM
    measured in the same run (medians after warm-up)."""
    from studies.training import device_name

    where = _device(device)
    if population:
        from studies.population import benchmark_population, format_population_table

        ctx = click.get_current_context()
        given = [f"--{option}" for option, param in [("variants", "names"), ("batch", "batch"), ("hidden", "hidden"),
                                                     ("seq-len", "seq_len"), ("input-size", "input_size"),
                                                     ("imports", "imports")]
                 if ctx.get_parameter_source(param) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"{', '.join(given)}: --population times fixed shapes (B=64, T=100, hidden 32/64/128, "
                            "every family); for other shapes use benchmarks/population.py "
                            "(--families, --hidden, --batch, --seq-len, --sizes)")
        if ctx.get_parameter_source("repeats") is not click.core.ParameterSource.COMMANDLINE:
            repeats = 3
        click.echo(f"population vs sequential: B=64 T=100 device={device_name(where)} threads={threads}, "
                   f"median of {repeats}")
        rows = benchmark_population(device=where, threads=threads, repeats=repeats)
        click.echo(format_population_table(rows))
        return
    _import_user(imports)
    from variants import VARIANTS
    from variants.bench import benchmark, format_table

    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}"
                        + ("" if imports else " (your own? pass --imports FILE)"))
    click.echo(f"B={batch} H={hidden} T={seq_len} input={input_size} threads={threads} device={device_name(where)}, "
               f"median of {repeats}")
    rows = benchmark(list(names) or None, batch=batch, hidden=hidden, seq_len=seq_len, threads=threads,
                     input_size=input_size, repeats=repeats, device=where)
    click.echo(format_table(rows))


def main():
    cli(prog_name="rnnbench")


if __name__ == "__main__":
    main()
