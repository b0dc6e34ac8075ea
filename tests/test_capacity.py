"""Capacity as an axis: ``model.hidden_size`` and ``model.param_budget`` as ladders (one cell per value), and
a scalar capacity that keeps every stored study resumable (same cells, keys, Optuna names, tags, fingerprints)."""

import hashlib
import json
import textwrap

import pytest

from conftest import rnnbench
from studies import queue
from studies import spec as specs

# Computed with the code before capacity ladders existed (commit 59d0523): a scalar hidden size or parameter
# budget must give exactly these cells, or studies stored with that code would no longer resume.
PINNED = {
    "quickstart": (
        "4ff16d1ad1b96a2138a0794b35a27fe7c57140fd1f193a0028a93b8fe40ebe54",
        "c844ea13c3571617eff2bddd8a0ae21031478d0ff6625aea425f81cadf082565",
        [("adding(seq_len=30)/rnn", "65645f410bc94efb"),
         ("adding(seq_len=30)/lstm", "ad4c03fe6e46e4e1"),
         ("adding(seq_len=30)/gru", "d7dc6f68de26c185"),
         ("copy_memory(seq_len=10,n_copy=5)/rnn", "13bedcd29819e1d0"),
         ("copy_memory(seq_len=10,n_copy=5)/lstm", "1ecab9157f203177"),
         ("copy_memory(seq_len=10,n_copy=5)/gru", "765a984482b4ebc4")]),
    "odyssey": (
        "b42fa066519f65957e462875a9b5b03253c38ee60f4ff8fc4794a19e3f9f1ae3",  # 2026-11-28: a comment changed
        "6162a1214d79deef19141319d3780caa7e11f1bef391a609894fbcdcd4a53697",
        [("adding(seq_len=20)/rnn", "236c411b9c773b81"),
         ("adding(seq_len=20)/lstm", "eb91ec02ee35e03d"),
         ("associative_recall(seq_len=32,n_pairs=4,n_queries=4,vocab=32)/np", "a6853062190c19e7"),
         ("associative_recall(seq_len=32,n_pairs=4,n_queries=4,vocab=32)/fgr", "901b441636b104f2")]),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_scalar_capacity_keeps_keys_names_tags_and_fingerprints(name):
    from studies.tracking import cell_tags, run_name

    text_sha, digest, examples = PINNED[name]
    spec, _, sha = specs.load(name)
    assert sha == text_sha, f"studies/{name}.yaml changed: the pinned cells no longer apply"
    cells = specs.cells(spec)
    rows = [[c.key, specs.cell_fingerprint(spec, c), queue.optuna_name(spec, c, "search"),
             queue.optuna_name(spec, c, "replicate"), cell_tags(spec, c), run_name(c, "search", 3)] for c in cells]
    shown = [(c.key, specs.cell_fingerprint(spec, c)) for c in cells]
    assert (shown if len(shown) == len(examples) else shown[:2] + shown[-2:]) == examples
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() == digest


# --- the study file ---------------------------------------------------------------------------------------

LADDER = textwrap.dedent("""\
    name: cap
    seed: 2
    tasks:
      - task: adding
        seq_len: [6, 8]
    variants: [rnn, lstm]
    model: {hidden_size: [4, 8]}
    train: {steps: 4, eval_every: 2, eval_size: 16, batch_size: 8}
    search_space:
      lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
    trials: 1
    replicates: 2
    pruner: none
    """)


def write(tmp_path, text, name="cap.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_capacity_ladder_makes_one_cell_per_value(tmp_path):
    spec, _, _ = specs.load(write(tmp_path, LADDER))
    cells = specs.cells(spec)
    assert [c.key for c in cells] == [
        "adding(seq_len=6)/rnn(hidden_size=4)", "adding(seq_len=6)/lstm(hidden_size=4)",
        "adding(seq_len=6)/rnn(hidden_size=8)", "adding(seq_len=6)/lstm(hidden_size=8)",
        "adding(seq_len=8)/rnn(hidden_size=4)", "adding(seq_len=8)/lstm(hidden_size=4)",
        "adding(seq_len=8)/rnn(hidden_size=8)", "adding(seq_len=8)/lstm(hidden_size=8)"]
    assert [(c.capacity, c.capacity_value, c.model.hidden_size) for c in cells[:4:2]] == [
        ("hidden_size", 4, 4), ("hidden_size", 8, 8)]
    assert len({specs.cell_fingerprint(spec, c) for c in cells}) == len(cells)
    # a ladder cell is defined as the same study with that value alone (only its name says it is a ladder)
    alone, _, _ = specs.load(write(tmp_path, LADDER.replace("[4, 8]", "8"), "alone.yaml"))
    assert specs.cell_fingerprint(alone, specs.cells(alone)[1]) == specs.cell_fingerprint(spec, cells[3])
    assert specs.cells(alone)[1].key == "adding(seq_len=6)/lstm" and specs.cells(alone)[1].capacity is None
    by_set, _, _ = specs.load(write(tmp_path, LADDER.replace("[4, 8]", "8"), "set.yaml"), ["model.hidden_size=[4,8]"])
    assert [c.key for c in specs.cells(by_set)] == [c.key for c in cells]


def test_a_parameter_budget_ladder(tmp_path):
    text = LADDER.replace("model: {hidden_size: [4, 8]}", "model: {match: params, param_budget: [200, 800]}")
    spec, _, _ = specs.load(write(tmp_path, text))
    keys = [c.key for c in specs.cells(spec)]
    assert keys[:4] == ["adding(seq_len=6)/rnn(param_budget=200)", "adding(seq_len=6)/lstm(param_budget=200)",
                        "adding(seq_len=6)/rnn(param_budget=800)", "adding(seq_len=6)/lstm(param_budget=800)"]


@pytest.mark.parametrize("model, override, words", [
    ("{hidden_size: [4, 4]}", None, "model.hidden_size: value 4 appears twice in the ladder"),
    ("{hidden_size: []}", None, "model.hidden_size: a ladder needs at least one value"),
    ("{hidden_size: [4, 0]}", None, "model.hidden_size: ladder value 0: input should be greater than or equal to 1"),
    ("{hidden_size: [4, -8]}", None, "model.hidden_size: ladder value -8"),
    ("{hidden_size: 0}", None, "model.hidden_size: Input should be greater than or equal to 1"),  # as before
    ("{match: params, param_budget: [500, 500]}", None, "model.param_budget: value 500 appears twice in the ladder"),
    ("{match: params, param_budget: [0]}", None, "model.param_budget: ladder value 0"),
    ("{match: params, param_budget: 500, hidden_size: [4, 8]}", None, "model: a ladder of hidden_size needs match: width"),
    ("{hidden_size: 8}", "model.hidden_size=[16,16]", "model.hidden_size: value 16 appears twice in the ladder"),
    ("{hidden_size: [4, 8]}", "search_space.hidden_size={type: int, low: 4, high: 16}",
     "search_space.hidden_size: model.hidden_size is a ladder (one cell per value); ladder it or search it"),
])
def test_capacity_ladder_errors_are_one_line_naming_the_file_and_field(tmp_path, model, override, words):
    path = write(tmp_path, LADDER.replace("{hidden_size: [4, 8]}", model))
    with pytest.raises(specs.SpecError) as e:
        specs.load(path, [override] if override else [])
    message = str(e.value)
    where = f"--set {override}: " if override else f"{path}: "
    assert "\n" not in message and message.startswith(where) and words in message, message


def test_every_capacity_value_is_built_at_load(tmp_path):
    text = LADDER.replace("[rnn, lstm]", "[rnn, {variant: clockwork, switches: {modules: 4}}]")
    specs.load(write(tmp_path, text))  # multiples of 4 build
    with pytest.raises(specs.SpecError, match=r"variants\[1\]\.switches: .*hidden_size=6 from model.hidden_size"):
        specs.load(write(tmp_path, text.replace("[4, 8]", "[4, 6]")))


def test_plan_shows_the_ladder_cells(tmp_path, monkeypatch):
    from studies import plan

    monkeypatch.setattr(plan, "engine_start_seconds", lambda: 1.0)  # a fresh interpreter: not what is tested
    spec, _, _ = specs.load(write(tmp_path, LADDER.replace("seq_len: [6, 8]", "seq_len: 6")))
    out = plan.format_plan(plan.estimate(spec, tmp_path / "plan"))
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.startswith("adding(")}
    assert rows == {"adding(seq_len=6)/rnn(hidden_size=4)": ["4", "37"], "adding(seq_len=6)/lstm(hidden_size=4)": ["4", "133"],
                    "adding(seq_len=6)/rnn(hidden_size=8)": ["8", "105"], "adding(seq_len=6)/lstm(hidden_size=8)": ["8", "393"]}
    assert "4 cells, 12 runs" in out


# --- a real tiny study: training gets each value, MLflow and the report show it ----------------------------

@pytest.fixture(scope="module")
def capacity_study(tmp_path_factory):
    base = tmp_path_factory.mktemp("capacity")
    path = write(base, LADDER.replace("seq_len: [6, 8]", "seq_len: 6"))
    rnnbench("run", path, "--root", base / "runs")
    rnnbench("report", path, "--root", base / "runs")
    return path, base / "runs"


def test_training_gets_each_cells_hidden_size(capacity_study):
    from mlflow.tracking import MlflowClient

    from studies.store import Store

    _, root = capacity_study
    client = MlflowClient(Store(root).tracking_uri)
    exp = client.get_experiment_by_name("cap")
    runs = client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=100)
    assert len(runs) == 4 * 3  # 2 variants x 2 hidden sizes, 1 search trial + 2 replicates each
    n_params = {("rnn", 4): 37, ("lstm", 4): 133, ("rnn", 8): 105, ("lstm", 8): 393}  # cell + head (1 output)
    for run in runs:
        tags, params = run.data.tags, run.data.params
        size = int(tags["rnnbench.cell"].rsplit("hidden_size=", 1)[1].rstrip(")"))
        variant = tags["rnnbench.variant"]
        assert params["hidden_size"] == params["model.hidden_size"] == str(size)  # what the model was built with
        assert int(params["n_params"]) == n_params[variant, size]
        assert run.info.run_name.startswith(f"{variant} h={size} · adding T=6")


def test_report_keeps_capacities_apart_and_draws_the_capacity_figure(capacity_study, tmp_path):
    import pandas as pd

    _, root = capacity_study
    out = root / "reports" / "cap"
    summary = pd.read_csv(out / "summary.csv")
    assert list(zip(summary.capacity_value, summary.variant)) == [(4, "rnn"), (4, "lstm"), (8, "rnn"), (8, "lstm")]
    assert set(summary.capacity) == {"hidden_size"} and set(summary.n) == {2} and set(summary.trials_complete) == {1}
    stats = pd.read_csv(out / "statistics.csv")
    assert list(zip(stats.capacity_value, stats.variant, stats.reference)) == [(4, "rnn", "lstm"), (8, "rnn", "lstm")]
    page = (out / "index.html").read_text()
    assert 'src="figures/capacity_adding.png"' in page and "Collins et al. 2017" in page
    assert "seq_len = 6, hidden_size = 4" in page  # at a glance: one group per length and size
    assert (out / "figures" / "capacity_adding.png").stat().st_size > 5000
    rnnbench("report", "--from", out, "--out", tmp_path / "again", "--root", tmp_path / "no-store")
    again = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert again == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_status_shows_the_ladder_cells(capacity_study):
    path, root = capacity_study
    out = rnnbench("status", path, "--root", root).stdout
    assert "adding(seq_len=6)/lstm(hidden_size=8)" in out and "12/12 trials ended" in out


# --- the capacity figure on synthetic tables -------------------------------------------------------------

def capacity_tables(values):
    """The synthetic tables of tests/test_reports_stats.py (one task), once per hidden size in ``values``,
    as a study with ``model.hidden_size: values`` logs them; larger models do a little better."""
    import pandas as pd

    from test_reports_stats import synthetic

    t = synthetic(n=3, tasks=("adding",))
    parts = {"results": [], "curves": [], "grad_by_lag": [], "importance": []}
    for h in values:
        rename = {run: f"{run}@{h}" for run in t.results.run_id}
        r = t.results.assign(cell=t.results.cell + f"(hidden_size={h})", run_id=t.results.run_id.map(rename),
                             objective=t.results.objective * 16 / h, **{"param.model.hidden_size": h,
                                                                          "param.n_params": t.results["param.n_params"] * h})
        parts["results"].append(r)
        parts["curves"].append(t.curves.assign(run_id=t.curves.run_id.map(rename)))
        parts["grad_by_lag"].append(t.grad_by_lag.assign(run_id=t.grad_by_lag.run_id.map(rename)))
        parts["importance"].append(t.importance.assign(cell=t.importance.cell + f"(hidden_size={h})"))
    frames = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    return type(t)(**frames, collection=t.collection)


@pytest.mark.parametrize("values", [(16, 64), (16,)])
def test_capacity_figure_is_drawn_with_two_values_and_explained_with_one(tmp_path, values):
    from reports import stats
    from reports.figures import Figure, Painter, draw_all

    t = capacity_tables(values)
    cells = stats.cell_stats(stats.selected_runs(t.results))
    assert len(cells) == 2 * 3 * len(values)  # lengths x variants x sizes: no two sizes merged
    out = dict(draw_all(t, cells, tmp_path)["adding"])
    # every other figure draws each variant at each size as a variant of its own
    assert Painter(t, cells, tmp_path).order == [f"{v} h={h}" for v in ("lstm", "twin", "bad") for h in values]
    if len(values) == 2:
        fig = out["capacity"]
        assert isinstance(fig, Figure) and "model.hidden_size = 16, 64" in fig.caption and "n in the legend" in fig.caption
        assert (tmp_path / "capacity_adding.png").stat().st_size > 5000
    else:
        assert out["capacity"] == ("the study has a single model.hidden_size (16), so there is no capacity curve; "
                                   "the summary and the objective figure show that one value")
        assert not (tmp_path / "capacity_adding.png").exists()


def test_capacity_figure_without_a_ladder_says_why(tmp_path):
    from reports import stats
    from reports.figures import draw_all
    from test_reports_stats import synthetic

    t = synthetic(n=3, tasks=("adding",))
    out = dict(draw_all(t, stats.cell_stats(stats.selected_runs(t.results)), tmp_path)["adding"])
    assert out["capacity"].startswith("the study has a single model size (model.hidden_size and model.param_budget "
                                      "are not ladders)")
