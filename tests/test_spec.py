"""Study files: strict validation, one-line errors naming the file and the field; cells and ladders."""

import textwrap
from pathlib import Path

import pytest

from conftest import TINY, rnnbench
from studies import spec as specs


def write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(specs.SpecError) as e:
        specs.load(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


BASE = """\
name: t
tasks: [{task: adding, seq_len: 10}]
variants: [rnn]
"""


def test_minimal_spec_loads_with_defaults(tmp_path):
    spec, path, sha = specs.load(write(tmp_path, BASE))
    assert spec.trials == 8 and spec.sampler == "tpe" and spec.pruner == "median" and spec.replicates == 5
    assert spec.reference_label == "rnn" and len(sha) == 64


@pytest.mark.parametrize("text, field, words", [
    (BASE + "trails: 3\n", "trails", "unknown field"),
    (BASE + "train: {stepz: 3}\n", "train.stepz", "unknown field"),
    (BASE + "trials: 0\n", "trials", "greater than or equal to 1"),
    (BASE + "train: {steps: many}\n", "train.steps", "integer"),
    (BASE + "train: {steps: 3, population: 0}\n", "train.population", "expected off, auto or the most members"),
    (BASE + "train: {steps: 3, population: 4x}\n", "train.population", "got '4x'"),
    (BASE + "train: {seconds: 2, population: 4}\n", "train", "a population's members share one clock"),
    (BASE + "sampler: bayes\n", "sampler", "'tpe', 'random', 'grid' or 'qmc'"),
    (BASE + "search_space: {lr: {type: float, low: 1, high: 0.1}}\n", "search_space.lr", "above high"),
    (BASE + "search_space: {lr: {type: float, low: 0, high: 0.1, log: true}}\n", "search_space.lr", "low > 0"),
    (BASE + "search_space: {momentun: {type: float, low: 0, high: 0.9}}\n", "search_space",
     "unknown hyperparameter 'momentun'; allowed: hidden_size, num_layers, dropout, lr, batch_size"),
    (BASE + "model: {match: params}\n", "model", "param_budget"),
    (BASE + "reference: gru\n", "reference", "not among the variants"),
    (BASE.replace("[rnn]", "[rnn, lstn]"), "variants[1]", "unknown variant 'lstn'"),
    (BASE.replace("[rnn]", "[{variant: lstm, switches: {peepholes: true}}]"), "variants[0]", "allowed:"),
    (BASE.replace("[rnn]", "[{variant: lstm, switches: {peephole: 'no'}}]"), "variants[0]", "takes true or false"),
    (BASE.replace("[rnn]", "[rnn, rnn]"), "variants", "used twice"),
    (BASE.replace("adding", "addition"), "tasks[0]", "unknown task 'addition'"),
    (BASE.replace("[rnn]", "[mingru]"), "variants[0]", "rnn (your own? list its file under `imports:`)"),
    (BASE.replace("adding", "delayed_xor"), "tasks[0]", "(your own? list its file under `imports:`)"),
    (BASE.replace("seq_len: 10", "lenght: 10"), "tasks[0]", "has no setting 'lenght'; allowed: seq_len"),
    (BASE.replace("seq_len: 10", "seq_len: 1"), "tasks[0]", "adding.seq_len"),
    (BASE.replace("seq_len: 10", "seq_len: [10, 0]"), "tasks[0]", "adding.seq_len"),
    (BASE.replace("seq_len: 10", "seq_len: []"), "tasks[0]", "at least one value"),
    (BASE.replace("{task: adding, seq_len: 10}", "{seq_len: 10}"), "tasks[0]", "missing 'task'"),
    (BASE.replace("name: t", "name: 'a b'"), "name", "pattern"),
    # YAML's true/false where a number belongs: pydantic alone would read them as 1/0
    (BASE + "trials: true\n", "trials", "expected a number, not true"),
    (BASE + "seed: false\n", "seed", "expected a number, not false"),
    (BASE + "train: {steps: true}\n", "train.steps", "expected a number, not true"),
    (BASE + "train: {lr: true}\n", "train.lr", "expected a number, not true"),
    (BASE + "model: {hidden_size: true}\n", "model.hidden_size", "expected a number, not true"),
    (BASE + "model: {hidden_size: [16, false]}\n", "model.hidden_size", "expected a number, not false"),
    (BASE + "search_space: {lr: {type: float, low: true, high: 0.1}}\n", "search_space.lr.low", "not true"),
])
def test_bad_spec_names_the_field(tmp_path, text, field, words):
    message = error(tmp_path, text)
    assert f": {field}" in message and words in message, message


@pytest.mark.parametrize("value, expected", [("off", "off"), ("false", "off"), ("auto", "auto"), ("true", "auto"),
                                             ("4", 4), ("1", 1)])
def test_population_setting(tmp_path, value, expected):
    spec, _, _ = specs.load(write(tmp_path, BASE + f"train: {{steps: 3, population: {value}}}\n"))
    assert spec.train.population == spec.train.pooled == expected
    if expected in ("off", "auto", 1):  # under a seconds budget each run keeps its own clock: one by one
        spec, _, _ = specs.load(write(tmp_path, BASE + f"train: {{seconds: 2, population: {value}}}\n"))
        assert spec.train.population == expected and spec.train.pooled == "off"


def test_the_readmes_annotated_study_file_loads(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme[readme.index("## Study files"):].split("```yaml\n", 1)[1].split("```", 1)[0]
    spec, _, _ = specs.load(write(tmp_path, block))
    assert spec.name == "my_ablation" and spec.train.population == "auto" and spec.train.optimizer == "adam"


def test_invalid_yaml_names_the_line(tmp_path):
    assert ":4:" in error(tmp_path, BASE.replace("variants: [rnn]", "variants: [rnn\n  x: ]"))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, BASE + "trails: 3\n")
    proc = rnnbench("run", path, "--root", tmp_path / "runs", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "trails: unknown field" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a bad study file


def test_shipped_study_by_name():
    spec, path, _ = specs.load("quickstart")
    assert spec.name == "quickstart" and path.name == "quickstart.yaml"
    with pytest.raises(specs.SpecError, match="shipped: .*quickstart"):
        specs.load("no_such_study")


def test_ladders_make_one_cell_per_value(tmp_path):
    spec, _, _ = specs.load(write(tmp_path, TINY))
    keys = [c.key for c in specs.cells(spec)]
    assert keys == ["adding(seq_len=8)/rnn", "adding(seq_len=8)/lstm", "adding(seq_len=12)/rnn",
                    "adding(seq_len=12)/lstm", "copy_memory(seq_len=5,n_copy=2)/rnn",
                    "copy_memory(seq_len=5,n_copy=2)/lstm"]
    assert [c.ladder_value for c in specs.cells(spec)][:4] == [8, 8, 12, 12]


def test_per_variant_search_space_overrides(tmp_path):
    text = BASE.replace("[rnn]", "[rnn, {variant: lstm, search_space: {lr: {type: float, low: 0.01, high: 0.1}}}]")
    text += "search_space:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-3}\n  hidden_size: {type: int, low: 8, high: 32}\n"
    spec, _, _ = specs.load(write(tmp_path, text))
    rnn, lstm = specs.cells(spec)
    assert dict(rnn.search_space)["lr"].high == 1e-3
    assert dict(lstm.search_space)["lr"].low == 0.01 and "hidden_size" in dict(lstm.search_space)


def test_fingerprint_ignores_trial_count_but_not_search_space(tmp_path):
    a, _, _ = specs.load(write(tmp_path, BASE + "trials: 3\n", "a.yaml"))
    b, _, _ = specs.load(write(tmp_path, BASE + "trials: 9\n", "b.yaml"))
    c, _, _ = specs.load(write(tmp_path, BASE + "search_space: {lr: {type: float, low: 0.1, high: 0.2}}\n", "c.yaml"))
    fp = [specs.cell_fingerprint(s, specs.cells(s)[0]) for s in (a, b, c)]
    assert fp[0] == fp[1] != fp[2]


# --- refused at load, before anything runs --------------------------------------------------------------

def test_unreadable_study_file_is_one_line(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"name: t\n\xff\xfe\x00tasks: []\n")
    for path, words in ((binary, "not UTF-8 text"), (tmp_path, "is a directory")):
        with pytest.raises(specs.SpecError) as e:
            specs.load(path)
        assert str(e.value).startswith(f"{path}: ") and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, words", [
    # YAML keeps the last of two equal keys and drops the first without a word: refused, naming both lines
    (BASE + "train: {steps: 20}\ntrials: 2\ntrain: {steps: 25}\n",
     ":6: not valid YAML (key 'train' appears twice in one mapping (first at line 4))"),
    (BASE.replace("seq_len: 10}", "seq_len: 10, seq_len: 12}"), ":2: not valid YAML (key 'seq_len' appears twice"),
    ("name: t\x00\n", ": not valid YAML (unacceptable character #x0000: special characters are not allowed in"),
])
def test_yaml_mistakes_are_one_line_naming_the_line(tmp_path, text, words):
    with pytest.raises(specs.SpecError) as e:
        specs.load(write(tmp_path, text))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_an_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-3 as text; a study file means the number, in a choice and a --set alike."""
    spec, _, _ = specs.load(write(tmp_path, BASE + "search_space: {lr: {type: categorical, choices: [1e-3, 1E-2]}}\n"),
                            ["train.grad_clip=5e-1"])
    assert spec.search_space["lr"].choices == [0.001, 0.01] and spec.train.grad_clip == 0.5


CLOCKWORK5 = BASE.replace("[rnn]", "[rnn, {variant: clockwork, switches: {modules: 5}}]")


@pytest.mark.parametrize("text, field, words", [
    # task entries
    (BASE.replace("task: adding", "task: [adding]"), "tasks[0].task", "task name"),
    (BASE.replace("task: adding", "task: 3"), "tasks[0].task", "known: "),
    (BASE.replace("[{task: adding, seq_len: 10}]", "[adding]"), "tasks[0]", "valid dictionary"),
    # contradictory switches, and switches that do not fit the model's width
    (BASE.replace("[rnn]", "[rnn, {variant: lstm, switches: {coupled: true, forget_gate: false}}]"),
     "variants[1].switches", "coupled=True sets f = 1 - i"),
    (BASE.replace("[rnn]", "[{variant: rnn, switches: {nonlinearity: sigmoid}}]"), "variants[0].switches",
     "'tanh' or 'relu'"),
    # ...at equal parameter count: the reason, and the budget (no width a trial would get)
    (BASE.replace("[rnn]", "[rnn, {variant: lstm, switches: {coupled: true, forget_gate: false}}]")
     + "model: {match: params, param_budget: 500}\n", "variants[1].switches",
     "coupled=True sets f = 1 - i but forget_gate=False sets f = 1; pick one (model.param_budget 500, num_layers=1"),
    (CLOCKWORK5 + "model: {hidden_size: 32}\n", "variants[1].switches", "hidden_size=32 from model.hidden_size"),
    (CLOCKWORK5 + "search_space: {hidden_size: {type: int, low: 20, high: 32, step: 12}}\n", "variants[1].switches",
     "hidden_size=32 from search_space.hidden_size"),
    (CLOCKWORK5 + "search_space: {hidden_size: {type: int, low: 20, high: 40, step: 2}}\n", "variants[1].switches",
     "hidden_size=22 from search_space.hidden_size"),
    (CLOCKWORK5 + "search_space: {hidden_size: {type: categorical, choices: [20, 24]}}\n", "variants[1].switches",
     "hidden_size=24 from search_space.hidden_size"),
    # an objective the task does not report
    (BASE + "objective: {metric: recall_acc}\n", "objective.metric",
     "task 'adding' does not report 'recall_acc'; it reports: loss, solved"),
    # search-space bounds the model or Optuna refuses
    (BASE + "search_space: {hidden_size: {type: int, low: 0, high: 8}}\n", "search_space.hidden_size", "low 0"),
    (BASE + "search_space: {num_layers: {type: int, low: 0, high: 2}}\n", "search_space.num_layers", "low 0"),
    (BASE + "search_space: {batch_size: {type: int, low: -4, high: 8}}\n", "search_space.batch_size", "low -4"),
    (BASE + "search_space: {dropout: {type: float, low: 0, high: 1}}\n", "search_space.dropout", "less than 1"),
    # a width the study would not use
    (BASE + "model: {match: params, param_budget: 300, hidden_size: 32}\n", "model",
     "hidden_size 32 would be ignored: with match: params"),
    # a capacity ladder whose two values build one model: two cells training the same thing
    (BASE + "model: {match: params, param_budget: [300, 310]}\n", "model.param_budget",
     "300 and 310 both give variant 'rnn' hidden_size 15"),
    # a budget the smallest model overshoots (rnn, adding: hidden 1 has 2 + 1 + 2 parameters and a head of 2)
    (BASE + "model: {match: params, param_budget: 3}\n", "model.param_budget",
     "3 is less than half the smallest 'rnn' (hidden_size 1: 7 parameters with its head)"),
    # dropout acts between stacked layers: with one layer it would change nothing the report could show
    (BASE + "model: {dropout: 0.5}\n", "model.dropout", "dropout 0.5 does nothing with num_layers 1"),
    (BASE + "search_space: {dropout: {type: float, low: 0.0, high: 0.5}}\n", "search_space.dropout",
     "dropout 0.5 does nothing with num_layers 1"),
    (BASE + "search_space: {dropout: {type: float, low: -0.1, high: 0.5}}\n", "search_space.dropout", "low -0.1"),
    (BASE + "search_space: {lr: {type: float, low: 0, high: 0.1}}\n", "search_space.lr", "greater than 0"),
    (BASE + "search_space: {lr: {type: float, low: 1.0e-4, high: 0.1, log: true, step: 1.0e-4}}\n",
     "search_space.lr", "log and step"),
    (BASE + "search_space: {batch_size: {type: categorical, choices: [8, 16], step: 8}}\n",
     "search_space.batch_size", "choices"),
    (BASE + "search_space: {dropout: {type: float, low: 0.0, high: 0.5, step: 0.2}}\n", "search_space.dropout",
     "not a multiple of step"),
    (BASE + "search_space: {hidden_size: {type: int, low: 8, high: 30, step: 8}}\n", "search_space.hidden_size",
     "high: 24"),
    (BASE + "search_space: {hidden_size: {type: int, low: 8, high: 32, step: 0}}\n", "search_space.hidden_size",
     "step must be > 0"),
    (BASE + "search_space: {hidden_size: {type: int, low: 8, high: 32, step: 2.5}}\n", "search_space.hidden_size",
     "whole"),
    (BASE + "search_space: {lr: {type: int, low: 1, high: 2}}\n", "search_space.lr", "type float or categorical"),
    (BASE + "search_space: {hidden_size: {type: float, low: 8, high: 32}}\n", "search_space.hidden_size",
     "type int or categorical"),
    (BASE + "search_space: {batch_size: {type: categorical, choices: [0, 8]}}\n", "search_space.batch_size",
     "choice 0"),
    (BASE + "search_space: {batch_size: {type: categorical, choices: [8, 16.5]}}\n", "search_space.batch_size",
     "valid integer"),
    (BASE + "search_space: {batch_size: {type: categorical, choices: [8, 8]}}\n", "search_space.batch_size",
     "appears twice"),
    (BASE.replace("[rnn]", "[{variant: rnn, search_space: {lr: {type: float, low: -1, high: 1}}}]"),
     "variants[0].search_space.lr", "low -1"),
    (BASE + "model: {match: params, param_budget: 1000}\nsearch_space: {hidden_size: {type: int, low: 8, high: 32}}\n",
     "search_space.hidden_size", "match: params"),
    # one cell per key
    (BASE.replace("seq_len: 10", "seq_len: [10, 10]"), "tasks[0].seq_len", "value 10 appears twice in the ladder"),
    (BASE.replace("seq_len: 10", "seq_len: [10, 10.0]"), "tasks[0].seq_len", "value 10.0 appears twice"),
    (BASE.replace("[{task: adding, seq_len: 10}]", "[{task: adding, seq_len: [5, 10]}, {task: adding, seq_len: 10}]"),
     "tasks[1]", "same task and settings as tasks[0]"),
    (BASE.replace("[{task: adding, seq_len: 10}]", "[{task: adding}, {task: adding, seq_len: 100}]"),
     "tasks[1]", "same task and settings as tasks[0]"),
])
def test_refused_at_load(tmp_path, text, field, words):
    message = error(tmp_path, text)
    assert f": {field}: " in message and words in message, message


@pytest.mark.parametrize("extra", [
    "objective: {metric: solved, direction: maximize}\n",
    "model: {num_layers: 2}\nsearch_space: {dropout: {type: float, low: 0.0, high: 0.6, step: 0.2}}\n",  # decimal steps are exact
    "search_space: {grad_clip: {type: categorical, choices: [null, 1.0]}}\n",
    "search_space: {hidden_size: {type: int, low: 8, high: 64, log: true}}\n",
    "model: {match: params, param_budget: 1000}\n",
])
def test_legal_edges_still_load(tmp_path, extra):
    specs.load(write(tmp_path, BASE + extra))


def test_clockwork_fits_at_every_width_it_may_get(tmp_path):
    ok = CLOCKWORK5 + "search_space: {hidden_size: {type: int, low: 20, high: 40, step: 5}}\n"
    specs.load(write(tmp_path, ok, "ok.yaml"))
    params = CLOCKWORK5 + "model: {match: params, param_budget: 2000}\n"
    specs.load(write(tmp_path, params, "params.yaml"))  # the width is derived per variant, a multiple of 5


def test_grid_may_take_fewer_trials_than_points(tmp_path):
    grid = BASE + "sampler: grid\ntrials: 2\nsearch_space: {batch_size: {type: categorical, choices: [8, 16, 32]}}\n"
    specs.load(write(tmp_path, grid))
    assert ": trials: 4 trials exceed the 3 points" in error(tmp_path, grid.replace("trials: 2", "trials: 4"))
    # a whole-study check names the override that broke it, not the file that did not
    path = write(tmp_path, grid, "grid.yaml")
    for override, words in (("trials=5", "--set trials=5: trials: 5 trials exceed the 3 points"),
                            ("variants=[rnn, rnn]", "--set variants=[rnn, rnn]: variants: label 'rnn' used twice")):
        with pytest.raises(specs.SpecError) as e:
            specs.load(path, [override])
        assert str(e.value).startswith(words), str(e.value)
    with pytest.raises(specs.SpecError, match=r"^--set sampler=grid: sampler: grid needs categorical search spaces; "
                                              r"search_space.lr is float"):
        specs.load(write(tmp_path, BASE + "search_space: {lr: {type: float, low: 1.0e-3, high: 1.0e-2}}\n"),
                   ["sampler=grid"])


def test_cli_version():
    from click.testing import CliRunner

    from rnnbench import cli
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == "rnnbench 0.1.0\n"


@pytest.mark.parametrize("exc, code", [(RuntimeError("boom"), 1), (KeyError("boom"), 1), (IndexError("boom"), 1),
                                       (LookupError("no study 'x'"), 2), (specs.SpecError("s.yaml: x: bad"), 2)])
def test_cli_internal_errors_show_the_traceback(monkeypatch, exc, code):
    from click.testing import CliRunner

    from rnnbench import cli

    def broken(*args, **kwargs):
        raise exc
    monkeypatch.setattr(specs, "load", broken)
    result = CliRunner().invoke(cli, ["status", "quickstart"])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    if code == 1:  # a bug: the traceback, then what to do with it
        assert lines[0].startswith("Traceback") and "boom" in lines[-2]
        assert lines[-1] == "rnnbench: internal error (a bug); please report it with the traceback above"
    else:
        assert lines == [f"error: {exc.args[0]}"]


@pytest.mark.parametrize("code, exit_code", [(30, 2), (13, 2), (28, 2), (20, 2), (2, 1)])  # EROFS EACCES ENOSPC
# ENOTDIR; ENOENT: a bug
def test_a_store_that_cannot_be_written_is_one_line(monkeypatch, code, exit_code):
    import os

    from click.testing import CliRunner

    from rnnbench import cli

    def unwritable(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/x/run.lock")
    monkeypatch.setattr(specs, "load", unwritable)
    result = CliRunner().invoke(cli, ["status", "quickstart"])
    assert result.exit_code == exit_code, result.output
    if exit_code == 2:
        assert result.stderr.splitlines() == [f"error: /x/run.lock: {os.strerror(code)} (a store, report or cache "
                                              "folder must be writable: check --root, --out)"]


def test_a_root_under_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    root = tmp_path / "notes.txt" / "runs"
    for command in (["run", "quickstart"], ["plan", "quickstart"]):
        proc = rnnbench(*command, "--root", root, check=False)
        assert proc.returncode == 2 and proc.stderr == (f"error: {root}: Not a directory (a store, report or cache "
                                                        "folder must be writable: check --root, --out)\n"), proc.stderr


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch):
    from click.testing import CliRunner

    from rnnbench import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(specs, "load", interrupted)
    result = CliRunner().invoke(cli, ["plan", "quickstart"])
    assert result.exit_code == 130 and result.stderr == "rnnbench plan: stopped\n"


# --- Greff's protocol: optimizer, momentum, Nesterov; switches in the search space -----------------------

def test_optimizer_momentum_and_nesterov(tmp_path):
    spec, _, _ = specs.load(write(tmp_path, BASE + "train: {optimizer: sgd, momentum: 0.9, nesterov: true}\n"))
    assert (spec.train.optimizer, spec.train.momentum, spec.train.nesterov) == ("sgd", 0.9, True)
    searched = BASE + ("train: {momentum: 0.5}\nsearch_space:\n  optimizer: {type: categorical, choices: [sgd, adam]}\n"
                       "  momentum: {type: float, low: 0.1, high: 0.99}\n")
    spec, _, _ = specs.load(write(tmp_path, searched, "searched.yaml"))
    assert [name for name, _ in specs.cells(spec)[0].search_space] == ["optimizer", "momentum"]


def test_a_trial_without_sgd_records_no_momentum(tmp_path):
    """A searched optimizer: an adam or rmsprop trial trains with no momentum, and says so (it logged the
    study's momentum, unused, before)."""
    import optuna

    from studies.worker import hyperparameters
    spec, _, _ = specs.load(write(tmp_path, BASE + "train: {momentum: 0.9, nesterov: true}\nsearch_space:\n"
                                  "  optimizer: {type: categorical, choices: [sgd, adam, rmsprop]}\n"))
    cell = specs.cells(spec)[0]
    used = {name: {k: hyperparameters(spec, cell, optuna.trial.FixedTrial({"optimizer": name}))[k]
                   for k in ("momentum", "nesterov")} for name in ("sgd", "adam", "rmsprop")}
    assert used == {"sgd": {"momentum": 0.9, "nesterov": True}, "adam": {"momentum": 0.0, "nesterov": False},
                    "rmsprop": {"momentum": 0.0, "nesterov": False}}


def test_a_trial_with_one_layer_records_no_dropout(tmp_path):
    """Searched depth and dropout: dropout acts between stacked layers, so a one-layer trial logs the 0 it
    trained with, and the importance table says that dropout's importance counts such trials too."""
    import optuna

    from reports.collect import _conditional
    from studies.worker import hyperparameters
    spec, _, _ = specs.load(write(tmp_path, BASE + "search_space:\n  num_layers: {type: int, low: 1, high: 2}\n"
                                  "  dropout: {type: float, low: 0.1, high: 0.3}\n"))
    cell = specs.cells(spec)[0]
    used = [hyperparameters(spec, cell, optuna.trial.FixedTrial({"num_layers": n, "dropout": 0.2}))["dropout"]
            for n in (1, 2)]
    assert used == [0.0, 0.2]
    assert "dropout acts only with num_layers of 2 or more" in _conditional("dropout", ["dropout", "num_layers"])
    assert _conditional("dropout", ["dropout", "lr"]) == _conditional("num_layers", ["dropout", "num_layers"]) == ""


@pytest.mark.parametrize("text, field, words", [
    (BASE + "train: {optimizer: adamw}\n", "train.optimizer", "'adam', 'sgd' or 'rmsprop'"),
    (BASE + "train: {nesterov: true, momentum: 0.9}\n", "train.nesterov", "for optimizer sgd; optimizer is adam"),
    (BASE + "train: {optimizer: sgd, nesterov: true}\n", "train.nesterov", "needs momentum > 0"),
    (BASE + "train: {momentum: 0.9}\n", "train.momentum", "for optimizer sgd"),
    (BASE + "train: {optimizer: sgd, momentum: 1.5}\n", "train.momentum", "less than 1"),
    (BASE + "search_space: {optimizer: {type: float, low: 0, high: 1}}\n", "search_space.optimizer",
     "takes type categorical"),
    (BASE + "search_space: {optimizer: {type: categorical, choices: [adam, adamw]}}\n", "search_space.optimizer",
     "choice 'adamw' is not a valid optimizer"),
    (BASE + "train: {optimizer: sgd}\nsearch_space: {nesterov: {type: categorical, choices: [true, false]}}\n",
     "search_space.nesterov", "needs momentum > 0"),
])
def test_bad_optimizer_settings_name_the_field(tmp_path, text, field, words):
    message = error(tmp_path, text)
    assert f": {field}" in message and words in message, message


LSTM_GRU = BASE.replace("[rnn]", "[lstm, gru]")


def test_switches_are_searchable(tmp_path):
    text = BASE.replace("[rnn]", "[lstm, peephole]") + (
        "search_space:\n  switches.forget_bias: {type: float, low: 0, high: 5}\n"
        "  switches.coupled: {type: categorical, choices: [true, false]}\n")
    spec, _, _ = specs.load(write(tmp_path, text))
    cell = specs.cells(spec)[1]
    assert dict(cell.search_space)["switches.forget_bias"].high == 5
    hp = {"lr": 0.01, "switches.forget_bias": 2.0, "switches.coupled": True}
    assert cell.switches(hp) == {"forget_bias": 2.0, "coupled": True}
    assert cell.variant.switches == {}  # the entry's own are untouched
    # per variant, where only that variant has the switch
    per_variant = LSTM_GRU.replace("[lstm, gru]", "[{variant: lstm, search_space: {switches.peephole: "
                                   "{type: categorical, choices: [true, false]}}}, gru]")
    spec, _, _ = specs.load(write(tmp_path, per_variant, "per_variant.yaml"))
    assert "switches.peephole" in dict(specs.cells(spec)[0].search_space)
    assert "switches.peephole" not in dict(specs.cells(spec)[1].search_space)


@pytest.mark.parametrize("text, field, words", [
    (LSTM_GRU + "search_space: {switches.forget_bias: {type: float, low: 0, high: 5}}\n",
     "search_space.switches.forget_bias", "variant 'gru' (gru) has no switch 'forget_bias'; "
                                          "searchable switches: switches.reset_after"),
    (BASE + "search_space: {switches.peephole: {type: float, low: 0, high: 1}}\n", "search_space.switches.peephole",
     "variant 'rnn' (rnn) has no switch 'peephole'; searchable switches: switches.identity_init, "
     "switches.nonlinearity"),
    (BASE.replace("[rnn]", "[lstm]") + "search_space: {switches.peephole: {type: float, low: 0, high: 1}}\n",
     "search_space.switches.peephole", "is a bool (default False); search it as type categorical"),
    (BASE.replace("[rnn]", "[{variant: lstm, switches: {forget_bias: 1.0}}]")
     + "search_space: {switches.forget_bias: {type: float, low: 0, high: 5}}\n", "search_space.switches.forget_bias",
     "also fixed in variants[0].switches"),
    # a drawn value the variant refuses: caught at load by building it
    (BASE.replace("[rnn]", "[nfg]") + "search_space: {switches.forget_bias: {type: float, low: 0, high: 5}}\n",
     "variants[0].switches", "forget_bias=5.0 from search_space.switches.forget_bias"),
    (BASE.replace("[rnn]", "[{variant: clockwork, search_space: {switches.modules: {type: int, low: 3, high: 4}}}]")
     + "model: {hidden_size: 8}\n", "variants[0].switches", "switches.modules=3"),
    (BASE + "search_space: {switches.: {type: float, low: 0, high: 1}}\n", "search_space",
     "unknown hyperparameter 'switches.'"),
])
def test_bad_switch_search_names_the_field(tmp_path, text, field, words):
    message = error(tmp_path, text)
    assert f": {field}" in message and words in message, message


def test_new_train_fields_keep_old_fingerprints(tmp_path):
    # The quickstart's fingerprints before optimizer/momentum/nesterov existed: a study prepared then resumes.
    spec, _, _ = specs.load("quickstart")
    assert [specs.cell_fingerprint(spec, c) for c in specs.cells(spec)] == [
        "65645f410bc94efb", "ad4c03fe6e46e4e1", "d7dc6f68de26c185", "13bedcd29819e1d0", "1ecab9157f203177",
        "765a984482b4ebc4"]
    a, _, _ = specs.load(write(tmp_path, BASE, "a.yaml"))
    b, _, _ = specs.load(write(tmp_path, BASE + "train: {optimizer: rmsprop}\n", "b.yaml"))
    assert specs.cell_fingerprint(a, specs.cells(a)[0]) != specs.cell_fingerprint(b, specs.cells(b)[0])


def test_overrides_apply_before_validation(tmp_path):
    """`--set KEY=VALUE`: YAML values at dotted paths (list indices too), validated like the file; the
    effective text (what is hashed, fingerprinted and stored) is the YAML they give, headed by them."""
    path = write(tmp_path, BASE)
    plain, _, plain_sha = specs.load(path)
    assert plain.text == path.read_text() and plain.overrides == ()  # no override: the file, as written
    sets = ("train.steps=200", "trials=4", "tasks[0].seq_len=[10, 20]", "search_space.lr={type: float, low: 0.001, "
            "high: 0.01}")
    spec, _, sha = specs.load(path, sets)
    assert spec.train.steps == 200 and spec.trials == 4 and spec.search_space["lr"].high == 0.01
    assert [c.key for c in specs.cells(spec)] == ["adding(seq_len=10)/rnn", "adding(seq_len=20)/rnn"]
    assert spec.overrides == sets and sha != plain_sha
    header, *rest = spec.text.splitlines()
    assert header == "# s.yaml with " + " ".join(f"--set {s}" for s in sets)
    reloaded, _, _ = specs.load(write(tmp_path, spec.text, "effective.yaml"))  # the text is the study
    assert reloaded.model_dump() == spec.model_dump()
    assert specs.cell_fingerprint(spec, specs.cells(spec)[0]) != specs.cell_fingerprint(plain, specs.cells(plain)[0])
    assert specs.load(path, ["trials=8"])[0].trials == 8  # the default, said out loud


def test_an_override_reaches_a_searched_switch(tmp_path):
    """A search space's `switches.NAME` holds a dot of its own: `--set` takes it as one key."""
    path = write(tmp_path, BASE.replace("[rnn]", "[peephole]") + "search_space:\n"
                 "  switches.forget_bias: {type: float, low: 0.0, high: 2.0}\n")
    spec = specs.load(path, ["search_space.switches.forget_bias.high=3"])[0]
    assert spec.search_space["switches.forget_bias"].high == 3 and spec.search_space["switches.forget_bias"].low == 0
    spec = specs.load(path, ["variants[0]={variant: peephole, search_space: {switches.forget_bias: "
                             "{type: float, low: 1, high: 2}}}",
                             "variants[0].search_space.switches.forget_bias.low=0.5"])[0]
    assert spec.variants[0].search_space["switches.forget_bias"].low == 0.5


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "--set train.stepz=3: train.stepz: unknown field"),
    ("trials=0", "--set trials=0: trials: Input should be greater than or equal to 1"),
    ("tasks[0].seq_len=1", "--set tasks[0].seq_len=1: tasks[0]: adding.seq_len: must be >= 2"),
    ("tasks[2].seq_len=5", "--set tasks[2].seq_len=5: tasks has 1 entries (indices from 0)"),
    ("variants[0]=lstn", "--set variants[0]=lstn: variants[0]: unknown variant 'lstn'"),
    ("search_space.lr.high=0.1", "--set search_space.lr.high=0.1: search_space.lr.type: Field required"),
    ("name.first=x", "--set name.first=x: name is not a mapping"),
    ("trials", "--set trials: expected KEY=VALUE"),
    ("train.steps=[1", "--set train.steps=[1: the value is not valid YAML"),
    ("a..b=1", "--set a..b=1: 'a..b' is not a field path"),
])
def test_override_errors_name_the_override(tmp_path, override, message):
    path = write(tmp_path, BASE)
    with pytest.raises(specs.SpecError) as e:
        specs.load(path, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(specs.SpecError) as e:  # an error the file makes still names the file
        specs.load(write(tmp_path, BASE + "trails: 3\n", "bad.yaml"), ["trials=3"])
    assert str(e.value).startswith(str(tmp_path / "bad.yaml"))


def test_cli_override_error_is_one_line(tmp_path):
    proc = rnnbench("plan", write(tmp_path, BASE), "--set", "train.stepz=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: --set train.stepz=3: train.stepz: unknown field\n"


def test_study_name_from_a_file_a_shipped_study_or_the_store(tmp_path):
    assert specs.study_name("quickstart") == "quickstart"
    assert specs.study_name(str(specs.shipped("quickstart"))) == "quickstart"
    assert specs.study_name(str(write(tmp_path, BASE.replace("name: t", "name: other")))) == "other"
    assert specs.study_name("only_in_the_store") == "only_in_the_store"
    with pytest.raises(specs.SpecError, match="no study 'name'"):
        specs.study_name(str(write(tmp_path, "tasks: []\n", "nameless.yaml")))
