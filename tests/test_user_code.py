"""A user's own cell and task in a study (``imports:``): end to end through `rnnbench run` and `report` with
examples/mingru_vs_lstm.yaml made tiny; and what goes wrong with user code: a module that does not import,
a typo in an imported name, a cell that raises. Each is one clear error, and nothing is written."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from conftest import rnnbench
from studies import spec as specs
from variants import build_variant, count_parameters, hidden_for_param_budget

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def tiny_example(folder: Path) -> Path:
    """examples/mingru_vs_lstm.yaml with its modules, in ``folder``, with test-sized numbers; LSTM also searches
    its forget bias and every variant the optimizer (Greff's protocol, in small)."""
    for name in ("mingru.py", "delayed_xor.py"):
        shutil.copy(EXAMPLES / name, folder / name)
    study = yaml.safe_load((EXAMPLES / "mingru_vs_lstm.yaml").read_text())
    assert study["imports"] == ["mingru.py", "delayed_xor.py"] and "mingru" in study["variants"]
    study.update(name="mingru_tiny", tasks=[{"task": "delayed_xor", "seq_len": 8, "lag": 2},
                                            {"task": "adding", "seq_len": 8}],
                 model={"hidden_size": 8}, train={"steps": 20, "eval_every": 10, "eval_size": 32, "batch_size": 8},
                 trials=2, replicates=1)
    study["search_space"]["optimizer"] = {"type": "categorical", "choices": ["adam", "rmsprop"]}
    study["variants"] = [v if v != "lstm" else {"variant": "lstm", "search_space": {
        "switches.forget_bias": {"type": "float", "low": 0.0, "high": 2.0}}} for v in study["variants"]]
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.mark.slow
def test_example_study_runs_and_reports_the_user_cell(tmp_path):
    spec_path = tiny_example(tmp_path)
    rnnbench("run", spec_path, "--root", tmp_path / "runs")
    out = rnnbench("report", "mingru_tiny", "--root", tmp_path / "runs").stdout
    report = tmp_path / "runs" / "reports" / "mingru_tiny"
    assert "report:" in out and (report / "index.html").exists()
    results = pd.read_parquet(report / "results.parquet")
    assert set(results["variant"]) == {"mingru", "lstm", "gru"}
    assert set(results["task"]) == {"delayed_xor", "adding"}
    assert (results["state"] == "COMPLETE").all(), results[["variant", "task", "state"]]
    summary = pd.read_csv(report / "summary.csv")
    assert "mingru" in set(summary["variant"])
    assert "mingru" in (report / "index.html").read_text()
    # the searched switch reached the model (logged as switch.forget_bias), the optimizer was searched
    lstm = results[results["variant"] == "lstm"]
    assert lstm["param.switch.forget_bias"].astype(float).between(0, 2).all()
    assert set(results["param.optimizer"]) <= {"adam", "rmsprop"}

    # every trial run carries the SHA-256 of each module the study file imports
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(results["run_id"].iloc[0])
    for name in ("mingru.py", "delayed_xor.py"):
        assert run.data.tags[f"rnnbench.import.{name}"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_editing_an_imported_cell_changes_its_cells_only(tmp_path, registries):
    (tmp_path / "my_cell_fp.py").write_text((EXAMPLES / "mingru.py").read_text().replace('"mingru"', '"my_cell_fp"'))
    study = tmp_path / "s.yaml"
    study.write_text("name: t\nimports: [my_cell_fp.py]\ntasks: [{task: adding, seq_len: 8}]\n"
                     "variants: [my_cell_fp, lstm]\n")
    spec, _, _ = specs.load(study)
    assert spec.imported == {"my_cell_fp.py": hashlib.sha256((tmp_path / "my_cell_fp.py").read_bytes()).hexdigest()}
    before = [specs.cell_fingerprint(spec, c) for c in specs.cells(spec)]
    (tmp_path / "my_cell_fp.py").write_text((tmp_path / "my_cell_fp.py").read_text() + "\n# edited\n")
    spec, _, _ = specs.load(study)
    after = [specs.cell_fingerprint(spec, c) for c in specs.cells(spec)]
    assert before[0] != after[0] and before[1] == after[1]


def test_a_study_whose_imported_cell_was_edited_is_refused_naming_the_file(tmp_path, registries):
    from studies import queue
    (tmp_path / "my_cell_ed.py").write_text((EXAMPLES / "mingru.py").read_text().replace('"mingru"', '"my_cell_ed"'))
    study = tmp_path / "s.yaml"
    study.write_text("name: t\nimports: [my_cell_ed.py]\ntasks: [{task: adding, seq_len: 8}]\n"
                     "variants: [lstm, my_cell_ed]\n")
    storage = optuna.storages.InMemoryStorage()
    queue.prepare_studies(specs.load(study)[0], storage)
    assert queue.check_fingerprints(specs.load(study)[0], storage)  # unchanged: prepared as defined
    (tmp_path / "my_cell_ed.py").write_text((tmp_path / "my_cell_ed.py").read_text() + "\n# edited\n")
    with pytest.raises(queue.StudyChanged) as e:
        queue.check_fingerprints(specs.load(study)[0], storage)
    assert str(e.value).startswith("study 't', cell adding(seq_len=8)/my_cell_ed: my_cell_ed.py (imported by the "
                                   "study file) changed since the study was prepared"), str(e.value)


def test_status_shows_a_study_whose_imported_cell_was_edited_with_a_note(tmp_path):
    """`run` refuses to add trials of an edited cell to those of the old one; `status` only reads them, so it
    says what changed and shows the table."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from studies import queue
    (tmp_path / "my_cell_st.py").write_text((EXAMPLES / "mingru.py").read_text().replace('"mingru"', '"my_cell_st"'))
    study = tmp_path / "s.yaml"
    study.write_text("name: t\nimports: [my_cell_st.py]\ntasks: [{task: adding, seq_len: 8}]\n"
                     "variants: [my_cell_st, lstm]\ntrials: 2\n")  # the edited cell is checked first
    (tmp_path / "runs").mkdir()
    journal = JournalFileBackend(str(tmp_path / "runs" / "optuna.journal"))
    queue.prepare_studies(specs.load(study)[0], JournalStorage(journal))
    (tmp_path / "my_cell_st.py").write_text((tmp_path / "my_cell_st.py").read_text() + "\n# edited\n")
    proc = rnnbench("status", study, "--root", tmp_path / "runs")
    assert proc.stderr == ("note: study 't', cell adding(seq_len=8)/my_cell_st: my_cell_st.py (imported by the study "
                           "file) changed since the study was prepared; the table counts the trials run with the "
                           "earlier version (`rnnbench run` refuses to add to them)\n"), proc.stderr
    assert "adding(seq_len=8)/my_cell_st" in proc.stdout and "0/14 trials ended" in proc.stdout, proc.stdout
    # the module and the cell's definition changed: not a note, the refusal any changed definition gets
    proc = rnnbench("status", study, "--root", tmp_path / "runs", "--set", "train.steps=7", check=False)
    assert proc.returncode == 2 and "cell adding(seq_len=8)/my_cell_st: the study file changed this cell's " \
        "definition" in proc.stderr and "note:" not in proc.stderr, proc.stderr


def _cell(name: str, forward: str) -> str:
    """A user's cell module registering ``name`` (one Linear layer) whose forward body is ``forward``."""
    return textwrap.dedent("""\
        import torch
        from torch import nn
        import variants

        @variants.register("{name}", description="broken", paper="none")
        class Cell(nn.Module):
            def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
                super().__init__()
                self.w = nn.Linear(input_size, hidden_size)

            def forward(self, x, state=None):
                {forward}
        """).format(name=name, forward=forward)


BROKEN = {
    "import_fails": ("broken_cell.py", "import variants\nraise RuntimeError('needs a GPU')\n", "[broken_cell, lstm]",
                     "imports: broken_cell.py: RuntimeError: needs a GPU"),
    "missing_file": ("other.py", "", "[lstm]", "imports: broken_cell.py: no such file"),
    "typo_in_variant": ("typo_cell.py", (EXAMPLES / "mingru.py").read_text().replace('"mingru"', '"typo_cell"'),
                        "[typo_cel, lstm]", "variants[0]: unknown variant 'typo_cel'; known: "),
    "raises_in_forward": ("raising_cell.py", _cell("raising_cell", 'raise RuntimeError("shapes do not match")'),
                          "[raising_cell, lstm]",
                          "variants[0]: variant 'raising_cell' fails on a (2, 8, 2) batch with hidden_size=64: "
                          "RuntimeError: shapes do not match"),
    "nan_output": ("nan_cell.py", _cell("nan_cell", 'out = self.w(x) * float("nan")\n'
                                                   '        return out, out[:, -1].unsqueeze(0)'),
                   "[nan_cell, lstm]",
                   "variants[0]: variant 'nan_cell' fails on a (2, 8, 2) batch with hidden_size=64: "
                   "ValueError: output is not finite (NaN or inf) at initialisation"),
    "raises_in_init": ("init_cell.py", _cell("init_cell", "pass").replace(
        "super().__init__()", "super().__init__()\n        raise RuntimeError('needs a GPU')"), "[init_cell, lstm]",
        "variants[0]: variant 'init_cell' fails to build: RuntimeError: needs a GPU (hidden_size=64 from "
        "model.hidden_size, num_layers=1, dropout=0.0)"),
    "init_without_dropout": ("nodrop_cell.py", _cell("nodrop_cell", "pass").replace(", dropout=0.0):", "):"),
                             "[nodrop_cell, lstm]", "variants[0]: Cell.__init__() got an unexpected keyword "
                             "argument 'dropout' (hidden_size=64 from model.hidden_size"),
    "task_raises": ("bad_task.py", (EXAMPLES / "delayed_xor.py").read_text().replace('"delayed_xor"', '"bad_task"')
                    .replace("        k = self.lag\n", "        raise RuntimeError('sample broke')\n", 1), "[lstm]",
                    "tasks[0]: task 'bad_task' (seq_len=8, lag=2, p_one=0.5) fails on a two-sequence batch: "
                    "RuntimeError: sample broke; `rnnbench check task bad_task` runs every check"),
}


def broken_study(tmp_path: Path, case: str) -> Path:
    module, source, variants_, _ = BROKEN[case]
    (tmp_path / module).write_text(source)
    imported = "broken_cell.py" if case == "missing_file" else module
    path = tmp_path / f"{case}.yaml"
    task = "{task: bad_task, seq_len: 8, lag: 2}" if case == "task_raises" else "{task: adding, seq_len: 8}"
    path.write_text(f"name: t\nimports: [{imported}]\ntasks: [{task}]\nvariants: {variants_}\n")
    return path


@pytest.mark.parametrize("case", BROKEN)
def test_user_code_errors_are_one_line_at_load(tmp_path, registries, case):
    path = broken_study(tmp_path, case)
    with pytest.raises(specs.SpecError) as e:
        specs.load(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: {BROKEN[case][3]}"), message
    if case == "typo_in_variant":
        assert "typo_cell" in message  # the imported names are among those listed


def test_a_cell_whose_constructor_reads_a_value_loads_and_sizes_by_parameters(tmp_path, registries):
    """The load check builds cells for their shapes on the meta device, whose tensors hold no values: a
    constructor that reads one (here, scaling W_hh to a spectral radius) is built on the CPU instead."""
    forward = "out = torch.tanh(self.w(x))\n        return out, out[:, -1].unsqueeze(0)"
    source = _cell("spectral_cell", forward).replace("super().__init__()\n", (
        "super().__init__()\n        w = torch.randn(hidden_size, hidden_size)\n"
        "        self.w_hh = nn.Parameter(w * (0.9 / torch.linalg.eigvals(w).abs().max().item()))\n"
        "        self.w_hh.data.mul_(float(self.w_hh.detach().numpy().std() > 0))\n"))  # and through NumPy
    (tmp_path / "spectral_cell.py").write_text(source)
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nimports: [spectral_cell.py]\ntasks: [{task: adding, seq_len: 8}]\n"
                    "variants: [spectral_cell]\nmodel: {match: params, param_budget: 400}\n")
    specs.load(path)  # builds it at every size the bisection tries
    def count(h):  # on the CPU: the cell and the adding task's one-output head
        return count_parameters(build_variant("spectral_cell", 2, h)) + h + 1
    hidden = hidden_for_param_budget("spectral_cell", 2, 400, output_size=1)
    assert hidden == min(range(1, 40), key=lambda h: (abs(count(h) - 400), h)) == 18


def test_cli_refuses_broken_user_code_and_writes_nothing(tmp_path):
    for case in ("import_fails", "raises_in_forward", "task_raises"):
        path = broken_study(tmp_path, case)
        proc = rnnbench("run", path, "--root", tmp_path / "runs", check=False)
        stderr = proc.stderr.strip()
        assert proc.returncode == 2 and "\n" not in stderr, stderr
        assert stderr.startswith(f"error: {path}: {BROKEN[case][3]}"), stderr
        assert not (tmp_path / "runs").exists()
    # --debug adds the traceback inside the user's module
    proc = rnnbench("--debug", "run", broken_study(tmp_path, "import_fails"), "--root", tmp_path / "runs", check=False)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and 'broken_cell.py", line 2' in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_list_variants_with_imports():
    out = rnnbench("list", "variants", "--imports", "examples/mingru.py", cwd=ROOT).stdout
    assert "mingru" in out and "Feng et al. 2024" in out and "lstm" in out
    proc = rnnbench("list", "tasks", "--imports", "examples/no_such.py", cwd=ROOT, check=False)
    assert proc.returncode == 2 and "error: --imports examples/no_such.py: no such file" in proc.stderr
