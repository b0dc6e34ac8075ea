"""The MLflow side of a study: one experiment per study, one parent run per cell, one child run per
trial, provenance tags, and reconciling runs with the trial protocol after a crash.

MLflow is a log of what the protocol (``studies.queue``) decided, never the other way round: a run's
status follows its Optuna trial. A process that dies between the two leaves a run RUNNING;
:func:`reconcile_runs` closes it from the trial's state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

from mlflow.entities import Metric
from optuna.trial import TrialState

from studies import queue
from studies.crash import crash_point
from studies.spec import Cell, Spec, cells
from tasks import get_task_class

NOTE_LIMIT = 4800  # MLflow caps tag values at 5000 characters


def cell_tags(spec: Spec, cell: Cell) -> dict[str, str]:
    return {"rnnbench.study": spec.name, "rnnbench.cell": cell.key, "rnnbench.task": cell.task,
            "rnnbench.variant": cell.variant.name, "rnnbench.base_variant": cell.variant.variant,
            "rnnbench.ladder": cell.ladder, "rnnbench.ladder_value": str(cell.ladder_value)}


# Short forms of ladder knobs in run names: "T=100" reads as the sequence length at a glance.
LADDER_SHORT = {"seq_len": "T", "p_loop": "p"}


def run_name(cell: Cell, kind: str | None = None, slot: int | None = None) -> str:
    """A run's name in the MLflow UI, leading with what differs between runs: the variant's label, the task
    and its ladder value, any other task setting not at its default; then, for a trial run, its slot
    (``#3``, search) or replicate index (``seed 2``). E.g. ``lstm · adding T=100 · #3``; with a capacity
    ladder the label carries the cell's value: ``lstm h=64 · adding T=100``, ``lstm 5000 params · ...``."""
    value = cell.ladder_value
    parts = [f"{LADDER_SHORT.get(cell.ladder, cell.ladder)}={_short_value(value)}"]
    defaults = {f.name: f.default for f in dataclasses.fields(get_task_class(cell.task))}
    parts += [f"{k}={_short_value(v)}" for k, v in cell.settings
              if k != cell.ladder and defaults.get(k, dataclasses.MISSING) != v]
    size = {"hidden_size": f" h={cell.capacity_value}", "param_budget": f" {cell.capacity_value} params"}
    name = f"{cell.variant.name}{size.get(cell.capacity, '')} · {cell.task} {' '.join(parts)}"
    if kind == "search":
        name += f" · #{slot}"
    elif kind == "replicate":
        name += f" · seed {slot}"
    return name


def _short_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def provenance(spec_sha: str, threads: int) -> dict[str, str]:
    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit != "unknown" else False
    versions = {p: _version(p) for p in ("rnnbench", "torch", "optuna", "mlflow")}
    return {"rnnbench.git_commit": commit, "rnnbench.git_dirty": str(dirty).lower(),
            "rnnbench.study_sha256": spec_sha, "rnnbench.torch_threads": str(threads),
            "rnnbench.python": platform.python_version(),
            "rnnbench.host": socket.gethostname(),
            **{f"rnnbench.version.{k}": v for k, v in versions.items()}}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def describe_experiment(client, exp_id: str, spec: Spec, spec_text: str) -> None:
    """The study file as the experiment's description, and what reports need of it, whole and parsed."""
    client.set_experiment_tag(exp_id, "rnnbench.study_sha256", hashlib.sha256(spec_text.encode()).hexdigest())
    text = spec_text if len(spec_text) <= NOTE_LIMIT else (
        spec_text[:NOTE_LIMIT] + "\n# ... (truncated: the study file is longer)")
    client.set_experiment_tag(exp_id, "mlflow.note.content", f"```yaml\n{text}\n```")
    meta = {"objective": spec.objective.model_dump(), "reference": spec.reference_label, "replicates": spec.replicates,
            "variant_order": [v.name for v in spec.variants],
            "task_order": list(dict.fromkeys(t["task"] for t in spec.tasks))}
    client.set_experiment_tag(exp_id, "rnnbench.study_meta", json.dumps(meta))
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")  # "Machine learning", not GenAI


def parent_runs(client, exp_id: str, spec: Spec, recorded: dict[str, str | None]) -> tuple[dict[str, str], list[str]]:
    """Each cell's parent run id: the one recorded in its Optuna study (``recorded``), else one a killed
    launcher created without recording it (found by its tags), else a new one. Also the keys of the cells
    the experiment holds that ``spec`` does not name (another study file of the same name ran them)."""
    found = {r.data.tags.get("rnnbench.cell"): r.info.run_id for r in client.search_runs(
        [exp_id], "tags.`rnnbench.role` = 'cell'", max_results=50000, order_by=["attributes.start_time DESC"])}
    out = {}
    for cell in cells(spec):
        run_id = recorded.get(cell.key) or found.get(cell.key)
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=run_name(cell),
                                       tags={**cell_tags(spec, cell), "rnnbench.role": "cell"}).info.run_id
            crash_point("launcher.parent_created")
        out[cell.key] = run_id
    return out, sorted(key for key in found if key not in out)


def close_run(client, run_id: str, state: TrialState, interrupted: str | None = None) -> None:
    """End a trial's run with the status its trial's state implies."""
    if interrupted is not None:
        client.set_tag(run_id, "rnnbench.interrupted", interrupted)
        status = "KILLED"
    else:
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(state, "FAILED")
    client.set_terminated(run_id, status)


class LostTrials(RuntimeError):
    """The tracking store holds trial runs whose Optuna trials are gone: the Optuna storage was replaced."""


def check_trials_kept(storage, client, exp_id: str, study: str) -> None:
    """Raise :class:`LostTrials` if a trial run of the experiment names an Optuna trial the storage does not
    hold (its journal deleted or replaced after they ran): going on would run those slots again, and the
    report would hold both runs of each. Trials are never deleted, so a healthy store holds every one."""
    runs = client.search_runs([exp_id], "tags.`rnnbench.role` = 'trial'", max_results=50000)
    held: dict[str, set[int]] = {}
    lost = []
    for run in runs:
        tags = run.data.tags
        name = tags.get("rnnbench.optuna_study")
        if name is None:
            continue
        if name not in held:
            try:
                held[name] = {t.number for t in queue.open_study(storage, name).get_trials(deepcopy=False)}
            except KeyError:
                held[name] = set()
        if int(tags.get("rnnbench.trial", -1)) not in held[name]:
            lost.append(f"{name.split('/', 1)[-1]} trial {tags.get('rnnbench.trial')}")
    if lost:
        raise LostTrials(f"study {study!r}: the tracking store holds {len(lost)} trial run(s) whose Optuna trials "
                         f"are gone (e.g. {lost[0]}): the Optuna storage was deleted or replaced after they ran. "
                         "Restore it, or run the study under another name or --root; nothing was changed")


def reconcile_runs(storage, client, exp_id: str) -> int:
    """End every trial run still RUNNING whose Optuna trial has ended (a worker can die between telling
    Optuna and closing the run, or between creating the run and recording its id on the trial)."""
    runs = client.search_runs([exp_id], "attributes.status = 'RUNNING' and tags.`rnnbench.role` = 'trial'",
                              max_results=50000)
    trials: dict[str, dict[int, object]] = {}
    fixed = 0
    for run in runs:
        tags = run.data.tags
        name = tags["rnnbench.optuna_study"]
        if name not in trials:
            trials[name] = {t.number: t for t in queue.open_study(storage, name).get_trials(deepcopy=False)}
        trial = trials[name].get(int(tags["rnnbench.trial"]))
        if trial is None or trial.state in queue.LIVE:
            continue
        orphan = trial.user_attrs.get("mlflow_run_id") != run.info.run_id
        reason = trial.user_attrs.get("interrupted") if queue.interrupted(trial) else None
        if orphan and reason is None:
            reason = "its worker died before recording this run on the trial"
        close_run(client, run.info.run_id, trial.state, reason)
        fixed += 1
    return fixed


def finish_parents(client, rows: list[queue.CellProgress], parents: dict[str, str]) -> None:
    """Close each cell's parent run with its summary: trial counts, the best search trial (number and
    objective, on the held-out set that chose it) and the mean objective of its replicate runs (the cell's
    result: sort cells by this one in the MLflow UI)."""
    for row in rows:
        run_id = parents.get(row.cell.key)
        if not run_id:
            continue
        s = row.search
        metrics = {f"trials_{k.lower()}": s[k] for k in ("COMPLETE", "PRUNED")}
        metrics["trials_fail"] = s["FAIL"] - s["interrupted"]
        metrics["trials_interrupted"] = s["interrupted"]
        metrics["replicates_ended"] = row.replicate["counted"]
        if row.best is not None:
            metrics["best_search_objective"] = row.best.value
            metrics["best_trial"] = row.best.number
            values = [t.value for t in row.replicate_trials
                      if t.state == queue.TrialState.COMPLETE and queue.source(t) == row.best.number]
            if values:
                metrics["replicates_mean_objective"] = sum(values) / len(values)
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
        if row.stopped is not None:
            client.set_tag(run_id, "rnnbench.stopped", row.stopped[:NOTE_LIMIT])
        client.set_terminated(run_id, "FAILED" if row.stopped is not None else "FINISHED" if row.done() else "KILLED")
        crash_point("launcher.finishing")
