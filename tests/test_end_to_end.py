"""The walking skeleton, for real: study file -> Optuna -> MLflow -> report, through the command line."""

import json
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import rnnbench
from studies import spec as specs
from studies.queue import optuna_name
from studies.store import Store

CELLS = 6  # adding x 2 lengths + copy_memory, x 2 variants
TRIALS, REPLICATES = 2, 2


def test_optuna_has_exact_trial_counts(tiny_study):
    spec, _, _ = specs.load(tiny_study.spec)
    storage = Store(tiny_study.root).optuna_storage()
    for cell in specs.cells(spec):
        search = optuna.load_study(study_name=optuna_name(spec, cell, "search"), storage=storage).get_trials()
        assert [t.state for t in search] == [TrialState.COMPLETE] * TRIALS
        replicate = optuna.load_study(study_name=optuna_name(spec, cell, "replicate"), storage=storage).get_trials()
        assert [t.state for t in replicate] == [TrialState.COMPLETE] * REPLICATES
        best = min(search, key=lambda t: t.value)
        assert all(t.params == best.params for t in replicate)  # replicates retrain the best configuration


def test_mlflow_parent_child_structure(tiny_study):
    client = MlflowClient(Store(tiny_study.root).tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("rnnbench.role") == "cell"}
    children = [r for r in runs if r.data.tags.get("rnnbench.role") == "trial"]
    assert len(parents) == CELLS
    assert len(children) == CELLS * (TRIALS + REPLICATES)
    assert all(p.info.status == "FINISHED" for p in parents.values())
    for child in children:
        tags = child.data.tags
        parent = parents[tags["mlflow.parentRunId"]]
        assert parent.data.tags["rnnbench.cell"] == tags["rnnbench.cell"]
        assert child.info.status == "FINISHED"
        assert {"rnnbench.study", "rnnbench.task", "rnnbench.variant", "rnnbench.trial",
                "rnnbench.git_commit", "rnnbench.study_sha256"} <= set(tags)
        assert "lr" in child.data.params and "objective" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history] == [20, 40]
    per_cell = pd.Series([c.data.tags["rnnbench.cell"] for c in children]).value_counts()
    assert (per_cell == TRIALS + REPLICATES).all()
    for parent_id, parent in parents.items():  # the cell's summary: its best search trial and its result
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent_id]
        search = [c for c in mine if c.data.tags["rnnbench.kind"] == "search"]
        best = min(search, key=lambda c: (c.data.metrics["objective"], int(c.data.tags["rnnbench.trial"])))
        replicates = [c.data.metrics["objective"] for c in mine if c.data.tags["rnnbench.kind"] == "replicate"]
        assert parent.data.metrics["best_search_objective"] == best.data.metrics["objective"]
        assert parent.data.metrics["replicates_mean_objective"] == pytest.approx(sum(replicates) / len(replicates))


def test_report_table_and_figures(tiny_study):
    proc = rnnbench("report", "tiny", "--root", tiny_study.root)
    out = tiny_study.root / "reports" / "tiny"
    assert str(out / "index.html") in proc.stdout
    table = pd.read_csv(out / "results.csv")
    assert len(table) == CELLS * (TRIALS + REPLICATES)
    assert {"study", "task", "variant", "seq_len", "trial", "param.lr", "objective", "state"} <= set(table.columns)
    assert set(table.state) == {"COMPLETE"}
    assert sorted(table.seq_len.unique()) == [5, 8, 12]
    assert table.groupby(["task", "seq_len", "variant"]).size().eq(TRIALS + REPLICATES).all()
    figures = list((out / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 1000 for f in figures)
    page = (out / "index.html").read_text()
    assert "<img" in page and "The study is unfinished" not in page
    collection = json.loads((out / "manifest.json").read_text())["collection"]
    assert collection["replicates"] == REPLICATES and "cells_without_runs" not in collection


def test_rerun_resumes_without_new_trials(tiny_study):
    logs = sorted((tiny_study.root / "logs").glob("worker-*.log"))
    before = [f.read_bytes() for f in logs]
    proc = rnnbench("run", tiny_study.spec, "--root", tiny_study.root)
    assert "done" in proc.stdout
    assert [f.read_bytes() for f in logs] == before  # a finished study starts no worker
    client = MlflowClient(Store(tiny_study.root).tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    children = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=1000)
    assert len(children) == CELLS * (TRIALS + REPLICATES)
