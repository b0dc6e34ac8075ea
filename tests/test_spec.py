"""Study files: strict validation, one-line errors naming the file and the field; cells and ladders."""

import textwrap

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
    (BASE + "sampler: bayes\n", "sampler", "'tpe', 'random', 'grid' or 'qmc'"),
    (BASE + "search_space: {lr: {type: float, low: 1, high: 0.1}}\n", "search_space.lr", "above high"),
    (BASE + "search_space: {lr: {type: float, low: 0, high: 0.1, log: true}}\n", "search_space.lr", "low > 0"),
    (BASE + "search_space: {momentum: {type: float, low: 0, high: 1}}\n", "search_space", "unknown hyperparameter 'momentum'"),
    (BASE + "model: {match: params}\n", "model", "param_budget"),
    (BASE + "reference: gru\n", "reference", "not among the variants"),
    (BASE.replace("[rnn]", "[rnn, lstn]"), "variants[1]", "unknown variant 'lstn'"),
    (BASE.replace("[rnn]", "[{variant: lstm, switches: {peepholes: true}}]"), "variants[0]", "allowed:"),
    (BASE.replace("[rnn]", "[rnn, rnn]"), "variants", "used twice"),
    (BASE.replace("adding", "addition"), "tasks[0]", "unknown task 'addition'"),
    (BASE.replace("seq_len: 10", "lenght: 10"), "tasks[0]", "has no setting 'lenght'; allowed: seq_len"),
    (BASE.replace("seq_len: 10", "seq_len: 1"), "tasks[0]", "adding.seq_len"),
    (BASE.replace("seq_len: 10", "seq_len: [10, 0]"), "tasks[0]", "adding.seq_len"),
    (BASE.replace("seq_len: 10", "seq_len: []"), "tasks[0]", "at least one value"),
    (BASE.replace("{task: adding, seq_len: 10}", "{seq_len: 10}"), "tasks[0]", "missing 'task'"),
    (BASE.replace("name: t", "name: 'a b'"), "name", "pattern"),
])
def test_bad_spec_names_the_field(tmp_path, text, field, words):
    message = error(tmp_path, text)
    assert f": {field}" in message and words in message, message


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
