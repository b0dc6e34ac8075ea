"""`rnnbench report` on a real tiny study, and `--from` regeneration byte for byte without MLflow."""

import hashlib
import json
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import rnnbench
from rnnbench import cli
from reports import tables as saved
from reports.build import build_report, publish
from reports.figures import KINDS
from reports.stats import versus_reference
from studies.store import Store

RUNS = 24  # 6 cells x (2 search trials + 2 replicates)


@pytest.fixture(scope="module")
def report(tiny_study):
    proc = rnnbench("report", "tiny", "--root", tiny_study.root)
    return tiny_study.root / "reports" / "tiny", proc.stdout


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tables_hold_everything_the_figures_need(report, tiny_study):
    out, _ = report
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == RUNS and len(pd.read_csv(out / "results.csv")) == RUNS
    assert {"study", "task", "variant", "seq_len", "trial", "param.lr", "objective", "state", "solved_threshold",
            "metric.solved", "metric.baseline", "param.n_params", "metric.seconds_per_step", "run_id"} <= set(results)
    # solved threshold: adding is solved below 1% of its baseline; copy memory's criterion is not on the loss
    adding = results[results.task == "adding"]
    assert adding.solved_threshold.to_numpy() == pytest.approx(0.01 * adding["metric.baseline"].to_numpy(), rel=1e-4)
    assert results[results.task == "copy_memory"].solved_threshold.isna().all()
    assert set(results[results.task == "copy_memory"].solved_rule) == {"recall_acc >= 0.99"}

    curves = pd.read_parquet(out / "curves.parquet")
    assert set(curves.run_id) == set(results.run_id) and {"loss", "solved"} <= set(curves.metric)
    steps = curves[curves.metric == "loss"].groupby("run_id").step.apply(list)
    assert len(steps) == RUNS and all(s == [20, 40] for s in steps)

    grads = pd.read_parquet(out / "grad_by_lag.parquet")
    replicates = set(results[results.kind == "replicate"].run_id)
    assert set(grads.run_id) == replicates and set(grads.phase) == {"init", "trained"}
    for _, g in grads.groupby(["run_id", "phase"]):
        assert g.lag.tolist() == list(range(len(g))) and (g.norm >= 0).all()

    imp = pd.read_parquet(out / "importance.parquet")
    assert len(imp) == 6 and set(imp.param) == {"lr"} and imp.importance.tolist() == pytest.approx([1.0] * 6)
    assert imp.note.str.contains("single searched hyperparameter").all()


def test_manifest_states_provenance_and_policy(report, tiny_study):
    out, _ = report
    manifest = json.loads((out / "manifest.json").read_text())
    col, rep = manifest["collection"], manifest["report"]
    assert col["study_sha256"] == hashlib.sha256(tiny_study.spec.read_text().encode()).hexdigest()
    assert col["study_file"].strip() == tiny_study.spec.read_text().strip()
    results = pd.read_parquet(out / "results.parquet")
    assert col["mlflow_run_ids"] == sorted(results.run_id)
    assert sum(col["git_commits"].values()) == RUNS
    assert {"torch", "optuna", "mlflow"} <= set(col["versions_of_runs"])
    assert "PED-ANOVA" in col["importance_method"]
    assert rep["reference"] == "lstm" and "replicate runs" in rep["aggregation"]["runs per cell"]
    assert "Student-t" in rep["aggregation"]["centre and interval"] and "Welch" in rep["aggregation"]["primary test"]
    assert rep["superseded_replicate_runs"] == 0 and not results.superseded.any()
    for name, digest in rep["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    # every kind for 2 tasks, PNG + SVG, except importance (only lr is searched), capacity (one hidden size)
    # and copy_memory's difficulty (a single seq_len)
    assert len(rep["figures"]) == (len(KINDS) * 2 - 5) * 2


def test_index_page_has_study_stats_figures_and_captions(report):
    out, stdout = report
    assert str(out / "index.html") in stdout
    page = (out / "index.html").read_text()
    assert "seq_len: [8, 12]" in page  # the study file
    assert "Welch" in page and "Holm" in page and "Hedges" in page and "Mann-Whitney" not in page
    assert page.index("At a glance") < page.index("Aggregation policy")
    stats = pd.read_csv(out / "statistics.csv")
    assert len(stats) == 3 and set(stats.variant) == {"rnn"} and set(stats.reference) == {"lstm"}
    summary = pd.read_csv(out / "summary.csv")
    assert {"n", "mean", "ci_low", "ci_high"} <= set(summary) and set(summary.n) == {2}
    assert page.count(", n = 2</td>") == 2 * len(summary)  # at a glance and the summary
    drawn = {"adding": ("objective", "difficulty", "learning", "lr", "cost", "gradient"),
             "copy_memory": ("objective", "learning", "lr", "cost", "gradient")}
    for task, kinds in drawn.items():
        for kind in kinds:
            stem = f"{kind}_{task}"
            assert f'src="figures/{stem}.png"' in page
            assert (out / "figures" / f"{stem}.png").stat().st_size > 5000
            assert (out / "figures" / f"{stem}.svg").stat().st_size > 5000
    assert page.count("<figcaption>") == 11
    assert page.count("No importance figure: only one hyperparameter (lr) was searched") == 2
    assert "No difficulty figure: the study has a single seq_len for copy_memory (5)" in page
    assert page.count("No capacity figure: the study has a single model size") == 2


def test_report_is_logged_to_mlflow_once_and_never_as_a_trial(report, tiny_study):
    out, _ = report
    store = Store(tiny_study.root)
    client = MlflowClient(store.tracking_uri)
    publish(client, "tiny", out)  # a regeneration replaces the report run
    exp = client.get_experiment_by_name("tiny")
    reports = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'report'")
    assert len(reports) == 1
    names = {a.path for a in client.list_artifacts(reports[0].info.run_id)}
    assert {"index.html", "results.parquet", "manifest.json", "figures"} <= names
    trials = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=1000)
    assert len(trials) == RUNS


def test_from_regenerates_byte_identical_without_mlflow(report, tmp_path):
    out, _ = report
    copy = tmp_path / "sent-to-a-colleague"
    shutil.copytree(out, copy)  # no study store anywhere near it
    rnnbench("report", "--from", copy, "--out", tmp_path / "a", "--root", tmp_path / "no-store")
    build_report(saved.load(copy / "results.parquet"), tmp_path / "b", source=copy)
    first, second = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert first == second
    assert first == _hashes(out)  # and identical to the report drawn straight after collection
    assert not (tmp_path / "no-store").exists()


def test_an_interrupted_rebuild_leaves_the_previous_report_whole(report, tmp_path, monkeypatch):
    out, _ = report
    copy = tmp_path / "report"
    shutil.copytree(out, copy)
    before = _hashes(copy)
    from reports import figures
    drawn = []

    def interrupted(self, task):  # Ctrl-C in the middle of the figures, after some were drawn
        drawn.append(task)
        raise KeyboardInterrupt
    monkeypatch.setattr(figures.Painter, "difficulty", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_report(saved.load(copy), copy, source=copy)
    assert drawn and _hashes(copy) == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # nothing left beside it
    monkeypatch.undo()
    build_report(saved.load(copy), copy, source=copy)  # in place, as `report --from F` without --out
    assert _hashes(copy) == before


def test_reference_option_and_user_errors(report, tmp_path):
    out, _ = report
    vs = versus_reference(saved.load(out), "rnn")
    assert set(vs.variant) == {"lstm"} and set(vs.reference) == {"rnn"} and len(vs) == 3
    runner = CliRunner()  # in-process: these fail before drawing anything
    bad = runner.invoke(cli, ["report", "--from", str(out), "--out", str(tmp_path / "x"), "--reference", "gru"])
    assert bad.exit_code == 2 and "'gru' is not in the study" in bad.output
    assert not (tmp_path / "x").exists()
    neither = runner.invoke(cli, ["report"])
    assert neither.exit_code == 2 and "--from" in neither.output
    not_saved = runner.invoke(cli, ["report", "--from", str(tmp_path)])
    assert not_saved.exit_code == 2 and "not a saved report" in not_saved.output


def test_the_tables_digest_changes_with_any_value(tiny_study):
    """`report --watch` redraws when the digest changes: not for a finished study, for any value that moves."""
    from reports.collect import collect
    store = Store(tiny_study.root)
    tables = collect(store.mlflow_client(), "tiny", store.optuna_storage())
    again = collect(store.mlflow_client(), "tiny", store.optuna_storage())
    assert tables.digest() == again.digest()  # a finished study: nothing new, no redraw
    again.curves.loc[0, "value"] += 1e-12
    assert tables.digest() != again.digest()
    again = collect(store.mlflow_client(), "tiny", store.optuna_storage())
    again.collection["stopped_cells"] = ["x"]
    assert tables.digest() != again.digest()
