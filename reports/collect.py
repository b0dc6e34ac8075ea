"""From MLflow to a tidy table: one row per trial run of a study."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

# MLflow status + tags -> the trial's end as Optuna and the README name it.
def _state(run) -> str:
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


def collect(client: MlflowClient, study: str) -> pd.DataFrame:
    """Every trial run of ``study`` (search and replicate), one row each, oldest first.

    Columns: study, cell, task, variant, base_variant, ladder, ladder_value, <ladder name>, kind, trial,
    replicate, seed, state, objective, the hyperparameters and settings (``param.*`` names as logged),
    the final metrics (``metric.*``), error, run_id.
    """
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise LookupError(f"no study {study!r} in the tracking store")
    runs = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=50000,
                              order_by=["attributes.start_time ASC"])
    rows = []
    for run in runs:
        t = run.data.tags
        row = {"study": study, "cell": t["rnnbench.cell"], "task": t["rnnbench.task"],
               "variant": t["rnnbench.variant"], "base_variant": t["rnnbench.base_variant"],
               "ladder": t["rnnbench.ladder"], "ladder_value": _number(t["rnnbench.ladder_value"]),
               "kind": t["rnnbench.kind"], "trial": int(t["rnnbench.trial"]),
               "replicate": _number(t.get("rnnbench.replicate")), "seed": int(t["rnnbench.seed"]),
               "state": _state(run), "objective": run.data.metrics.get("objective"),
               "error": t.get("rnnbench.error"), "run_id": run.info.run_id}
        row[row["ladder"]] = row["ladder_value"]
        row |= {f"param.{k}": _number(v) for k, v in run.data.params.items()}
        row |= {f"metric.{k}": v for k, v in run.data.metrics.items()}
        rows.append(row)
    return pd.DataFrame(rows)
