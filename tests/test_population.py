"""A population of P members equals P sequential ``train`` runs with the same seeds; members fail and leave alone.

Imports torch, tasks, variants and studies.training/population only (the GPU script runs it without optuna,
mlflow or pydantic installed).
"""

import math
import platform
import sys

import pytest
import torch

from studies.population import (Member, PopulationModel, PopulationSpec, benchmark_population,
                                format_population_table, keep_freed_memory, member_models, population_pays,
                                supports_population, train_population)
from studies.training import Divergence, SequenceModel, TrainConfig, gradient_by_lag, train
from tasks import build_task


# Every supported family and switch set; (task, variant, switches, num_layers).
CASES = [
    ("adding", "lstm", {}, 1),
    ("copy_memory", "lstm", {"forget_bias": 1.0}, 2),
    ("adding", "peephole", {}, 1),
    ("copy_memory", "peephole", {}, 2),
    ("adding", "cifg", {"forget_bias": 1.0}, 1),
    ("adding", "nig", {}, 1),
    ("adding", "nfg", {}, 1),
    ("adding", "nog", {}, 1),
    ("copy_memory", "niaf", {}, 1),
    ("adding", "noaf", {}, 1),
    ("adding", "fgr", {}, 1),
    ("adding", "lstm", {"coupled": True, "output_gate": False, "full_gate_recurrence": True}, 1),
    ("copy_memory", "gru", {}, 1),
    ("adding", "gru", {}, 2),
    ("adding", "gru_cho", {}, 1),
    ("copy_memory", "gru_cho", {}, 2),
    ("adding", "rnn", {}, 1),
    ("copy_memory", "rnn", {"nonlinearity": "relu"}, 1),
    ("adding", "depth_gated", {}, 1),
    ("copy_memory", "depth_gated", {"forget_bias": 1.0}, 2),
    ("adding", "clockwork", {}, 1),
    ("copy_memory", "clockwork", {"modules": 2}, 2),
    ("adding", "clockwork", {"periods": [1, 3, 4, 6]}, 1),  # t=4, 6: an idle module inside the active prefix
]
SETTINGS = {"adding": {"seq_len": 9}, "copy_memory": {"seq_len": 4, "n_copy": 2}}
# Learning rates and clips that differ: the clip of member 0 binds, member 2 is not clipped at all.
MEMBERS = [Member(seed=3, lr=1e-2, grad_clip=0.05), Member(seed=7, lr=3e-3, grad_clip=1.0, weight_decay=1e-2),
           Member(seed=11, lr=2e-2, grad_clip=None)]


def width(variant):
    """The hidden size the tests use: clockwork's must be a multiple of its (default 4) modules."""
    return 8 if variant == "clockwork" else 6


def sequential(task, spec, member, cfg, eval_batch, device="cpu"):
    torch.manual_seed(member.seed)  # as the engine builds a trial's model
    model = SequenceModel(task, spec.variant, spec.hidden_size, spec.num_layers, spec.dropout, spec.switches)
    one = TrainConfig(lr=member.lr, grad_clip=member.grad_clip, weight_decay=member.weight_decay,
                      steps=cfg.steps, eval_every=cfg.eval_every, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                      momentum=cfg.momentum)
    return model, train(task, model, one, eval_batch, member.seed, device=device)


def assert_same_runs(task, spec, cfg, members, device="cpu", rtol=1e-4, atol=1e-5):
    eval_batch = task.eval_batch(16, 0)
    results = train_population(task, spec, members, cfg, eval_batch, device=device)
    for member, got in zip(members, results):
        model, want = sequential(task, spec, member, cfg, eval_batch, device)
        assert got.error is None and got.steps == want.steps == cfg.steps
        assert [s for s, _ in got.history] == [s for s, _ in want.history]
        for (_, g), (_, w) in zip(got.history, want.history):
            assert g["loss"] == pytest.approx(w["loss"], rel=rtol)
        want_params = dict(model.named_parameters())
        for name, p in got.model.named_parameters():
            torch.testing.assert_close(p, want_params[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("steps", [1, 20])
@pytest.mark.parametrize("task_name, variant, switches, layers", CASES)
def test_population_equals_sequential_runs(task_name, variant, switches, layers, steps):
    task = build_task(task_name, **SETTINGS[task_name])
    spec = PopulationSpec(variant, switches, hidden_size=width(variant), num_layers=layers)
    assert supports_population(variant, switches, layers)
    assert_same_runs(task, spec, TrainConfig(steps=steps, eval_every=10, batch_size=5), MEMBERS)


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "rmsprop"])
def test_other_optimizers_equal_sequential_runs(optimizer):
    task = build_task("adding", seq_len=9)
    spec = PopulationSpec("peephole", hidden_size=6)
    lrs = [Member(m.seed, lr=m.lr * (10 if optimizer != "rmsprop" else 0.1), grad_clip=m.grad_clip,
                  weight_decay=m.weight_decay) for m in MEMBERS]
    assert_same_runs(task, spec, TrainConfig(steps=12, eval_every=6, batch_size=5, optimizer=optimizer,
                                                 momentum=0.9), lrs)


def test_variable_length_batches_are_padded_per_member():
    task = build_task("embedded_reber")  # strings of different lengths: each member's batch has its own width
    assert_same_runs(task, PopulationSpec("gru_cho", hidden_size=6), TrainConfig(steps=5, eval_every=5, batch_size=4),
                     MEMBERS[:2])


@pytest.mark.parametrize("variant", ["peephole", "depth_gated", "clockwork"])
def test_a_diverging_member_fails_alone(variant):
    task = build_task("adding", seq_len=9)
    spec = PopulationSpec(variant, hidden_size=width(variant))
    members = [Member(seed=1, lr=1e-2), Member(seed=2, lr=1e30, grad_clip=None), Member(seed=3, lr=1e-2)]
    cfg = TrainConfig(steps=20, eval_every=10, batch_size=5)
    results = train_population(task, spec, members, cfg, task.eval_batch(16, 0))
    bad = results[1]
    assert isinstance(bad.error, Divergence) and bad.steps == 10 and bad.history == []
    assert "at step 2" in str(bad.error)
    for r in (results[0], results[2]):
        assert r.error is None and r.steps == 20 and math.isfinite(r.metrics["loss"])
    # the survivors are unaffected: they equal their sequential runs
    assert_same_runs(task, spec, cfg, [members[0], members[2]])


def test_a_pruned_member_leaves_and_the_others_go_on():
    task = build_task("copy_memory", seq_len=4, n_copy=2)
    seen = []

    class Pruned(Exception):  # optuna.TrialPruned, without optuna
        pass

    def on_eval(member, step, metrics):
        seen.append((member, step))
        if member == 0 and step == 4:
            raise Pruned()
        if member == 2 and step == 8:
            raise KeyError("stop")

    members = [Member(seed=s, lr=1e-2) for s in range(4)]
    results = train_population(task, PopulationSpec("lstm", hidden_size=6), members,
                               TrainConfig(steps=12, eval_every=4, batch_size=5), task.eval_batch(16, 0), on_eval)
    assert sorted(seen) == sorted([(0, 4), (1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (3, 8), (1, 12), (3, 12)])
    assert isinstance(results[0].error, Pruned) and results[0].steps == 4
    assert isinstance(results[2].error, KeyError) and results[2].steps == 8
    assert [r.steps for r in (results[1], results[3])] == [12, 12]
    # the population's time is shared out among the members training in each stretch: no second counted twice
    assert sum(r.own_seconds for r in results) == pytest.approx(max(r.seconds for r in results), rel=1e-9)
    assert results[0].own_seconds < results[2].own_seconds < results[1].own_seconds < results[1].seconds
    # a member that stays after another left still equals its sequential run
    eval_batch = task.eval_batch(16, 0)
    model, want = sequential(task, PopulationSpec("lstm", hidden_size=6), members[3],
                             TrainConfig(steps=12, eval_every=4, batch_size=5), eval_batch)
    assert results[3].metrics["loss"] == pytest.approx(want.metrics["loss"], rel=1e-4)


def test_member_model_gives_each_member_back():
    task = build_task("adding", seq_len=9)
    spec = PopulationSpec("cifg", hidden_size=6)
    models = member_models(task, spec, [4, 5])
    pop = PopulationModel(models)
    batch = task.eval_batch(8, 0)
    for i, model in enumerate(models):
        member = pop.member_model(i)
        assert gradient_by_lag(task, member, batch) == pytest.approx(gradient_by_lag(task, model, batch), rel=1e-5)
    pop.keep([1])
    assert pop.size == 1
    torch.testing.assert_close(pop(batch.x.unsqueeze(0))[0], models[1](batch.x))


def test_unsupported_configurations_are_reported():
    assert supports_population("peephole", {"coupled": True})
    assert supports_population("clockwork") and supports_population("depth_gated", {}, num_layers=2)
    assert supports_population("clockwork", {"modules": 3}) and supports_population("clockwork", {"periods": [1, 3]})
    assert not supports_population("clockwork", {"modules": 0}) and not supports_population("lstm", {"modules": 2})
    assert not supports_population("lstm", {}, num_layers=2, dropout=0.1)  # dropout masks come from the global RNG
    with pytest.raises(ValueError, match="no population form"):
        train_population(build_task("adding", seq_len=5), PopulationSpec("depth_gated", num_layers=2, dropout=0.1),
                         [Member(0)], TrainConfig(steps=1), build_task("adding", seq_len=5).eval_batch(4, 0))


def test_a_users_cell_derived_from_a_shipped_one_trains_one_by_one():
    """Its own forward is not the shipped walk's equations: a population would train the parent's."""
    from variants import VARIANTS, register
    from variants.gru import GRU

    class Forgetful(GRU):
        def forward(self, x, state=None):
            out, h = super().forward(x, state)
            return out * 0, h * 0

    register("forgetful_gru", description="test", paper="-")(Forgetful)
    try:
        assert not supports_population("forgetful_gru") and not population_pays("forgetful_gru", {}, 16, "cpu")
        assert supports_population("gru") and supports_population("gru_cho")
    finally:
        del VARIANTS["forgetful_gru"]


def test_population_pays_rule():
    assert population_pays("peephole", {}, 32, "cpu") and population_pays("gru_cho", {}, 64, "cpu")
    assert population_pays("rnn", {}, 32, "cpu") and population_pays("gru", {}, 64, "cpu")
    assert population_pays("peephole", {}, 128, "cpu") and population_pays("nig", {}, 128, "cpu")
    assert not population_pays("peephole", {}, 256, "cpu") and not population_pays("gru", {}, 128, "cpu")
    assert population_pays("fgr", {}, 64, "cpu") and not population_pays("fgr", {}, 128, "cpu")
    assert not population_pays("lstm", {}, 32, "cpu")  # the fused kernel
    assert not population_pays("lstm", {}, 128, "cuda") and not population_pays("gru", {}, 32, "cuda")  # cuDNN
    assert not population_pays("rnn", {}, 32, "cuda") and population_pays("peephole", {}, 256, "cuda")
    assert population_pays("depth_gated", {}, 32, "cpu") and not population_pays("depth_gated", {}, 64, "cpu")
    assert population_pays("clockwork", {"modules": 3}, 126, "cpu") and not population_pays("clockwork", {}, 256, "cpu")
    assert population_pays("clockwork", {}, 32, "cuda")


@pytest.mark.parametrize("variant, layers", [("peephole", 1), ("fgr", 1), ("cifg", 2), ("gru_cho", 1),
                                             ("depth_gated", 2), ("clockwork", 1)])
def test_a_members_numbers_do_not_depend_on_its_companions(variant, layers):
    """Bit for bit, for populations of two or more (the engine groups runs by timing: studies/worker.py)."""
    task = build_task("copy_memory", seq_len=4, n_copy=2)
    spec = PopulationSpec(variant, hidden_size=width(variant), num_layers=layers)
    members = [Member(seed=s, lr=1e-2) for s in (3, 7, 11, 13)]
    cfg = TrainConfig(steps=6, eval_every=3, batch_size=5)
    runs = [train_population(task, spec, [members[i] for i in group], cfg, task.eval_batch(16, 0))[0]
            for group in ((0, 1), (0, 1, 2), (0, 2, 3, 1))]
    for r in runs[1:]:
        assert r.history == runs[0].history
        for p, q in zip(r.model.parameters(), runs[0].model.parameters()):
            assert torch.equal(p, q)


def test_keep_freed_memory_keeps_a_freed_buffers_pages():
    """Where glibc's mallopt is there it is applied; then a 64 MB buffer allocated again after its free reuses
    pages already faulted in (counted, not timed). Without the setting glibc serves it with a fresh mmap each
    time: every round faults all its pages. The first rounds may fault while the freed space coalesces."""
    first = keep_freed_memory()
    assert isinstance(first, bool) and keep_freed_memory() == first
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        assert not first
        return
    assert first
    import resource  # Unix only

    n = 1 << 24  # floats: 64 MB
    pages = 4 * n // resource.getpagesize()
    rounds = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = torch.ones(n)  # every page touched
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del buffer
    assert min(rounds) < pages // 10, f"minor faults per round: {rounds}, {pages} pages each"


def test_benchmark_rows_carry_the_spread_over_rounds():
    threads = torch.get_num_threads()
    try:
        rows = benchmark_population(["peephole", "fgr"], hidden_sizes=(4,), sizes=(2,), batch=2, seq_len=3,
                                    warmup=0, repeats=3)
    finally:
        torch.set_num_threads(threads)
    assert [(r["family"], r["members"]) for r in rows] == [("peephole", 2), ("fgr", 2)]
    for r in rows:
        assert r["clock"] == "cpu" and 0 < r["speedup_lo"] <= r["speedup"] <= r["speedup_hi"]
    assert "(" in format_population_table(rows).splitlines()[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["lstm", "peephole", "fgr", "gru", "gru_cho", "rnn", "depth_gated", "clockwork"])
def test_population_on_cuda_equals_sequential_runs_on_cpu(variant):
    task = build_task("copy_memory", seq_len=4, n_copy=2)
    spec = PopulationSpec(variant, hidden_size=width(variant))
    cfg = TrainConfig(steps=20, eval_every=10, batch_size=5)
    eval_batch = task.eval_batch(16, 0)
    results = train_population(task, spec, MEMBERS, cfg, eval_batch, device="cuda")
    for member, got in zip(MEMBERS, results):
        model, want = sequential(task, spec, member, cfg, eval_batch, "cpu")
        assert got.metrics["loss"] == pytest.approx(want.metrics["loss"], rel=1e-3)
        for name, p in got.model.named_parameters():
            torch.testing.assert_close(p.cpu(), dict(model.named_parameters())[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("switches", [{}, {"peephole": True}, {"peephole": True, "coupled": True},
                                      {"peephole": True, "full_gate_recurrence": True},
                                      {"input_gate": False, "output_activation": False, "peephole": True},
                                      {"forget_gate": False, "output_gate": False, "input_activation": False}])
def test_fused_lstm_recurrence_equals_autograd_on_the_loop(switches):
    """The hand-written backward (_LSTMRecurrence) against its slow twin, autograd on the plain equations."""
    task = build_task("adding", seq_len=7)
    pop = PopulationModel(member_models(task, PopulationSpec("lstm", switches, hidden_size=5, num_layers=2), [0, 1, 2]))
    x = torch.randn(3, 4, 7, 2, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(3, 4, 7, 1, generator=torch.Generator().manual_seed(1))
    runs = []
    for fused in (True, False):
        pop.fused = fused
        pop.zero_grad(set_to_none=True)
        out = pop(x)
        (out * weights).sum().backward()
        runs.append([out.detach()] + [p.grad.clone() for p in pop.parameters()])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_population_size_builds_the_members_configuration_only_where_a_population_is_allowed():
    from studies.population import AUTO_POPULATION, population_size

    def member():
        raise AssertionError("built although no population is allowed")
    assert population_size("off", "replicate", set(), member, "cpu") == 1
    assert population_size("auto", "search", {"lr", "hidden_size"}, member, "cpu") == 1  # a shape is searched
    small = PopulationSpec("peephole", {}, hidden_size=8)
    assert population_size("auto", "search", {"lr", "grad_clip"}, lambda: small, "cpu") == AUTO_POPULATION
    assert population_size(3, "replicate", set(), lambda: small, "cpu") == 3


def _floor_benchmark():
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" / "population_floor.py"))


def test_the_floor_split_puts_each_op_in_its_category():
    """``split`` on steps of known ops: a category none of the step's ops belongs to is exactly 0, and where a
    step also records cheap helper ops (an allocation, mm's resolve_conj) its own op's category is the largest;
    no timing thresholds."""
    split = _floor_benchmark()["split"]
    a, b = torch.randn(128, 128), torch.randn(128, 128)

    def mm():
        torch.mm(a, b)  # aten::mm, plus aten::resolve_conj (no arithmetic for real tensors: bookkeeping)

    def sigmoid():
        torch.sigmoid(a)

    def views():
        for _ in range(20):  # aten::view, t, transpose, select, unsqueeze, as_strided: bookkeeping
            a.view(-1), a.t(), a.transpose(0, 1), a[0], a.unsqueeze(0)

    got = split(mm)  # 4 Mflop against a no-op (and whatever allocation a torch version records)
    assert max(got, key=got.get) == "matmul", got
    got = split(sigmoid)
    assert max(got, key=got.get) == "elementwise" and got["matmul"] == 0.0, got
    got = split(views)
    assert got["overhead"] > 0 and got["matmul"] == 0.0 and got["elementwise"] == 0.0, got
    got = split(lambda: (mm(), sigmoid(), views()))
    assert min(got.values()) > 0, got


def test_the_floor_benchmark_prints_a_row_of_shares_that_sum_to_the_step(capsys):
    """main's output: the profiled shares rescaled to the unprofiled step (what split puts where is tested above)."""
    floor = _floor_benchmark()
    threads = torch.get_num_threads()
    try:
        floor["main"](["--families", "clockwork", "--hidden", "4", "--members", "2", "--repeats", "1", "--batch", "4",
                       "--seq-len", "20"])
    finally:
        torch.set_num_threads(threads)
    row = capsys.readouterr().out.splitlines()[-1].strip("| ").split(" | ")
    assert row[:2] == ["clockwork", "4"]
    one, per, matmul, elementwise, overhead = (float(row[i]) for i in (2, 3, 5, 6, 7))
    assert one > 0 and per > 0 and min(matmul, elementwise, overhead) >= 0  # tiny shapes: a share may round to 0.0
    assert math.isclose(matmul + elementwise + overhead, per, rel_tol=0.02, abs_tol=0.15)  # shares of the step
