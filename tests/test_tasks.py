"""Fast task tests: the task rules (tasks/contract.py: layout, seeds, knobs, settings, baselines against
memoryless predictors) for every task, and what is particular to each: exact formats, baseline formulas.

Training runs live in ``test_tasks_sanity.py``.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tasks import TASKS, Batch, TaskSettingError, build_task
from tasks.contract import assert_contract, same
from tasks.embedded_reber import SYMBOLS, EmbeddedReber

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted(TASKS)
EXPECTED = {"copy_memory", "adding", "adding_1997", "temporal_order", "embedded_reber", "selective_copy",
            "associative_recall"}

# Small settings per task: the contract runs at these (and at CONTRACT_CASES below).
SMALL = {
    "copy_memory": dict(seq_len=10, n_copy=3, n_symbols=4),
    "adding": dict(seq_len=20),
    "adding_1997": dict(seq_len=20),
    "temporal_order": dict(seq_len=20, n_relevant=2),
    "embedded_reber": dict(p_loop=0.5),
    "selective_copy": dict(seq_len=16, n_copy=2, vocab=6),
    "associative_recall": dict(seq_len=16, n_pairs=2, n_queries=2, vocab=16, power_a=0.01),
}
SEEDS = range(20)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small(name: str, **changes):
    return build_task(name, **{**SMALL[name], **changes})


def batches(task, size=64, seeds=SEEDS):
    for s in seeds:
        yield task.sample(size, gen(s))


# --- registry and the task rules -----------------------------------------------------------------------

def test_every_task_is_registered():
    assert EXPECTED <= set(TASKS)
    assert set(SMALL) == set(TASKS), "give every task small settings in SMALL"


@pytest.mark.parametrize("name", ALL)
def test_docstring_defines_baseline_and_solved(name):
    cls = TASKS[name]
    doc = sys.modules[cls.__module__].__doc__
    assert re.search(r"baseline", doc, re.I) and re.search(r"solved", doc, re.I)
    assert cls().baseline > 0  # the defaults are valid settings


# Settings whose baseline formula differs from SMALL's: each is checked against memoryless predictors.
CONTRACT_CASES = [(name, SMALL[name]) for name in ALL] + [
    ("copy_memory", dict(seq_len=30, n_copy=5, n_symbols=6)),
    ("adding_1997", dict(seq_len=100)),
    ("temporal_order", dict(seq_len=20, n_relevant=3)),
    ("embedded_reber", dict(p_loop=0.9)),
    ("selective_copy", dict(seq_len=16, n_copy=2, vocab=10)),
    # odd V: V - V//2 values (9), not V//2 (8); ln 9 and ln 8 differ by 5%, beyond the 2% tolerance
    ("associative_recall", dict(seq_len=16, n_pairs=2, n_queries=2, vocab=17)),
]


@pytest.mark.parametrize("name,settings", CONTRACT_CASES,
                         ids=[f"{n}-" + "-".join(f"{k}={v}" for k, v in s.items()) for n, s in CONTRACT_CASES])
def test_contract(name, settings):
    """Layout, seeds, every knob changes the data, wrong types refused, baseline = best memoryless loss."""
    assert_contract(name, **settings)


# --- seeds and settings -----------------------------------------------------------------------------

def test_eval_batch_is_the_same_in_a_fresh_interpreter():
    code = ("import torch; from tasks import build_task; "
            "b = build_task('temporal_order', seq_len=20).eval_batch(16, seed=3); "
            "print(int((b.x * torch.arange(b.x.numel()).view_as(b.x)).sum()), int(b.y.sum()))")
    here = build_task("temporal_order", seq_len=20).eval_batch(16, seed=3)
    expect = f"{int((here.x * torch.arange(here.x.numel()).view_as(here.x)).sum())} {int(here.y.sum())}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == expect


def test_int_and_float_spellings_of_a_real_knob_are_one_setting():
    a, b = small("associative_recall", power_a=1), small("associative_recall", power_a=1.0)
    assert a.settings() == b.settings() and isinstance(a.power_a, float)
    assert same(a.eval_batch(16, seed=0), b.eval_batch(16, seed=0))


# --- settings that cannot work (wrong types and unknown settings: the contract) -------------------------

IMPOSSIBLE = [
    ("copy_memory", dict(seq_len=0), "seq_len"),
    ("copy_memory", dict(n_copy=0), "n_copy"),
    ("copy_memory", dict(n_symbols=1), "n_symbols"),
    ("adding", dict(seq_len=1), "seq_len"),
    ("adding_1997", dict(seq_len=19), "seq_len"),
    ("temporal_order", dict(seq_len=19), "seq_len"),
    ("temporal_order", dict(n_relevant=4), "n_relevant"),
    ("temporal_order", dict(n_relevant=1), "n_relevant"),
    ("embedded_reber", dict(p_loop=1.0), "p_loop"),
    ("embedded_reber", dict(p_loop=0), "p_loop"),
    ("embedded_reber", dict(p_loop=-0.2), "p_loop"),
    ("selective_copy", dict(n_copy=17), "n_copy"),
    ("selective_copy", dict(vocab=3), "vocab"),
    ("selective_copy", dict(seq_len=0), "seq_len"),
    ("associative_recall", dict(vocab=6, n_pairs=3, n_queries=3, seq_len=16), "vocab"),
    ("associative_recall", dict(n_queries=3), "n_queries"),
    ("associative_recall", dict(n_queries=0), "n_queries"),
    ("associative_recall", dict(seq_len=7), "seq_len"),
    ("associative_recall", dict(power_a=0.0), "power_a"),
]


@pytest.mark.parametrize("name,changes,field", IMPOSSIBLE)
def test_impossible_settings_are_rejected_naming_the_field(name, changes, field):
    with pytest.raises(TaskSettingError, match=re.escape(f"{name}.{field}")):
        small(name, **changes)


def test_boundary_settings_are_accepted():
    small("adding_1997", seq_len=20)
    small("temporal_order", seq_len=20, n_relevant=3)
    small("selective_copy", n_copy=16)  # no noise at all: plain copying
    small("associative_recall", seq_len=8)  # 2 pairs + 2 queries exactly fill 8 steps
    small("associative_recall", vocab=6, n_pairs=2, n_queries=2)  # keys 1, 2; values 3, 4, 5


# --- exact formats -----------------------------------------------------------------------------------

def test_copy_memory_format():
    T, K, A = 10, 3, 4
    task = small("copy_memory")
    for b in batches(task):
        x, y = b.x, b.y
        assert x.shape == (64, T + 2 * K)
        assert ((1 <= x[:, :K]) & (x[:, :K] <= A)).all()
        assert (x[:, K:T + K - 1] == 0).all() and (x[:, T + K - 1] == A + 1).all() and (x[:, T + K:] == 0).all()
        assert (y[:, :T + K] == 0).all() and torch.equal(y[:, T + K:], x[:, :K])
    data = torch.cat([b.x[:, :K] for b in batches(task)])
    assert set(data.unique().tolist()) == set(range(1, A + 1))


def test_adding_format():
    T = 20
    task = small("adding")
    firsts, seconds = [], []
    for b in batches(task):
        values, marker = b.x[..., 0], b.x[..., 1]
        assert ((0 <= values) & (values < 1)).all()
        assert ((marker == 0) | (marker == 1)).all() and (marker.sum(1) == 2).all()
        assert (marker[:, :T // 2].sum(1) == 1).all() and (marker[:, T // 2:].sum(1) == 1).all()
        assert torch.allclose(b.y[:, 0], (values * marker).sum(1))
        firsts.append(marker[:, :T // 2].argmax(1))
        seconds.append(marker[:, T // 2:].argmax(1) + T // 2)
    assert set(torch.cat(firsts).tolist()) == set(range(T // 2))
    assert set(torch.cat(seconds).tolist()) == set(range(T // 2, T))


@pytest.mark.parametrize("T", [20, 41, 100])
def test_adding_1997_format(T):
    task = small("adding_1997", seq_len=T)
    lengths, marks, first_pair_marked, n = [], [], 0, 0
    for b in batches(task):
        values, marker, rows = b.x[..., 0], b.x[..., 1], torch.arange(64)
        assert b.x.shape[1] == T + T // 10
        assert (b.mask.sum(1) == 1).all()
        length = b.mask.long().argmax(1) + 1
        assert ((T <= length) & (length <= T + T // 10)).all()
        pad = torch.arange(b.x.shape[1]) >= length[:, None]
        assert (values[pad] == 0).all() and (marker[pad] == 0).all()
        assert ((-1 <= values) & (values <= 1)).all()
        assert ((marker == 1).sum(1) == 2).all() and ((marker == 1) & pad).sum() == 0
        pos = (marker == 1).nonzero()[:, 1].view(64, 2)  # sorted per row
        assert (pos[:, 0] < 10).all() and (pos[:, 1] < T // 2).all()  # one in the first 10, both in the first T//2
        assert (marker[rows, length - 1] == -1).all()
        assert torch.where(pos[:, 0] == 0, marker[:, 0] == 1, marker[:, 0] == -1).all()
        assert ((marker == 0) | (marker == 1) | (marker == -1)).all()
        assert ((marker == -1).sum(1) == 2 - (pos[:, 0] == 0).long()).all()  # first and final pair only
        assert (values[pos[:, 0] == 0, 0] == 0).all()  # the first-pair rule
        target = 0.5 + (values * (marker == 1)).sum(1) / 4
        assert torch.allclose(b.y[b.mask][:, 0], target)
        assert (b.y[~b.mask] == 0).all()
        lengths.append(length)
        marks.append(pos)
        first_pair_marked += (pos[:, 0] == 0).sum().item()
        n += 64
    assert set(torch.cat(lengths).tolist()) == set(range(T, T + T // 10 + 1))
    assert set(torch.cat(marks).flatten().tolist()) == set(range(T // 2))
    # P(first pair marked) = 1/10 + (9/10) / (T//2 - 1): the second mark avoids the first, in the first T//2
    p = 0.1 + 0.9 / (T // 2 - 1)
    assert abs(first_pair_marked / n - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("n_relevant", [2, 3])
@pytest.mark.parametrize("L", [20, 100, 157])
def test_temporal_order_format(n_relevant, L):
    task = small("temporal_order", seq_len=L, n_relevant=n_relevant)
    if L == 100:  # the paper's windows, 1-based
        assert task.windows() == ([(10, 20), (50, 60)] if n_relevant == 2 else [(10, 20), (33, 43), (66, 76)])
    windows = task.windows()
    seen = [set() for _ in windows]
    classes, lengths = [], []
    for b in batches(task):
        x, rows = b.x, torch.arange(64)
        length = b.mask.long().argmax(1) + 1
        assert (b.mask.sum(1) == 1).all() and ((L <= length) & (length <= L + L // 10)).all()
        assert (x[:, 0] == 6).all() and (x[rows, length - 1] == 7).all()
        steps = torch.arange(x.shape[1])
        assert ((x == 8) == (steps >= length[:, None])).all()
        inner = (steps > 0) & (steps < length[:, None] - 1)
        xy = (x == 4) | (x == 5)
        assert (xy.sum(1) == n_relevant).all() and ((x[inner & ~xy] >= 0) & (x[inner & ~xy] <= 3)).all()
        pos = xy.nonzero()[:, 1].view(64, n_relevant) + 1  # 1-based, sorted
        label = torch.zeros(64, dtype=torch.long)
        for i, (lo, hi) in enumerate(windows):
            assert ((lo <= pos[:, i]) & (pos[:, i] <= hi)).all()
            seen[i] |= set(pos[:, i].tolist())
            label = 2 * label + (x[rows, pos[:, i] - 1] == 5).long()
        assert torch.equal(b.y[b.mask], label)
        classes.append(label)
        lengths.append(length)
    assert all(s == set(range(lo, hi + 1)) for s, (lo, hi) in zip(seen, windows))
    assert set(torch.cat(classes).tolist()) == set(range(2 ** n_relevant))
    assert set(torch.cat(lengths).tolist()) == set(range(L, L + L // 10 + 1))


# An independent statement of the grammar: paths from node 2 of the Reber graph to the end,
# R2 = T*V (PXT*V)* (V|PS); from node 1, S*X(S|X R2); Reber = B(T R1 | P R2)E; embedded B m Reber m E.
_R2 = "T*V(?:PXT*V)*(?:V|PS)"
REBER = f"B(?:TS*X(?:S|X{_R2})|P{_R2})E"
EMBEDDED = re.compile(f"B([TP]){REBER}\\1E")


@pytest.mark.parametrize("p_loop", [0.5, 0.9])
def test_embedded_reber_strings_follow_the_grammar(p_loop):
    task = small("embedded_reber", p_loop=p_loop)
    lengths = []
    for b in batches(task, size=128, seeds=range(10)):
        n = b.mask.sum(1)
        assert ((b.x == 7) == ~b.mask).all() and (b.y[~b.mask] == 0).all()  # padding after the string only
        assert torch.equal(b.x[:, 1:][b.mask[:, 1:]], b.y[:, :-1][b.mask[:, 1:]])  # y is x shifted
        for r in range(b.x.shape[0]):
            string = "".join(SYMBOLS[s] for s in b.x[r, :n[r]].tolist()) + SYMBOLS[b.y[r, n[r] - 1]]
            assert EMBEDDED.fullmatch(string), string
        lengths.append(n + 1)
    mean = torch.cat(lengths).double().mean().item()
    assert abs(mean - task.mean_length) < 0.03 * task.mean_length


def test_embedded_reber_legal_sets_by_hand():
    x = torch.tensor([[SYMBOLS.index(c) for c in "BPBPTVPXVVEP"]])  # string BPBPTVPXVVEPE, minus the last E
    legal = EmbeddedReber.legal_next(x)[0]
    expect = ["TP", "B", "TP", "TV", "TV", "PV", "XS", "TV", "PV", "E", "P", "E"]
    assert ["".join(SYMBOLS[i] for i in row.nonzero()[:, 0].tolist()) for row in legal] == \
        ["".join(sorted(e, key=SYMBOLS.index)) for e in expect]


def test_embedded_reber_metrics_score_legal_sets():
    task = small("embedded_reber")
    b = task.sample(64, gen(0))
    legal = task.legal_next(b.x)
    oracle = torch.where(legal, 0.0, -10.0)  # legal symbols tie at the top
    m = task.metrics(oracle, b)
    assert m["step_acc"] == m["string_acc"] == m["lag_acc"] == m["solved"] == 1.0
    # rank one illegal symbol above a legal one at the first step of string 0 only
    spoiled = oracle.clone()
    spoiled[0, 0, SYMBOLS.index("E")] = 1.0
    m = task.metrics(spoiled, b)
    assert m["string_acc"] == 63 / 64 and m["solved"] == 0.0 and m["lag_acc"] == 1.0
    # forget the lag: put the wrong T/P first at the step that predicts the second m
    wrong = oracle.clone()
    n = b.mask.sum(1)
    rows = torch.arange(64)
    m_sym = b.x[:, 1]
    wrong[rows, n - 2, 3 - m_sym] = 1.0  # T=1 <-> P=2
    m = task.metrics(wrong, b)
    assert m["lag_acc"] == 0.0 and m["string_acc"] == 0.0


def test_selective_copy_format():
    N, K, A = 16, 2, 6
    task = small("selective_copy")
    positions = []
    for b in batches(task):
        x, y = b.x, b.y
        assert x.shape == (64, N + K) and (x[:, N:] == A - 1).all()
        data = x[:, :N]
        assert ((data != 0).sum(1) == K).all() and ((data >= 0) & (data <= A - 2)).all()
        in_order = data[data != 0].view(64, K)  # row-major: each row's data tokens in order
        assert torch.equal(y[:, N:], in_order) and (y[:, :N] == 0).all()
        assert (b.mask[:, N:]).all() and not b.mask[:, :N].any()
        positions.append((data != 0).nonzero()[:, 1])
    assert set(torch.cat(positions).tolist()) == set(range(N))


@pytest.mark.parametrize("settings", [{}, dict(seq_len=24, n_pairs=3, n_queries=2, vocab=24)])
def test_associative_recall_format(settings):
    task = small("associative_recall", **settings)
    L, P, Q, V = task.seq_len, task.n_pairs, task.n_queries, task.vocab
    gaps = []
    for b in batches(task):
        x, y = b.x, b.y
        keys, values = x[:, 0:2 * P:2], x[:, 1:2 * P:2]
        assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
        assert (keys.sort(1).values.diff(1) > 0).all() and (values.sort(1).values.diff(1) > 0).all()
        assert (b.mask.sum(1) == Q).all() and not b.mask[:, :2 * P].any()
        assert (y[~b.mask] == 0).all()
        steps = b.mask.nonzero()[:, 1].view(-1, Q)
        assert ((steps - 2 * P) % 2 == 0).all()
        queried = x[b.mask].view(-1, Q)
        assert (queried.sort(1).values.diff(1) > 0).all()  # distinct keys
        match = queried[:, :, None] == keys[:, None, :]  # (B, Q, P)
        assert (match.sum(2) == 1).all()
        paired = (match.long() * values[:, None, :]).sum(2)
        assert torch.equal(y[b.mask].view(-1, Q), paired)
        gaps.append((steps - 2 * P) // 2)
    gaps = torch.cat(gaps).flatten()
    space = (L - 2 * P) // 2
    assert gaps.max() < space and set(gaps.tolist()) == set(range(space))
    # power_a = 0.01: weights ~ 1/(g+1), so gap 0 is far more frequent than the last gap
    assert (gaps == 0).sum() > 2 * (gaps == space - 1).sum()


def test_associative_recall_queries_a_uniform_subset_of_pairs():
    task = small("associative_recall", seq_len=24, n_pairs=4, n_queries=1, vocab=24)
    b = task.sample(20000, gen(0))
    keys = b.x[:, 0:8:2]
    which = (keys == b.x[b.mask][:, None]).long().argmax(1)  # which pair was asked
    freq = torch.bincount(which, minlength=4).double() / 20000
    assert (freq - 0.25).abs().max() < 0.02


# --- baselines: the formulas' values (test_contract checks each against memoryless predictors) ---------

def test_baseline_values():
    assert small("copy_memory", seq_len=30, n_copy=5, n_symbols=6).baseline == pytest.approx(5 * math.log(6) / 40)
    assert build_task("copy_memory").baseline == pytest.approx(0.1733, abs=1e-4)
    assert small("adding").baseline == 1 / 6
    baseline_1997 = small("adding_1997", seq_len=100).baseline
    assert baseline_1997 == pytest.approx(0.039201, abs=1e-6)
    assert abs(baseline_1997 - 1 / 24) > 0.03 * baseline_1997  # the first-pair rule shows, beyond the tolerance
    for n_relevant in (2, 3):
        assert small("temporal_order", n_relevant=n_relevant).baseline == pytest.approx(n_relevant * math.log(2))
    assert EmbeddedReber(p_loop=0.5).baseline == pytest.approx(1.2718, abs=1e-4)
    assert EmbeddedReber(p_loop=0.5).mean_length == pytest.approx(12.0)
    assert small("selective_copy", vocab=10).baseline == pytest.approx(math.log(8))
    assert small("associative_recall", vocab=16).baseline == pytest.approx(math.log(8))
    assert small("associative_recall", vocab=17).baseline == pytest.approx(math.log(9))  # values V//2..V-1


# --- solved(): an oracle solves (that the memoryless predictor does not: test_contract) -----------------

def oracle(task, b: Batch) -> torch.Tensor:
    B, T = b.x.shape[:2]
    if isinstance(task, EmbeddedReber):
        return torch.where(task.legal_next(b.x), 0.0, -10.0)
    if task.output_kind == "real":
        y = b.y if task.readout != "last" else b.y[:, None].expand(B, T, -1)
        return y.clone()
    y = b.y if task.readout != "last" else b.y[:, None].expand(B, T)
    return F.one_hot(y, task.output_size).float() * 10


@pytest.mark.parametrize("name", ALL)
def test_oracle_solves(name):
    task = small(name)
    b = task.eval_batch(256, seed=0)
    good = task.metrics(oracle(task, b), b)
    assert good["solved"] == 1.0
    if name != "embedded_reber":  # there the oracle still pays the grammar's own randomness
        assert good["loss"] < 0.01 * task.baseline


# --- the metrics the solved criteria read, and the definitions the other tests take from the task itself -------

def _class_outputs(batch, n_classes, p_true):
    """Logits, at every step, giving the target class probability ``p_true`` (the others share the rest)."""
    a = math.log(p_true * (n_classes - 1) / (1 - p_true))
    return torch.nn.functional.one_hot(batch.y, n_classes).float() * a


@pytest.mark.parametrize("p_true, correct", [(0.71, 1.0), (0.69, 0.0)])
def test_temporal_order_is_correct_when_every_output_is_within_0_3_of_one_hot(p_true, correct):
    task = small("temporal_order", seq_len=20)  # Hochreiter & Schmidhuber 1997: |error| < 0.3 on every output
    b = task.sample(16, gen(0))
    assert task.metrics(_class_outputs(b, task.output_size, p_true), b)["seq_acc"] == correct


@pytest.mark.parametrize("error, correct", [(0.039, 1.0), (-0.039, 1.0), (0.041, 0.0)])
def test_adding_1997_is_correct_within_0_04(error, correct):
    task = small("adding_1997", seq_len=20)
    b = task.sample(16, gen(0))
    assert task.metrics(b.y + error, b)["seq_acc"] == correct


def test_copy_memory_recall_reads_the_last_n_copy_steps_only():
    task = small("copy_memory", seq_len=12, n_copy=4)
    b = task.sample(16, gen(0))
    n_classes = task.output_size
    right = torch.nn.functional.one_hot(b.y, n_classes).float()
    wrong_before = right.clone()
    wrong_before[:, :-4] = torch.nn.functional.one_hot((b.y[:, :-4] + 1) % n_classes, n_classes).float()
    assert task.metrics(wrong_before, b)["recall_acc"] == 1.0
    one_wrong = right.clone()
    one_wrong[:, -4] = torch.nn.functional.one_hot((b.y[:, -4] + 1) % n_classes, n_classes).float()
    assert task.metrics(one_wrong, b)["recall_acc"] == pytest.approx(3 / 4)


def test_temporal_order_windows_round_half_up_at_any_length():
    # 1-based bounds b * L / 100: at L = 25, 10 -> 2.5 -> 3, 20 -> 5, 50 -> 12.5 -> 13, 60 -> 15
    assert small("temporal_order", seq_len=25, n_relevant=2).windows() == [(3, 5), (13, 15)]
    assert small("temporal_order", seq_len=30, n_relevant=3).windows() == [(3, 6), (10, 13), (20, 23)]


def test_embedded_reber_loops_lengthen_the_strings_as_stated():
    lengths = {p: EmbeddedReber(p_loop=p).mean_length for p in (0.5, 0.8, 0.9, 0.95)}
    assert lengths == pytest.approx({0.5: 12.0, 0.8: 16.5, 0.9: 24.0, 0.95: 39.0})  # the docstring's table


def test_associative_recall_noise_spans_the_whole_vocabulary():
    task = small("associative_recall", seq_len=32, n_pairs=4, n_queries=2, vocab=16)
    noise = []
    for b in batches(task):
        region = torch.arange(b.x.shape[1]) >= 2 * 4  # the query region; query steps carry the mask
        noise.append(b.x[region & ~b.mask])
    noise = torch.cat(noise)
    assert set(noise.tolist()) == set(range(16))  # keys' half and values' half alike (Zoology)


def test_adding_reading_the_last_input_beats_the_constant_as_the_docstring_says():
    task = small("adding", seq_len=20)
    b = task.sample(200_000, gen(0))
    last = b.x[:, -1]  # (value, marker) at the readout step: the second mark lands there w.p. 1 / (T - T//2)
    pred = torch.where(last[:, 1] == 1, 0.5 + last[:, 0], torch.ones(len(last)))[:, None]
    mse = ((pred - b.y) ** 2).mean().item()
    expected = 1 / 6 - 1 / (12 * (20 - 10))  # 0.1583
    assert abs(mse - expected) < 0.003 and expected < task.baseline
