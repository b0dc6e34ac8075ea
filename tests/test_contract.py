"""The contracts themselves (variants/contract.py, tasks/contract.py): each rule catches the defect it names;
the user examples (examples/) pass; user modules import by path or name; ``rnnbench check``.

The shipped variants and tasks are checked in test_variants.py and test_tasks.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasks
import variants
from tasks import TASKS, Batch
from tasks.adding import Adding
from tasks.contract import assert_contract as assert_task_contract
from tasks.contract import check as check_task
from variants import VARIANTS, build_variant
from variants.contract import assert_contract as assert_variant_contract
from variants.contract import check as check_variant
from variants.imports import UserModuleError, import_user_modules

from conftest import rnnbench

torch.set_flush_denormal(True)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def failed(results) -> dict[str, str]:
    return {r.name: r.reason for r in results if not r.passed}


# ---------------------------------------------------------------------------------------------------------
# Variants: a correct cell, then one defect per rule.
# ---------------------------------------------------------------------------------------------------------

class Elman(nn.Module):
    """Correct: torch's RNN, batch first."""

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)

    def forward(self, x, state=None):
        return self.rnn(x, state)


class TimeFirst(Elman):
    """The classic layout mistake: a time-first RNN fed batch-first input (the shapes still fit)."""

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.rnn.batch_first = False


class IgnoresState(Elman):
    def forward(self, x, state=None):
        return self.rnn(x)


class UnusedParameter(Elman):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.weight_unused = nn.Parameter(torch.ones(3))


class SwallowsSwitches(Elman):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, **switches):
        super().__init__(input_size, hidden_size, num_layers, dropout)


class RestartsItsClock(Elman):
    """Adds the step index to the input, counting from 0 at every call, without ``clocked`` and ``t0``."""

    def forward(self, x, state=None):
        return self.rnn(x + 0.1 * torch.arange(x.shape[1])[:, None], state)


class Unseeded(Elman):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        with torch.no_grad():
            self.rnn.bias_ih_l0 += random.random()  # Python's RNG: torch.manual_seed does not reach it


class DropoutWithinALayer(Elman):
    def forward(self, x, state=None):
        out, h = self.rnn(x, state)
        return F.dropout(out, self.rnn.dropout, self.training), h


class Overflows(Elman):
    """Its output is inf where the input is large (a missing clamp before an exp, say)."""

    def forward(self, x, state=None):
        out, h = self.rnn(x, state)
        return out * torch.exp(80 * x.abs().amax(-1, keepdim=True)), h


class _Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad  # wrong: the identity's gradient is grad


class WrongBackward(Elman):
    def forward(self, x, state=None):
        return self.rnn(_Doubled.apply(x), state)


@pytest.mark.parametrize("cls,rule", [
    (TimeFirst, "batch-first"), (IgnoresState, "state"), (UnusedParameter, "gradients"),
    (SwallowsSwitches, "constructor"), (SwallowsSwitches, "unknown switch"), (RestartsItsClock, "chunked calls"),
    (Unseeded, "seeded"), (DropoutWithinALayer, "dropout"), (WrongBackward, "gradcheck"), (Overflows, "finite"),
])
def test_variant_contract_catches(registries, cls, rule):
    name = f"broken_{cls.__name__.lower()}"
    variants.register(name, description="broken on purpose", paper="-")(cls)
    problems = failed(check_variant(name))
    assert rule in problems and problems[rule], problems


def test_variant_contract_passes_a_correct_cell_and_names_the_failure(registries):
    variants.register("correct_elman", description="torch's RNN", paper="-")(Elman)
    assert_variant_contract("correct_elman")
    variants.register("broken_time_first", description="broken on purpose", paper="-")(TimeFirst)
    with pytest.raises(AssertionError, match=r"batch-first: permuting the batch"):
        assert_variant_contract("broken_time_first")


def test_variant_contract_reports_what_does_not_build():
    results = check_variant("lstm", peepholes=True)
    assert [r.name for r in results] == ["constructor"] and "allowed: " in results[0].reason
    with pytest.raises(ValueError, match="unknown variant"):
        check_variant("no_such_variant")


# ---------------------------------------------------------------------------------------------------------
# Tasks: one defect per rule, on top of the adding problem.
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WrongBaseline(Adding):
    name = "broken_wrong_baseline"

    @property
    def baseline(self):
        return 1 / 12  # the best memoryless predictor (the mean) scores 1/6


@dataclasses.dataclass(frozen=True)
class InertKnob(Adding):
    name = "broken_inert_knob"
    noise: float = 0.1  # validated, never used

    def __post_init__(self):
        super().__post_init__()
        self.check_real("noise", 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class IgnoresGenerator(Adding):
    name = "broken_ignores_generator"

    def sample(self, batch_size, generator, device="cpu"):
        return super().sample(batch_size, torch.Generator().manual_seed(random.getrandbits(32)), device)


@dataclasses.dataclass(frozen=True)
class Unvalidated(Adding):
    name = "broken_unvalidated"
    scale: float = 1.0  # used, but a string or a bool passes

    def sample(self, batch_size, generator, device="cpu"):
        b = super().sample(batch_size, generator, device)
        return Batch(b.x * self.scale, b.y * self.scale)


@dataclasses.dataclass(frozen=True)
class SolvedWithoutMemory(Adding):
    name = "broken_solved_without_memory"

    @property
    def solved_when(self):
        return ("loss", "<", 1.0)


@dataclasses.dataclass(frozen=True)
class TimeFirstBatches(Adding):
    name = "broken_time_first_batches"

    def sample(self, batch_size, generator, device="cpu"):
        b = super().sample(batch_size, generator, device)
        return Batch(b.x.transpose(0, 1), b.y)


@dataclasses.dataclass(frozen=True)
class MisnamedLadder(Adding):
    name = "broken_misnamed_ladder"
    ladder = "length"  # a typo for seq_len: a study would sweep a setting that does not exist


@pytest.mark.parametrize("cls,rule", [
    (WrongBaseline, "baseline"), (InertKnob, "settings change the data"), (IgnoresGenerator, "seeds"),
    (Unvalidated, "impossible settings"), (SolvedWithoutMemory, "baseline"), (TimeFirstBatches, "batch layout"),
    (MisnamedLadder, "declarations"),
])
def test_task_contract_catches(registries, cls, rule):
    tasks.register(cls)
    problems = failed(check_task(cls.name, seq_len=10))
    assert rule in problems and problems[rule], problems


def test_task_contract_reasons(registries):
    for cls in (WrongBaseline, InertKnob, SolvedWithoutMemory):
        tasks.register(cls)
    assert "stated 0.08333, but the best memoryless predictor scores 0.16" in failed(
        check_task("broken_wrong_baseline", seq_len=10))["baseline"]
    assert "does not depend on noise (tried 0.15, 0.05" in failed(
        check_task("broken_inert_knob", seq_len=10))["settings change the data"]
    with pytest.raises(AssertionError, match="counts as solved"):
        assert_task_contract("broken_solved_without_memory", seq_len=10)
    tasks.register(MisnamedLadder)  # only the declarations rule can see a ladder that names no setting
    assert failed(check_task("broken_misnamed_ladder", seq_len=10)) == {
        "declarations": "ladder 'length' is not a setting"}


def test_the_settings_check_tries_each_nearby_value_once():
    from tasks.contract import _others
    assert _others(0.5) == [0.75, 0.25, 1.5, -0.5]  # (0.5 + 1) / 2 is 0.5 * 1.5: once
    assert _others(2) == [3, 1, 4] and _others(0) == [1, -1, 2] and _others(True) == [False]


def test_task_contract_reports_impossible_settings():
    results = check_task("adding", seq_len=1)
    assert [r.name for r in results] == ["settings"] and "adding.seq_len" in results[0].reason
    with pytest.raises(tasks.TaskSettingError, match="unknown task"):
        check_task("no_such_task")


# ---------------------------------------------------------------------------------------------------------
# The worked examples: a cell and a task from outside the package.
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def examples(registries):
    return import_user_modules(["examples/mingru.py", "examples/delayed_xor.py"], ROOT)


def test_examples_keep_the_contracts(examples):
    assert_variant_contract("mingru")
    assert_task_contract("delayed_xor")
    assert_task_contract("delayed_xor", seq_len=20, lag=3, p_one=0.3)


def test_mingru_scan_equals_its_loop(examples):
    torch.manual_seed(0)
    m = build_variant("mingru", 3, 6, num_layers=2)
    x = torch.randn(4, 37, 3, requires_grad=True)  # 37: not a power of two
    h0 = torch.randn(2, 4, 6, requires_grad=True)
    results = []
    for parallel in (True, False):
        m.parallel = parallel
        out, h = m(x, h0)
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum() + h.sum()
        results.append([out, h, *torch.autograd.grad(loss, [x, h0, *m.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mingru_follows_the_paper_equations(examples):
    torch.manual_seed(0)
    m = build_variant("mingru", 3, 5)
    x, h = torch.randn(2, 6, 3), torch.randn(1, 2, 5)
    out, _ = m(x, h)
    W_z, W_h = m.weight_ih_l0.split(5)
    b_z, b_h = m.bias_ih_l0.split(5)
    h = h[0]
    for t in range(6):
        z = torch.sigmoid(x[:, t] @ W_z.T + b_z)
        h = (1 - z) * h + z * (x[:, t] @ W_h.T + b_h)
        torch.testing.assert_close(out[:, t], h)


def test_delayed_xor_data_and_baseline(examples):
    task = tasks.build_task("delayed_xor", seq_len=12, lag=3, p_one=0.3)
    b = task.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(b.y[:, 3:], b.x[:, 3:] ^ b.x[:, :-3]) and not b.mask[:, :3].any() and b.mask[:, 3:].all()
    assert task.baseline == pytest.approx(-0.3 * math.log(0.3) - 0.7 * math.log(0.7))
    assert tasks.build_task("delayed_xor").baseline == pytest.approx(math.log(2))
    with pytest.raises(tasks.TaskSettingError, match="delayed_xor.seq_len"):
        tasks.build_task("delayed_xor", seq_len=8, lag=8)


# ---------------------------------------------------------------------------------------------------------
# Importing user modules.
# ---------------------------------------------------------------------------------------------------------

def test_import_by_path_or_name_once(registries):
    digest = hashlib.sha256((EXAMPLES / "mingru.py").read_bytes()).hexdigest()
    assert import_user_modules(["examples/mingru.py"], ROOT) == {"examples/mingru.py": digest}
    assert "mingru" in VARIANTS
    # the same file again, by path or by dotted name: no second import, so no "registered twice"
    assert import_user_modules(["examples/mingru.py", "examples.mingru"], ROOT) == {
        "examples/mingru.py": digest, "examples.mingru": digest}
    assert import_user_modules(["examples.delayed_xor"], ROOT)["examples.delayed_xor"] == \
        hashlib.sha256((EXAMPLES / "delayed_xor.py").read_bytes()).hexdigest()
    assert "delayed_xor" in TASKS


def test_a_failed_import_is_one_line_naming_module_and_exception(registries, tmp_path):
    (tmp_path / "broken_plugin.py").write_text("import variants\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(UserModuleError) as e:
        import_user_modules(["broken_plugin.py"], tmp_path)
    assert str(e.value) == "broken_plugin.py: RuntimeError: no GPU here"
    assert "broken_plugin" not in sys.modules
    with pytest.raises(UserModuleError, match="no_such_module: ModuleNotFoundError"):
        import_user_modules(["no_such_module"], tmp_path)
    with pytest.raises(UserModuleError, match="missing.py: no such file"):
        import_user_modules(["missing.py"], tmp_path)


def test_a_module_importing_its_neighbour_is_told_to_list_it(registries, tmp_path):
    """Only listed modules are hashed into a study's definition: a neighbour found implicitly could change
    unseen, so it must be listed, before the module that imports it."""
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "base_cells.py").write_text("SCALE = 2\n")
    (tmp_path / "lab" / "my_cells.py").write_text("from base_cells import SCALE\n")
    with pytest.raises(UserModuleError) as e:
        import_user_modules(["lab/my_cells.py"], tmp_path)
    assert str(e.value) == ("lab/my_cells.py: imports 'base_cells' from its own folder: list lab/base_cells.py too, "
                            "before it (in the study file's imports, or a second --imports), so that an edit to it "
                            "counts as a change of the study")
    assert set(import_user_modules(["lab/base_cells.py", "lab/my_cells.py"], tmp_path)) == {"lab/base_cells.py",
                                                                                            "lab/my_cells.py"}


# ---------------------------------------------------------------------------------------------------------
# rnnbench check
# ---------------------------------------------------------------------------------------------------------

def test_check_command_passes_the_examples():
    out = rnnbench("check", "variant", "mingru", "--imports", "examples/mingru.py", cwd=ROOT).stdout
    assert "gradcheck" in out and "10/10 checks passed" in out
    out = rnnbench("check", "task", "delayed_xor", "--imports", "examples.delayed_xor", "--set", "lag=3",
                   "--set", "p_one=0.3", cwd=ROOT).stdout
    assert "task delayed_xor lag=3 p_one=0.3" in out and "7/7 checks passed" in out


def test_check_command_fails_a_broken_cell_and_a_broken_import(tmp_path):
    (tmp_path / "my_cell.py").write_text(textwrap.dedent("""\
        from torch import nn
        import variants

        @variants.register("ignores_state", description="forgets its state", paper="-")
        class IgnoresState(nn.Module):
            def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
                super().__init__()
                self.rnn = nn.RNN(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)

            def forward(self, x, state=None):
                return self.rnn(x)
        """))
    proc = rnnbench("check", "variant", "ignores_state", "--imports", "my_cell.py", cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL" in proc.stdout and "random initial state" in proc.stdout and "8/10 checks passed" in proc.stdout
    (tmp_path / "typo.py").write_text("import variants\nvariants.regster('x')\n")
    proc = rnnbench("check", "variant", "x", "--imports", "typo.py", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --imports typo.py: AttributeError: module 'variants' has no attribute 'regster'"]


@pytest.mark.parametrize("args, message", [
    (["task", "delayed_xor", "--imports", "examples.delayed_xor", "--set", "lagg=4"],
     "error: task 'delayed_xor' has no setting 'lagg'; allowed: seq_len, lag, p_one"),
    (["variant", "lstm", "--switch", "peepholes=true"], "error: variant 'lstm' has no switch 'peepholes'; allowed: "),
    (["variant", "mingru"], "error: unknown variant 'mingru'; known: "),
])
def test_check_command_says_a_users_typo_in_one_line(args, message):
    proc = rnnbench("check", *args, cwd=ROOT, check=False)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith(message), proc.stderr
    assert proc.stderr.count("\n") == 1 and ("--imports" in proc.stderr) == (args[1] == "mingru")
