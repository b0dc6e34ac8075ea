"""From MLflow (and the Optuna storage) to the report's tables: the one module of reports/ that reads
the stores.

Everything a report shows is copied into :class:`reports.tables.Tables` here, so that
``rnnbench report --from`` can redraw it later without MLflow, Optuna or training.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from reports.stats import superseded  # noqa: E402
from reports.tables import Tables, package_versions  # noqa: E402

# Metrics each trial run logs once at the end (or at start); every other metric is a per-eval curve.
FINAL_METRICS = ("objective", "train_seconds", "steps_done", "seconds_per_step", "wall_seconds", "bookkeeping_seconds",
                 "baseline")  # one value per run, not a curve
GRAD_ARTIFACT = "grad_by_lag.json"
IMPORTANCE_METHOD = ("PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator, Optuna 5's default), "
                     "normalised to sum 1 over the searched hyperparameters of a cell")
COLLECT_PACKAGES = ("rnnbench", "pandas", "pyarrow", "optuna", "mlflow")


def _state(run) -> str:
    """MLflow status + tags -> the trial's end as Optuna and the README name it."""
    tags, status = run.data.tags, run.info.status
    if "rnnbench.interrupted" in tags:
        return "INTERRUPTED"
    if "rnnbench.pruned" in tags:
        return "PRUNED"
    return {"FINISHED": "COMPLETE", "FAILED": "FAIL"}.get(status, status)


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def study_file(experiment) -> str:
    """The study file's text, as the engine stored it in the experiment description."""
    note = experiment.tags.get("mlflow.note.content", "")
    return note.removeprefix("```yaml\n").removesuffix("\n```")


def study_meta(experiment) -> dict:
    """Objective, reference and the task/variant order, as the engine stored them from the parsed
    study file (tag ``rnnbench.study_meta``)."""
    meta = json.loads(experiment.tags.get("rnnbench.study_meta", "{}"))
    if "objective" not in meta:
        raise LookupError(f"experiment {experiment.name!r} was not prepared by `rnnbench run` (no rnnbench.study_meta tag)")
    return meta


def collect(client: MlflowClient, study: str, storage=None) -> Tables:
    """Every trial run of ``study`` (tag ``rnnbench.role=trial``; cell parents and report runs are
    not trials), their curves and gradient probes, and the hyperparameter importance of each cell
    from the Optuna ``storage`` (skipped when None)."""
    exp = client.get_experiment_by_name(study)
    if exp is None:
        held = sorted(e.name for e in client.search_experiments() if "rnnbench.study_meta" in e.tags)
        raise LookupError(f"no study {study!r} in the tracking store (it holds: {', '.join(held) or 'none'})")
    text = study_file(exp)
    meta = study_meta(exp)
    runs = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=50000,
                              order_by=["attributes.start_time ASC"])
    # Rows in an order of the study's own, not of when the runs started (which depends on the number of
    # workers, populations and interruptions): cell, kind, slot, then trial number.
    runs.sort(key=lambda r: (r.data.tags.get("rnnbench.cell", ""), r.data.tags.get("rnnbench.kind", ""),
                             int(r.data.tags.get("rnnbench.slot", -1)), int(r.data.tags.get("rnnbench.trial", -1))))
    results = results_table(study, runs, meta)
    tables = Tables(results=results, curves=curves_table(client, runs), grad_by_lag=grads_table(client, runs),
                    importance=importance_table(storage, results), collection={})
    tables.collection = {
        "study": study, **meta,
        "study_sha256": exp.tags.get("rnnbench.study_sha256"),
        "study_file": text,
        "tracking_uri": client.tracking_uri,
        "git_commits": _counts(r.data.tags.get("rnnbench.git_commit", "unknown") for r in runs),
        "hosts": _counts(r.data.tags.get("rnnbench.host", "unknown") for r in runs),
        "torch_threads": _counts(r.data.tags.get("rnnbench.torch_threads", "unknown") for r in runs),
        "devices": _counts(r.data.tags.get("rnnbench.device", "unknown") for r in runs),
        "machine_at_collection": machine(),
        "runs_from_dirty_tree": sum(r.data.tags.get("rnnbench.git_dirty") == "true" for r in runs),
        "versions_of_runs": {k.removeprefix("rnnbench.version."): sorted(v) for k, v in _tag_values(runs).items()},
        "versions_at_collection": package_versions(COLLECT_PACKAGES),
        "importance_method": IMPORTANCE_METHOD,
        "mlflow_run_ids": sorted(r.info.run_id for r in runs),
    }
    parents = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'cell'", max_results=50000)
    idle = sorted({r.data.tags.get("rnnbench.cell") for r in parents} - set(results.get("cell", [])))
    if idle:  # only then, as stopped_cells: prepared cells no trial of which has started (an unfinished study)
        tables.collection["cells_without_runs"] = idle
    stopped = stopped_cells(storage, results)
    if stopped:  # only then: a report of a study without any keeps the manifest it had
        tables.collection["stopped_cells"] = stopped
    return tables


def stopped_cells(storage, results: pd.DataFrame) -> dict[str, str]:
    """The cells the launcher stopped because their first trials failed alike: {cell key: why} (Optuna's
    search study holds the mark; ``rnnbench run --retry-stopped`` clears it)."""
    if storage is None or results.empty:
        return {}
    out = {}
    for cell, g in results[results.kind == "search"].groupby("cell", sort=False):
        try:
            why = optuna.load_study(study_name=g.optuna_study.iloc[0], storage=storage).user_attrs.get("stopped")
        except KeyError:
            continue
        if why is not None:
            out[cell] = why
    return out


def machine() -> dict[str, object]:
    """The collecting machine, in words: OS, CPU model and logical CPUs (the runs' own hosts are in ``hosts``)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"os": platform.platform(terse=True), "cpu": cpu, "logical_cpus": os.cpu_count()}


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _tag_values(runs) -> dict[str, set]:
    out: dict[str, set] = {}
    for r in runs:
        for k, v in r.data.tags.items():
            if k.startswith("rnnbench.version."):
                out.setdefault(k, set()).add(v)
    return out


def results_table(study: str, runs, meta: dict) -> pd.DataFrame:
    """One row per trial run. Columns: study, cell, task, variant, base_variant, ladder, ladder_value,
    <ladder name> (e.g. seq_len), kind, trial, slot, replicate, source_trial, superseded (a replicate run of a
    search trial that is no longer its cell's best: :func:`reports.stats.superseded`), seed, state,
    objective, solved_threshold (drawn when the solved criterion reads the objective), solved_rule, the
    hyperparameters and settings (``param.*``), the final value of every metric (``metric.*``), error,
    optuna_study, git_commit, run_id."""
    rows = []
    for run in runs:
        t = run.data.tags
        row = {"study": study, "cell": t["rnnbench.cell"], "task": t["rnnbench.task"],
               "variant": t["rnnbench.variant"], "base_variant": t["rnnbench.base_variant"],
               "ladder": t["rnnbench.ladder"], "ladder_value": _number(t["rnnbench.ladder_value"]),
               "kind": t["rnnbench.kind"], "trial": int(t["rnnbench.trial"]),
               "slot": _number(t.get("rnnbench.slot")),
               "replicate": _number(t.get("rnnbench.replicate")),
               "source_trial": _number(t.get("rnnbench.source_trial")), "seed": int(t["rnnbench.seed"]),
               "state": _state(run), "objective": run.data.metrics.get("objective")}
        row[row["ladder"]] = row["ladder_value"]
        row |= {f"param.{k}": _number(v) for k, v in sorted(run.data.params.items())}
        row |= {f"metric.{k}": v for k, v in sorted(run.data.metrics.items())}
        row |= {"error": t.get("rnnbench.error"), "optuna_study": t.get("rnnbench.optuna_study"),
                "git_commit": t.get("rnnbench.git_commit"), "run_id": run.info.run_id}
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # The solved criterion each run logged (Task.solved_when); its threshold is drawn on the objective's
    # axis only when the criterion reads the objective metric itself.
    rule = table["param.solved.metric"].astype(str) + " " + table["param.solved.op"] + " " + \
        table["param.solved.threshold"].map(lambda v: f"{v:.4g}")
    on_axis = table["param.solved.metric"] == meta["objective"]["metric"]
    table.insert(table.columns.get_loc("objective") + 1, "solved_rule", rule)
    table.insert(table.columns.get_loc("objective") + 1, "solved_threshold",
                 table["param.solved.threshold"].astype(float).where(on_axis))
    for col in ("slot", "replicate", "source_trial"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
    table.insert(table.columns.get_loc("source_trial") + 1, "superseded",
                 superseded(table, meta["objective"]["direction"]))
    return table


def curves_table(client: MlflowClient, runs) -> pd.DataFrame:
    """One row per (run, metric, step) of every per-eval metric (loss, solved, accuracies...)."""
    rows = []
    for run in runs:
        for key in sorted(set(run.data.metrics) - set(FINAL_METRICS)):
            for m in client.get_metric_history(run.info.run_id, key):
                rows.append((run.info.run_id, key, int(m.step), float(m.value)))
    out = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])
    return out.drop_duplicates(["run_id", "metric", "step"], keep="last").reset_index(drop=True)


def grads_table(client: MlflowClient, runs) -> pd.DataFrame:
    """One row per (replicate run, phase, lag) from the runs' ``grad_by_lag.json``: the norm of
    d loss / d h_t at lag T-1-t, at initialisation and after training."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            if run.data.tags.get("rnnbench.kind") != "replicate":
                continue
            if GRAD_ARTIFACT not in {a.path for a in client.list_artifacts(run.info.run_id)}:
                continue  # a failed run has no probe
            path = client.download_artifacts(run.info.run_id, GRAD_ARTIFACT, tmp)
            grads = json.loads(Path(path).read_text())
            for phase in ("init", "trained"):
                rows += [(run.info.run_id, phase, lag, float(v)) for lag, v in enumerate(grads.get(phase, []))]
    return pd.DataFrame(rows, columns=["run_id", "phase", "lag", "norm"])


CONDITIONAL = {"dropout": ("num_layers", "num_layers of 2 or more"), "momentum": ("optimizer", "sgd"),
               "nesterov": ("optimizer", "sgd")}  # searched hyperparameters that act only where another allows


def _conditional(param: str, searched: list[str]) -> str:
    """A note for a hyperparameter that did nothing in some trials (as sampled: Optuna's importance sees the
    value drawn, the run logged the one it trained with)."""
    if param in CONDITIONAL and CONDITIONAL[param][0] in searched:
        return (f"{param} acts only with {CONDITIONAL[param][1]}: its importance also counts the trials where "
                f"it did nothing")
    return ""


def importance_table(storage, results: pd.DataFrame) -> pd.DataFrame:
    """Per cell and searched hyperparameter: its importance over the cell's COMPLETE search trials.

    Importance needs at least two complete trials; otherwise the row carries a NaN and a note saying
    why. With a single searched parameter the normalised importance is 1 by construction (the note
    says so). PED-ANOVA (Optuna 5.0) raises nothing for a parameter that never varied or an objective
    that did not change: it gives them 0; when every parameter of a cell gets 0 the normalised
    importances are NaN and the note says so. Any error it does raise is a bug and propagates.
    """
    cols = ["task", "ladder_value", "variant", "cell", "param", "importance", "raw", "n_trials", "method", "note"]
    if storage is None or results.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    search = results[results.kind == "search"]
    for cell, g in search.groupby("cell", sort=False):
        first = g.iloc[0]
        base = {"task": first.task, "ladder_value": first.ladder_value, "variant": first.variant, "cell": cell}
        try:
            study = optuna.load_study(study_name=first.optuna_study, storage=storage)
        except KeyError:
            rows.append({**base, "param": None, "note": "Optuna study not found"})
            continue
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        params = sorted({p for t in done for p in t.params})
        base["n_trials"] = len(done)
        if len(done) < 2 or not params:
            rows.append({**base, "param": None, "method": "PED-ANOVA",
                         "note": f"{len(done)} complete trials and {len(params)} searched hyperparameters: "
                                 "importance needs at least 2 and 1"})
            continue
        raw = optuna.importance.PedAnovaImportanceEvaluator().evaluate(study)
        total = sum(raw.values())
        if total == 0:
            note = "PED-ANOVA gives every hyperparameter 0 (the best trials do not differ from the rest)"
        else:
            note = "single searched hyperparameter: importance 1 by construction" if len(params) == 1 else ""
        if len(done) < 10:
            note = "; ".join(filter(None, [note, f"only {len(done)} trials: indicative"]))
        for p in params:
            value = raw.get(p, 0.0)
            said = "; ".join(filter(None, [note, _conditional(p, params)]))
            rows.append({**base, "param": p, "importance": value / total if total > 0 else float("nan"),
                         "raw": value, "method": "PED-ANOVA", "note": said})
    out = pd.DataFrame(rows, columns=cols)
    out["n_trials"] = pd.to_numeric(out.n_trials).astype("Int64")
    for col in ("importance", "raw"):
        out[col] = pd.to_numeric(out[col])
    return out

