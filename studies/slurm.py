"""A study's workers as a Slurm array job: one `rnnbench worker` per array task.

Slurm runs the workers; the study's coordinator (``rnnbench run SPEC --workers 0``, or any `rnnbench
run`) runs elsewhere, e.g. on the login node: it prepares the study and keeps its queue. Both meet in
the shared stores: Optuna in PostgreSQL (``--storage``) and MLflow in a tracking server
(``--tracking-uri``). Array tasks may start before the study is prepared: a worker waits for it.

:func:`sbatch_script` writes the batch script; ``rnnbench slurm`` (rnnbench.py) saves and submits it.
Each task runs, in a folder of its own under ``folder``::

    exec PYTHON -m rnnbench worker SPEC --storage URL --tracking-uri URI [--set KEY=VALUE ...] \
        --root FOLDER/task-N --threads C

The study's ``--set`` overrides go to every worker as given (a worker with other overrides would be
refused as a changed study), each quoted for bash on one line (:func:`shell_quote`).

``exec`` makes the worker the task's main process, so Slurm's SIGTERM (``scancel``, the time limit)
reaches it at once and it closes its trial in hand as interrupted; it also keeps the shell's pid, which
the script prints: ``worker HOST:PID`` is the ``rnnbench.worker`` tag of the task's MLflow runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

__all__ = ["sbatch_script", "check_stores", "shell_quote", "shell_join"]

# Characters an ``#SBATCH`` line cannot carry safely: sbatch splits its options on whitespace.
_UNSAFE = re.compile(r"\s")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def shell_quote(arg: str) -> str:
    r"""``arg`` as one bash word on one line: :func:`shlex.quote`, or for a string holding a newline or
    another control character, bash's ``$'...'`` with escapes (a quoted newline would break a comment
    line of the script and spread the command over several lines).

    >>> print(shell_quote("train.steps=20"), shell_quote("name=it's ok"), shell_quote("tasks=[a,\nb]"))
    train.steps=20 'name=it'"'"'s ok' $'tasks=[a,\nb]'
    """
    if not _CONTROL.search(arg):
        return shlex.quote(arg)
    return "$'" + "".join(_ESCAPES.get(c, f"\\x{ord(c):02x}" if _CONTROL.match(c) else c) for c in arg) + "'"


def shell_join(args) -> str:
    """The words ``args`` as one line of bash (:func:`shell_quote`)."""
    return " ".join(shell_quote(str(a)) for a in args)


def check_stores(storage: str | None, tracking_uri: str | None) -> None:
    """Refuse stores that the machines of a cluster cannot share. Raises ValueError (one line)."""
    if not storage or not tracking_uri:
        missing = [name for name, value in (("--storage", storage), ("--tracking-uri", tracking_uri)) if not value]
        raise ValueError(f"{' and '.join(missing)} {'are' if len(missing) == 2 else 'is'} required: the array's "
                         "tasks run on other machines, which cannot share "
                         "this machine's embedded store (ROOT/optuna.journal, ROOT/mlflow.db); give a PostgreSQL "
                         "URL and an MLflow tracking server (docs/distributed.md)")
    if not tracking_uri.startswith(("http://", "https://")):
        raise ValueError(f"--tracking-uri {tracking_uri}: the array's tasks need an MLflow tracking server "
                         "(http://HOST:PORT), not a store on one machine's disk (docs/distributed.md)")
    if storage.startswith("sqlite"):
        raise ValueError(f"--storage {storage}: SQLite does not take writers on several machines; "
                         "use PostgreSQL (postgresql+psycopg2://USER@HOST/DB)")


def sbatch_script(spec_path: Path, study: str, *, workers: int, storage: str, tracking_uri: str, folder: Path,
                  python: str, workdir: Path, time: str | None = None, partition: str | None = None,
                  cpus_per_task: int = 1, mem: str | None = None, stale_after: float | None = None,
                  overrides: tuple[str, ...] | list[str] = ()) -> str:
    """The text of an sbatch script running ``workers`` workers of the study in ``spec_path`` as the
    array ``0..workers-1``.

    ``folder`` holds the tasks' Slurm logs (``rnnbench-STUDY-JOB_TASK.out``) and their roots
    (``task-N``); ``python`` is the interpreter the tasks run rnnbench with; ``workdir`` their working
    directory. Paths must be absolute and the same on the compute nodes (a shared filesystem).
    ``time``, ``partition``, ``cpus_per_task`` (also the worker's torch ``--threads``) and ``mem`` become
    ``#SBATCH`` lines as given; None leaves them to the cluster's defaults. ``overrides``: the study's
    ``--set KEY=VALUE`` strings (already checked by ``studies.spec.load``), passed to every worker and
    named in the coordinator command the script's header shows.

    >>> text = sbatch_script(Path("/lab/s.yaml"), "s", workers=4, storage="postgresql://u@db/optuna",
    ...                      tracking_uri="http://db:5000", folder=Path("/lab/runs/slurm/s"),
    ...                      python="/lab/.venv/bin/python", workdir=Path("/lab"))
    >>> "#SBATCH --array=0-3" in text
    True
    """
    if workers < 1:
        raise ValueError(f"--workers {workers}: an array job needs at least 1 task")
    if cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task {cpus_per_task}: at least 1")
    for name, path in (("SPEC", spec_path), ("folder", folder), ("workdir", workdir), ("--python", Path(python))):
        if not Path(path).is_absolute():
            raise ValueError(f"{name} {path}: must be an absolute path (the tasks run elsewhere)")
    directives = {"job-name": f"rnnbench-{study}", "array": f"0-{workers - 1}", "ntasks": "1",
                  "cpus-per-task": str(cpus_per_task), "time": time, "partition": partition, "mem": mem,
                  "output": f"{folder}/%x-%A_%a.out", "chdir": str(workdir)}
    for name, value in directives.items():
        if value is not None and (not value or _UNSAFE.search(value)):
            raise ValueError(f"--{name} {value!r}: no spaces or empty values in an #SBATCH option")
    worker = [python, "-m", "rnnbench", "worker", str(spec_path), "--storage", storage, "--tracking-uri", tracking_uri]
    if stale_after is not None:
        worker += ["--stale-after", f"{stale_after:g}"]
    if any("\x00" in override for override in overrides):
        raise ValueError("--set: a NUL character cannot be passed on a command line")
    sets = [arg for override in overrides for arg in ("--set", override)]
    worker += sets
    coordinator = [spec_path, "--workers", "0", "--storage", "URL", "--tracking-uri", "URI", *sets]
    lines = [
        "#!/bin/bash",
        f"# Workers of the rnnbench study {study!r}, one per array task; written by `rnnbench slurm`.",
        "# The study's coordinator runs outside this job (it prepares the study), e.g. on the login node:",
        f"#   rnnbench run {shell_join(coordinator)}",
        "# Tasks that start before the study is prepared wait for it; each exits when every cell is done.",
        *(f"#SBATCH --{name}={value}" for name, value in directives.items() if value is not None),
        "",
        "set -eu",
        "export PYTHONUNBUFFERED=1",
        f"root={shlex.quote(str(folder))}/task-$SLURM_ARRAY_TASK_ID",
        'mkdir -p "$root"',
        '# exec keeps this pid: the worker is HOST:PID in its MLflow runs (tag rnnbench.worker)',
        'echo "task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID: worker $(hostname):$$"',
        f'exec {shell_join(worker)} --root "$root" --threads {cpus_per_task}',
        "",
    ]
    return "\n".join(lines)
