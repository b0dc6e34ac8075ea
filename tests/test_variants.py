"""Every variant proven against its equations (its module docstring, its paper) or against torch's own modules.

The reference implementations below are written from the papers' equations, one gate at a time, with
autograd: they share no code with variants/. Comparisons cover outputs, final states and the gradients of
the input and of every parameter.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from variants import (VARIANTS, build_variant, check_switches, count_parameters, get_variant, register,
                      hidden_for_param_budget, shapes_only)
from variants.bench import benchmark, format_table
from variants.contract import assert_contract

torch.set_flush_denormal(True)
ATOL, RTOL = 2e-5, 1e-4
LSTM_FAMILY = ["lstm", "peephole", "greff", "cifg", "coupled", "nig", "nfg", "nog", "niaf", "noaf", "np", "fgr"]


def _state_like(m, batch, make):
    """The structure and shapes of m's state (found by running one step from None), filled by make(shape)."""
    dtype = next(m.parameters()).dtype
    with torch.no_grad():
        _, st = m(torch.zeros(batch, 1, m.input_size, dtype=dtype))
    if isinstance(st, tuple):
        return tuple(make(s.shape, dtype) for s in st)
    return make(st.shape, dtype)


def random_state(m, batch):
    return _state_like(m, batch, lambda shape, dtype: 0.5 * torch.randn(shape, dtype=dtype))


def flat(state):
    return list(state) if isinstance(state, tuple) else [state]


# ---------------------------------------------------------------------------------------------------------
# Reference implementations, straight from the equations.
# ---------------------------------------------------------------------------------------------------------

def ref_lstm_family(m, x, state):
    """Greff et al. 2017's LSTM with every ablation switch, Gers & Schmidhuber 2000 peepholes; with FGR the
    state is (h, c, a), a = the previous activations of the sigmoid gates, [i; f; o] (those that exist)."""
    H = m.hidden_size
    sig = [g for g, on in (("i", m.input_gate), ("f", m.forget_gate and not m.coupled),
                           ("o", m.output_gate)) if on]
    layout = [g for g in ("i", "f", "g", "o") if g == "g" or g in sig]  # torch's row order
    h0, c0 = state[:2]
    layer_in, hs, cs, acts = x, [], [], []
    for k in range(m.num_layers):
        W = dict(zip(layout, getattr(m, f"weight_ih_l{k}").split(H)))
        U = dict(zip(layout, getattr(m, f"weight_hh_l{k}").split(H)))
        b = dict(zip(layout, (getattr(m, f"bias_ih_l{k}") + getattr(m, f"bias_hh_l{k}")).split(H)))
        P = dict(zip(sig, getattr(m, f"weight_peephole_l{k}"))) if m.peephole else {}
        if m.full_gate_recurrence:
            blocks = getattr(m, f"weight_gg_l{k}").split(H, 0)
            R = {to: dict(zip(sig, row.split(H, 1))) for to, row in zip(sig, blocks)}
        h, c = h0[k], c0[k]
        prev = dict(zip(sig, state[2][k].split(H, 1))) if m.full_gate_recurrence else {}
        outs = []
        for t in range(x.shape[1]):
            xt = layer_in[:, t]
            pre = {gate: xt @ W[gate].T + h @ U[gate].T + b[gate] for gate in layout}
            if m.full_gate_recurrence:
                for to in sig:
                    pre[to] = pre[to] + sum(prev[s] @ R[to][s].T for s in sig)
            i = torch.sigmoid(pre["i"] + P.get("i", 0) * c) if "i" in sig else 1.0
            if "f" in sig:
                f = torch.sigmoid(pre["f"] + P.get("f", 0) * c)
            else:
                f = 1 - i if m.coupled else 1.0
            g = torch.tanh(pre["g"]) if m.input_activation else pre["g"]
            c = f * c + i * g
            o = torch.sigmoid(pre["o"] + P.get("o", 0) * c) if "o" in sig else 1.0
            h = o * (torch.tanh(c) if m.output_activation else c)
            prev = {s: v for s, v in (("i", i), ("f", f), ("o", o)) if s in sig}
            outs.append(h)
        layer_in = torch.stack(outs, 1)
        hs.append(h)
        cs.append(c)
        acts.append(torch.cat([prev[s] for s in sig], 1) if m.full_gate_recurrence else None)
    if m.full_gate_recurrence:
        return layer_in, (torch.stack(hs), torch.stack(cs), torch.stack(acts))
    return layer_in, (torch.stack(hs), torch.stack(cs))


def ref_elman(m, x, state, nonlinearity="tanh"):
    """Elman 1990: h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), φ = tanh or relu as asked (the switch's
    value, not the model's attribute: a constructor that dropped the switch must not pass)."""
    phi = {"tanh": torch.tanh, "relu": torch.relu}[nonlinearity]
    layer_in, hs = x, []
    for k in range(m.num_layers):
        W, U = getattr(m, f"weight_ih_l{k}"), getattr(m, f"weight_hh_l{k}")
        b_ih, b_hh = getattr(m, f"bias_ih_l{k}"), getattr(m, f"bias_hh_l{k}")
        h, outs = state[k], []
        for t in range(x.shape[1]):
            h = phi(layer_in[:, t] @ W.T + b_ih + h @ U.T + b_hh)
            outs.append(h)
        layer_in = torch.stack(outs, 1)
        hs.append(h)
    return layer_in, torch.stack(hs)


def ref_gru(m, x, state):
    """Cho et al. 2014 (r before U) or torch's form (r after U), per m.reset_after."""
    H = m.hidden_size
    layer_in, hs = x, []
    for k in range(m.num_layers):
        Wr, Wz, Wn = getattr(m, f"weight_ih_l{k}").split(H)
        Ur, Uz, Un = getattr(m, f"weight_hh_l{k}").split(H)
        bir, biz, bin_ = getattr(m, f"bias_ih_l{k}").split(H)
        bhr, bhz, bhn = getattr(m, f"bias_hh_l{k}").split(H)
        h, outs = state[k], []
        for t in range(x.shape[1]):
            xt = layer_in[:, t]
            r = torch.sigmoid(xt @ Wr.T + bir + h @ Ur.T + bhr)
            z = torch.sigmoid(xt @ Wz.T + biz + h @ Uz.T + bhz)
            if m.reset_after:
                n = torch.tanh(xt @ Wn.T + bin_ + r * (h @ Un.T + bhn))
            else:
                n = torch.tanh(xt @ Wn.T + bin_ + (r * h) @ Un.T + bhn)
            h = (1 - z) * n + z * h
            outs.append(h)
        layer_in = torch.stack(outs, 1)
        hs.append(h)
    return layer_in, torch.stack(hs)


def ref_depth_gated(m, x, state, close_gate=False, drop=None):
    """Yao et al. 2015: d = σ(b_d + w_ld c_t^{L-1} + W_xd x_t + w_cd c_{t-1}^L); c += d c_t^{L-1};
    below the lowest layer, c_t^0 = W_proj x_t. ``drop(k, h)``: the inter-layer dropout of layer k's input
    h^{k-1} (B, T, H), k >= 1; the cells passed up are not dropped out."""
    H = m.hidden_size
    h0, c0 = state
    layer_in, hs, cs = x, [], []
    lower = [x[:, t] @ m.weight_proj.T for t in range(x.shape[1])]
    for k in range(m.num_layers):
        if k > 0 and drop is not None:
            layer_in = drop(k, layer_in)
        Wi, Wf, Wg, Wo, Wd = getattr(m, f"weight_ih_l{k}").split(H)
        Ui, Uf, Ug, Uo = getattr(m, f"weight_hh_l{k}").split(H)
        bi, bf, bg, bo, bd = getattr(m, f"bias_ih_l{k}").split(H)
        ci, cf, cg, co = getattr(m, f"bias_hh_l{k}").split(H)
        w_ld, w_cd = getattr(m, f"weight_ld_l{k}"), getattr(m, f"weight_cd_l{k}")
        h, c, outs, cells = h0[k], c0[k], [], []
        for t in range(x.shape[1]):
            xt = layer_in[:, t]
            i = torch.sigmoid(xt @ Wi.T + bi + h @ Ui.T + ci)
            f = torch.sigmoid(xt @ Wf.T + bf + h @ Uf.T + cf)
            g = torch.tanh(xt @ Wg.T + bg + h @ Ug.T + cg)
            o = torch.sigmoid(xt @ Wo.T + bo + h @ Uo.T + co)
            d = torch.sigmoid(bd + w_ld * lower[t] + xt @ Wd.T + w_cd * c)
            c = f * c + i * g + d * lower[t]
            h = o * torch.tanh(c)
            outs.append(h)
            cells.append(c)
        layer_in, lower = torch.stack(outs, 1), cells
        hs.append(h)
        cs.append(c)
    return layer_in, (torch.stack(hs), torch.stack(cs))


def ref_clockwork(m, x, state, t0=0):
    """Koutník et al. 2014: module i updates iff t mod T_i == 0 (t absolute: x's first step is t0), from the
    input and modules j >= i."""
    g, n = len(m.periods), m.module_size
    layer_in, hs = x, []
    for k in range(m.num_layers):
        W_I = getattr(m, f"weight_ih_l{k}")
        b = getattr(m, f"bias_ih_l{k}") + getattr(m, f"bias_hh_l{k}")
        h, outs = list(state[k].split(n, 1)), []
        for t in range(x.shape[1]):
            new = list(h)
            for i in range(g):
                if (t0 + t) % m.periods[i] == 0:
                    rows = slice(i * n, (i + 1) * n)
                    pre = layer_in[:, t] @ W_I[rows].T + b[rows]
                    W_i = getattr(m, f"weight_hh_l{k}_m{i}")  # columns: modules i, i+1, ..., g-1
                    for j in range(i, g):
                        pre = pre + h[j] @ W_i[:, (j - i) * n:(j - i + 1) * n].T
                    new[i] = torch.tanh(pre)
            h = new
            outs.append(torch.cat(h, 1))
        layer_in = torch.stack(outs, 1)
        hs.append(torch.cat(h, 1))
    return layer_in, torch.stack(hs)


def reference(name, m, x, state, switches=None):
    if name in LSTM_FAMILY:
        return ref_lstm_family(m, x, state)
    if name in ("gru", "gru_cho"):
        return ref_gru(m, x, state)
    if name == "rnn":
        return ref_elman(m, x, state, (switches or {}).get("nonlinearity", "tanh"))
    if name == "depth_gated":
        return ref_depth_gated(m, x, state)
    if name == "clockwork":
        return ref_clockwork(m, x, state)
    raise KeyError(name)


# (variant, switches) pairs whose loop is checked against the equations; lstm/gru with native=False.
EQUATION_CASES = [
    ("lstm", {}), ("gru", {}),
    ("peephole", {}), ("greff", {}), ("cifg", {}), ("coupled", {}), ("nig", {}), ("nfg", {}), ("nog", {}),
    ("niaf", {}), ("noaf", {}), ("fgr", {}),
    ("lstm", dict(coupled=True)), ("lstm", dict(peephole=True, coupled=True, forget_bias=1.0)),
    ("fgr", dict(coupled=True)), ("fgr", dict(output_gate=False, input_gate=False)),
    ("lstm", dict(input_gate=False, forget_gate=False, output_gate=False, input_activation=False)),
    ("gru_cho", {}), ("depth_gated", {}), ("depth_gated", dict(forget_bias=1.0)),
    ("clockwork", {}), ("clockwork", dict(modules=2)), ("clockwork", dict(periods=[1, 3, 4, 6])),
    ("clockwork", dict(periods=[2, 4])),
    # rnn: tanh (torch's init), the IRNN (relu, identity init by default), relu with torch's init, identity-
    # initialised tanh
    ("rnn", {}), ("rnn", dict(nonlinearity="relu")), ("rnn", dict(nonlinearity="relu", identity_init=False)),
    ("rnn", dict(identity_init=True)),
]


def case_id(case):
    name, sw = case
    return name + "".join(f"-{k}={v}" for k, v in sw.items())


def loss_of(out, state, seed=0):
    """A loss that weights every output and state element differently (so no gradient hides in a sum)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [out, *flat(state)]
    return sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum() for p in parts)


def grads(m, x, out, state):
    return torch.autograd.grad(loss_of(out, state), [x, *m.parameters()])


def assert_close_all(a, b, atol=ATOL, rtol=RTOL):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", EQUATION_CASES, ids=case_id)
def test_loop_matches_equations(case):
    name, switches = case
    torch.manual_seed(0)
    m = build_variant(name, 3, 8, num_layers=2, **switches)
    if getattr(m, "native", False):
        m.native = False  # prove the step-by-step loop, not the fused kernel
    x = torch.randn(4, 9, 3, requires_grad=True)
    state = random_state(m, 4)
    out, st = m(x, state)
    ref_out, ref_st = reference(name, m, x, state, switches)
    assert out.shape == (4, 9, 8)
    assert_close_all([out, *flat(st)], [ref_out, *flat(ref_st)])
    assert_close_all(grads(m, x, out, st), grads(m, x, ref_out, ref_st))


# ---------------------------------------------------------------------------------------------------------
# The native variants agree with torch's modules; the lstm/gru loops agree with them too.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("name,torch_cls,switches,native", [
    ("rnn", nn.RNN, {}, True),
    ("rnn", nn.RNN, dict(nonlinearity="relu"), True),
    ("lstm", nn.LSTM, {}, True), ("lstm", nn.LSTM, {}, False), ("np", nn.LSTM, {}, True),
    ("gru", nn.GRU, {}, True), ("gru", nn.GRU, {}, False),
])
def test_matches_torch_module(name, torch_cls, switches, native, layers):
    torch.manual_seed(0)
    ref = torch_cls(3, 6, layers, batch_first=True, **switches)
    m = build_variant(name, 3, 6, num_layers=layers, **switches)
    m.load_state_dict(ref.state_dict())
    if not native:
        m.native = False
    assert getattr(m, "native", True) == native
    x = torch.randn(5, 7, 3, requires_grad=True)
    state = random_state(m, 5)
    for s in flat(state):
        s.requires_grad_()
    out, st = m(x, state)
    ref_out, ref_st = ref(x, state)
    assert_close_all([out, *flat(st)], [ref_out, *flat(ref_st)])
    # with the initial state's gradient, this proves the loops compose across calls as nn.LSTM/GRU do
    assert_close_all(torch.autograd.grad(loss_of(out, st), [x, *flat(state), *m.parameters()]),
                     torch.autograd.grad(loss_of(ref_out, ref_st), [x, *flat(state), *ref.parameters()]))


def test_peephole_with_zero_peepholes_is_torch_lstm():
    """A non-default switch, set back to an equivalent model, runs the custom loop and equals nn.LSTM."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 6, 2, batch_first=True)
    m = build_variant("lstm", 3, 6, num_layers=2, peephole=True)
    assert not m.native
    missing = m.load_state_dict(ref.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["weight_peephole_l0", "weight_peephole_l1"]
    with torch.no_grad():
        m.weight_peephole_l0.zero_()
        m.weight_peephole_l1.zero_()
    x = torch.randn(5, 7, 3, requires_grad=True)
    out, st = m(x)
    ref_out, ref_st = ref(x)
    assert_close_all([out, *st], [ref_out, *ref_st])
    g = torch.autograd.grad(loss_of(out, st), [x] + [p for n, p in m.named_parameters() if "peep" not in n])
    assert_close_all(g, torch.autograd.grad(loss_of(ref_out, ref_st), [x, *ref.parameters()]))


def test_forget_bias_native_and_custom():
    m = build_variant("lstm", 3, 5, forget_bias=1.0)
    assert m.native
    assert torch.equal(m.bias_ih_l0[5:10], torch.ones(5)) and torch.equal(m.bias_hh_l0[5:10], torch.zeros(5))
    assert not torch.equal(m.bias_ih_l0[:5], torch.ones(5))
    c = build_variant("cifg", 3, 5, forget_bias=2.0)  # f = 1 - i = σ(-z_i): the bias of f is -b_i
    assert torch.equal(c.bias_ih_l0[:5], -2 * torch.ones(5)) and torch.equal(c.bias_hh_l0[:5], torch.zeros(5))
    d = build_variant("depth_gated", 3, 5, num_layers=2, forget_bias=1.0)
    assert torch.equal(d.bias_ih_l1[5:10], torch.ones(5)) and torch.equal(d.bias_hh_l1[5:10], torch.zeros(5))


def test_irnn_identity_init():
    m = build_variant("rnn", 3, 5, nonlinearity="relu")
    assert torch.equal(m.weight_hh_l0, torch.eye(5)) and not m.bias_ih_l0.any() and not m.bias_hh_l0.any()
    m = build_variant("rnn", 3, 5, nonlinearity="relu", identity_init=False)
    assert not torch.equal(m.weight_hh_l0, torch.eye(5))
    assert not torch.equal(build_variant("rnn", 3, 5).weight_hh_l0, torch.eye(5))


@pytest.mark.parametrize("switches,identity", [
    ({}, False), (dict(identity_init=True), True), (dict(nonlinearity="relu"), True),
    (dict(nonlinearity="relu", identity_init=False), False), (dict(nonlinearity="tanh", identity_init=False), False),
], ids=["tanh", "tanh-identity", "irnn", "relu-torch-init", "tanh-identity-off"])
def test_rnn_identity_init_sets_every_layer(switches, identity):
    """identity_init (Le et al. 2015): W_hh = I and b_ih = b_hh = 0 in every layer; W_ih keeps torch's init
    (the same draws as nn.RNN's from the same seed). Off, every parameter is torch's init."""
    layers, H = 3, 5
    torch.manual_seed(0)
    m = build_variant("rnn", 3, H, num_layers=layers, **switches)
    torch.manual_seed(0)
    ref = nn.RNN(3, H, layers, batch_first=True, nonlinearity=switches.get("nonlinearity", "tanh"))
    assert m.identity_init is identity and m.nonlinearity == ref.nonlinearity
    for k in range(layers):
        torch.testing.assert_close(getattr(m, f"weight_ih_l{k}"), getattr(ref, f"weight_ih_l{k}"), atol=0, rtol=0)
        for name in ("weight_hh", "bias_ih", "bias_hh"):
            p = getattr(m, f"{name}_l{k}")
            if identity:
                expected = torch.eye(H) if name == "weight_hh" else torch.zeros(H)
            else:
                expected = getattr(ref, f"{name}_l{k}")
                assert p.abs().min() > 0, (name, k)  # a real draw, not zeros left behind
            torch.testing.assert_close(p, expected, atol=0, rtol=0, msg=f"{name}_l{k}")
    with torch.no_grad():  # and reset_parameters (called again, e.g. by a re-initialisation) does the same
        for p in m.parameters():
            p.fill_(0.25)
    m.reset_parameters()
    for k in range(layers):
        assert torch.equal(getattr(m, f"weight_hh_l{k}"), torch.eye(H)) == identity, k
        assert (not getattr(m, f"bias_ih_l{k}").any() and not getattr(m, f"bias_hh_l{k}").any()) == identity, k


# ---------------------------------------------------------------------------------------------------------
# Depth-gated and clockwork specifics.
# ---------------------------------------------------------------------------------------------------------

def test_depth_gated_with_closed_gate_is_stacked_lstm():
    torch.manual_seed(0)
    m = build_variant("depth_gated", 3, 6, num_layers=3)
    ref = nn.LSTM(3, 6, 3, batch_first=True)
    with torch.no_grad():
        for k in range(3):
            for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"):
                getattr(ref, f"{n}_l{k}").copy_(getattr(m, f"{n}_l{k}")[:24])
    x = torch.randn(4, 8, 3, requires_grad=True)
    state = random_state(m, 4)
    for s in state:
        s.requires_grad_()
    out, st = m(x, state)
    ref_out, ref_st = ref(x, state)
    assert not torch.allclose(out, ref_out, atol=1e-3)  # the open gate matters ...
    with torch.no_grad():
        for k in range(3):
            getattr(m, f"bias_ih_l{k}")[24:] = -math.inf  # ... and shut, d = σ(-inf) = 0 exactly
    out, st = m(x, state)
    assert_close_all([out, *st], [ref_out, *ref_st])
    # gradients too: of the input, the initial state and the LSTM's parameters (their i, f, g, o rows) ...
    names = [f"{n}_l{k}" for k in range(3) for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")]
    lstm_params = [getattr(m, n) for n in names]
    gate_params = [m.weight_proj, *(getattr(m, f"{n}_l{k}") for k in range(3) for n in ("weight_ld", "weight_cd"))]
    g = torch.autograd.grad(loss_of(out, st), [x, *state, *lstm_params, *gate_params])
    ref_g = torch.autograd.grad(loss_of(ref_out, ref_st), [x, *state, *(getattr(ref, n) for n in names)])
    n = 3 + len(names)
    assert_close_all([*g[:3], *(d[:24] for d in g[3:n])], ref_g)
    # ... and nothing reaches the shut gate: its rows, the projection and the peepholes get exactly zero
    for d in [*(d[24:] for d in g[3:n] if d.shape[0] == 30), *g[n:]]:
        assert not d.any()


def test_depth_gated_dropout_drops_the_hidden_output_not_the_cell_passed_up(monkeypatch):
    """Between stacked layers only x = h^{L-1} is dropped out; c^{L-1} reaches the depth gate intact. Dropout
    is replaced by a recorded deterministic mask, and the reference applies the same masks to x alone."""
    import torch.nn.functional as F
    import variants.depth_gated as dg

    assert dg.F.dropout is F.dropout  # the function the module calls, patched below
    p, B, T, H, layers = 0.4, 4, 9, 6, 3
    calls = []

    def recorded_dropout(x, p_, training=True, inplace=False):
        assert (p_, training, inplace) == (p, True, False)
        gen = torch.Generator().manual_seed(100 + len(calls))
        mask = (torch.rand(x.shape, generator=gen) >= p_).to(x.dtype) / (1 - p_)
        calls.append((tuple(x.shape), mask))
        return x * mask

    torch.manual_seed(0)
    m = build_variant("depth_gated", 3, H, num_layers=layers, dropout=p).train()
    x = torch.randn(B, T, 3, requires_grad=True)
    state = random_state(m, B)
    for s in state:
        s.requires_grad_()
    monkeypatch.setattr(dg.F, "dropout", recorded_dropout)
    out, st = m(x, state)
    monkeypatch.undo()
    assert len(calls) == layers - 1  # one per layer boundary, on x only

    def same_masks(k, h):  # call k - 1 dropped layer k's input; the module runs time-major, (T, B, H)
        shape, mask = calls[k - 1]
        assert shape in ((T, B, H), (B, T, H)), shape
        return h * (mask.transpose(0, 1) if shape == (T, B, H) else mask)

    ref_out, ref_st = ref_depth_gated(m, x, state, drop=same_masks)
    assert_close_all([out, *st], [ref_out, *ref_st])
    wrt = [x, *state, *m.parameters()]
    assert_close_all(torch.autograd.grad(loss_of(out, st), wrt), torch.autograd.grad(loss_of(ref_out, ref_st), wrt))
    # the masks matter: the reference without them is another network
    assert not torch.allclose(out, ref_depth_gated(m, x, state)[0], atol=1e-3)


def test_clockwork_unscheduled_modules_keep_state_exactly():
    torch.manual_seed(0)
    m = build_variant("clockwork", 3, 12, num_layers=2, periods=[1, 2, 3])  # t=4: modules 0, 1 only
    x = torch.randn(2, 13, 3)
    out, _ = m(x, random_state(m, 2))
    blocks = out.split(4, 2)
    for t in range(1, 13):
        for i, period in enumerate(m.periods):
            same = torch.equal(blocks[i][:, t], blocks[i][:, t - 1])
            assert same == (t % period != 0), (t, i)


def test_clockwork_first_step_updates_all_and_idle_steps_copy():
    m = build_variant("clockwork", 3, 8, periods=[2, 4])
    h0 = torch.randn(1, 2, 8)
    out, h = m(torch.randn(2, 5, 3), h0)
    assert not torch.equal(out[:, 0, :4], h0[0, :, :4]) and not torch.equal(out[:, 0, 4:], h0[0, :, 4:])
    assert torch.equal(out[:, 1], out[:, 0]) and torch.equal(out[:, 3], out[:, 2])  # no module at odd t
    assert torch.equal(h[0], out[:, -1])


def test_clockwork_recurrence_runs_slow_to_fast():
    torch.manual_seed(0)
    m = build_variant("clockwork", 3, 12, modules=3)
    W = m.recurrent_matrix().detach()
    for i in range(3):
        for j in range(3):
            block = W[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            assert (block == 0).all() == (j < i), (i, j)  # module i hears modules j >= i only
    # Behaviour, not layout: the slowest module never hears the faster ones; the fastest hears the slowest.
    x, h0 = torch.randn(2, 9, 3), torch.randn(1, 2, 12)
    h1 = h0.clone()
    h1[..., :8] += 1.0  # perturb the two faster modules
    h2 = h0.clone()
    h2[..., 8:] += 1.0  # perturb the slowest
    out0, out1, out2 = m(x, h0)[0], m(x, h1)[0], m(x, h2)[0]
    assert torch.equal(out0[..., 8:], out1[..., 8:])
    assert not torch.allclose(out0[..., :4], out2[..., :4])


def test_clockwork_parameters_and_width_check():
    assert count_parameters(build_variant("clockwork", 5, 16, modules=4)) < \
        count_parameters(build_variant("rnn", 5, 16))
    with pytest.raises(ValueError, match="divisible"):
        build_variant("clockwork", 5, 10, modules=4)
    with pytest.raises(ValueError, match="periods"):
        build_variant("clockwork", 5, 8, modules=4, periods=[1, 2])
    with pytest.raises(ValueError, match="fastest first"):
        build_variant("clockwork", 5, 8, periods=[4, 1])


def test_clockwork_with_one_module_is_elman():
    torch.manual_seed(0)
    m = build_variant("clockwork", 3, 6, num_layers=2, modules=1)
    ref = nn.RNN(3, 6, 2, batch_first=True)
    sd = {k.replace("_m0", ""): v for k, v in m.state_dict().items()}
    ref.load_state_dict(sd)
    x = torch.randn(2, 5, 3, requires_grad=True)
    h0 = random_state(m, 2).requires_grad_()
    out, h = m(x, h0)
    ref_out, ref_h = ref(x, h0)
    assert_close_all([out, h], [ref_out, ref_h])
    assert_close_all(m(x), ref(x))  # state=None is a zero state, as for nn.RNN
    # gradients: of the input, the initial state and every parameter, by name
    names = [n for n, _ in m.named_parameters()]
    assert sorted(n.replace("_m0", "") for n in names) == sorted(n for n, _ in ref.named_parameters())
    g = torch.autograd.grad(loss_of(out, h), [x, h0, *m.parameters()])
    ref_g = torch.autograd.grad(loss_of(ref_out, ref_h), [x, h0, *(getattr(ref, n.replace("_m0", "")) for n in names)])
    assert_close_all(g, ref_g)


# ---------------------------------------------------------------------------------------------------------
# Switches, presets and parameter counts.
# ---------------------------------------------------------------------------------------------------------

INIT_SWITCHES = {"forget_bias", "identity_init"}  # they act through the initial weights


def alternative(switch, default):
    if switch == "nonlinearity":
        return "relu"
    if switch == "forget_bias":
        return 1.0
    if switch == "modules":
        return 2
    if switch == "periods":
        return [1, 3, 5, 7]
    if switch == "identity_init":
        return True
    return not default


SWITCH_CASES = [(n, s) for n, info in VARIANTS.items() for s in info.switches]


@pytest.mark.parametrize("name,switch", SWITCH_CASES, ids=[f"{n}-{s}" for n, s in SWITCH_CASES])
def test_every_switch_changes_the_output(name, switch):
    """No inert knob: flipping a switch on a fixed input changes the output, or is refused loudly."""
    value = alternative(switch, get_variant(name).switches[switch])
    torch.manual_seed(0)
    base = build_variant(name, 3, 8, num_layers=2)
    torch.manual_seed(0)
    try:
        other = build_variant(name, 3, 8, num_layers=2, **{switch: value})
    except ValueError as e:  # refused loudly: only the known contradictions (a coupled gate without its
        assert re.search(r"coupled|forget_bias", str(e)), e  # partner, nfg's forget_bias), tested below
        return
    if switch not in INIT_SWITCHES:  # same weights wherever the shapes allow, so only the switch differs
        own = other.state_dict()
        other.load_state_dict({k: v for k, v in base.state_dict().items()
                               if k in own and own[k].shape == v.shape}, strict=False)
    x = torch.randn(2, 6, 3)
    assert not torch.allclose(base(x)[0], other(x)[0], atol=1e-4)


def test_refused_combinations_name_the_problem():
    with pytest.raises(ValueError, match="coupled"):
        build_variant("lstm", 3, 4, coupled=True, forget_gate=False)
    with pytest.raises(ValueError, match="coupled"):
        build_variant("lstm", 3, 4, coupled=True, input_gate=False)
    with pytest.raises(ValueError, match="forget_bias"):
        build_variant("nfg", 3, 4, forget_bias=1.0)
    with pytest.raises(ValueError, match="nonlinearity"):
        build_variant("rnn", 3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="allowed: .*peephole"):
        check_switches("lstm", {"peepholes": True})


@pytest.mark.parametrize("name, switches, words", [
    ("lstm", {"peephole": "no"}, "switch 'peephole' takes true or false (its default is False), got 'no'"),
    ("lstm", {"peephole": 1}, "takes true or false"),
    ("lstm", {"forget_bias": True}, "switch 'forget_bias' takes a number"),
    ("rnn", {"nonlinearity": 1}, "switch 'nonlinearity' takes a string"),
])
def test_a_switch_of_another_kind_than_its_default_is_refused(name, switches, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        check_switches(name, switches)
    check_switches("lstm", {"forget_bias": 1, "peephole": True})  # an int for a float is a number


@pytest.mark.parametrize("bad", ["", "my/cell", "my cell", "lstm(x)", "a=b", "1st"])
def test_names_that_would_break_cell_keys_are_refused(bad):
    from tasks import Task, register as register_task

    with pytest.raises(ValueError, match="use letters, digits"):
        register(bad, description="-", paper="-")(nn.RNN)
    with pytest.raises(ValueError, match="use letters, digits"):
        register_task(type("T", (Task,), {"name": bad}))
    with pytest.raises(ValueError, match="the name is taken"):
        register("lstm", description="-", paper="-")(nn.RNN)


def test_registry_names():
    expected = {"rnn", "lstm", "peephole", "cifg", "coupled", "gru", "gru_cho", "depth_gated", "clockwork",
                "greff", "nig", "nfg", "nog", "niaf", "noaf", "np", "fgr"}
    assert expected <= set(VARIANTS)
    for info in VARIANTS.values():
        assert info.description and info.paper


# What each short name computes, from Greff et al. 2017 (Table 1 and section 2), written out here rather than
# read from the variants: the equation tests above take the switches from the model they check, so a preset
# or a constructor that set the wrong switch (nog dropping the input gate, niaf and noaf swapped) would pass.
GREFF = dict(peephole=True)
NAMED = {
    "lstm": {}, "np": {}, "peephole": GREFF, "greff": GREFF,
    "cifg": dict(GREFF, coupled=True), "coupled": dict(GREFF, coupled=True),
    "nig": dict(GREFF, input_gate=False), "nfg": dict(GREFF, forget_gate=False),
    "nog": dict(GREFF, output_gate=False), "niaf": dict(GREFF, input_activation=False),
    "noaf": dict(GREFF, output_activation=False), "fgr": dict(GREFF, full_gate_recurrence=True),
}
LSTM_PLAIN = dict(input_gate=True, forget_gate=True, output_gate=True, input_activation=True,
                  output_activation=True, peephole=False, coupled=False, full_gate_recurrence=False)


@pytest.mark.parametrize("name", sorted(NAMED) + ["gru", "gru_cho"])
def test_each_short_name_builds_the_cell_its_paper_defines(name):
    expected = {"gru": dict(reset_after=True), "gru_cho": dict(reset_after=False)}.get(name)
    expected = expected or {**LSTM_PLAIN, **NAMED[name]}
    model = build_variant(name, 3, 4)
    assert {k: getattr(model, k) for k in expected} == expected
    if name in NAMED:  # the switch names mean what they say: the slices the loop computes
        si, sf, sg, so = model._slices()
        assert (si is None, sf is None, so is None) == (not expected["input_gate"],  # coupled: f = 1 - i
                                                         not expected["forget_gate"] or expected["coupled"],
                                                         not expected["output_gate"])


def lstm_count(I, H, gates=4, peepholes=0, fgr=0):
    return gates * H * (I + H) + 2 * gates * H + peepholes * H + fgr * H * H


@pytest.mark.parametrize("name,expected", [
    ("lstm", lstm_count(5, 7)),
    ("np", lstm_count(5, 7)),
    ("peephole", lstm_count(5, 7, peepholes=3)),
    ("greff", lstm_count(5, 7, peepholes=3)),
    ("niaf", lstm_count(5, 7, peepholes=3)),
    ("noaf", lstm_count(5, 7, peepholes=3)),
    ("cifg", lstm_count(5, 7, gates=3, peepholes=2)),
    ("coupled", lstm_count(5, 7, gates=3, peepholes=2)),
    ("nig", lstm_count(5, 7, gates=3, peepholes=2)),
    ("nfg", lstm_count(5, 7, gates=3, peepholes=2)),
    ("nog", lstm_count(5, 7, gates=3, peepholes=2)),
    ("fgr", lstm_count(5, 7, peepholes=3, fgr=9)),
    ("gru", 3 * 7 * (5 + 7) + 6 * 7),
    ("gru_cho", 3 * 7 * (5 + 7) + 6 * 7),
    ("rnn", 7 * (5 + 7) + 2 * 7),
    ("depth_gated", 7 * 5 + 5 * 7 * 5 + 4 * 7 * 7 + 9 * 7 + 2 * 7),
])
def test_parameter_count_formula(name, expected):
    assert count_parameters(build_variant(name, 5, 7)) == expected


def test_parameter_count_relations():
    c = {n: count_parameters(build_variant(n, 5, 7)) for n in ("greff", "cifg", "np", "fgr")}
    assert c["greff"] - c["np"] == 3 * 7  # NP: 3H fewer
    assert c["fgr"] - c["greff"] == 9 * 7 * 7  # FGR: nine H x H matrices more
    assert c["greff"] - c["cifg"] == 7 * (5 + 7) + 2 * 7 + 7  # CIFG: one gate (and its peephole) fewer
    g, m = 4, 3  # clockwork: only the on-and-above-diagonal recurrent blocks
    assert count_parameters(build_variant("clockwork", 5, 12, modules=g)) == 12 * 5 + 2 * 12 + m * m * g * (g + 1) // 2
    d2 = count_parameters(build_variant("depth_gated", 5, 7, num_layers=2))
    assert d2 == count_parameters(build_variant("depth_gated", 5, 7)) + 5 * 7 * 7 + 4 * 7 * 7 + 11 * 7


# ---------------------------------------------------------------------------------------------------------
# The common interface (variants/contract.py: shapes, state, chunked calls, gradients, seeds, dropout,
# gradcheck), for every registered variant at its defaults and for every switch case above.
# ---------------------------------------------------------------------------------------------------------

# Not the IRNN (relu, W_hh = I, zero biases): a unit dead at one step then has a pre-activation of exactly 0
# (I h + W 0 + 0) at the next, relu's kink, where gradcheck's finite differences cannot agree with any
# derivative. Its gradients are checked against the equations above and against nn.RNN below.
CONTRACT_CASES = [(name, {}) for name in sorted(VARIANTS)] + [
    c for c in EQUATION_CASES if c[1] and c != ("rnn", dict(nonlinearity="relu"))]


@pytest.mark.parametrize("case", CONTRACT_CASES, ids=case_id)
def test_contract(case):
    name, switches = case
    assert_contract(name, **switches)


def test_clockwork_t0_is_the_absolute_step():
    torch.manual_seed(0)
    m = build_variant("clockwork", 3, 12, num_layers=2, periods=[1, 3, 4])
    x = torch.randn(2, 7, 3, requires_grad=True)
    state = random_state(m, 2)
    for t0 in (0, 1, 5, 12, 13, 1001):
        out, st = m(x, state, t0=t0)
        ref_out, ref_st = ref_clockwork(m, x, state, t0)
        assert_close_all([out, st], [ref_out, ref_st])
        assert_close_all(grads(m, x, out, st), grads(m, x, ref_out, ref_st))
    assert not torch.allclose(m(x, state, t0=1)[0], m(x, state)[0])
    with pytest.raises(ValueError, match="t0"):
        m(x, state, t0=-1)


def test_clockwork_gradcheck_off_cycle():
    torch.manual_seed(0)
    m = build_variant("clockwork", 2, 4, num_layers=2, modules=2).double()
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    h = random_state(m, 2).requires_grad_()

    def f(x, h, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x, h), {"t0": 3})

    assert torch.autograd.gradcheck(f, (x, h, *m.parameters()))


# ---------------------------------------------------------------------------------------------------------
# Budget matching and the benchmark's plumbing (no timing assertions).
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,switches,layers,out", [
    ("lstm", {}, 1, 10), ("gru", {}, 2, 0), ("fgr", {}, 1, 3), ("clockwork", dict(modules=4), 1, 10),
    ("depth_gated", {}, 2, 10), ("rnn", {}, 1, 0),
])
def test_hidden_for_param_budget_is_closest(name, switches, layers, out):
    budget = 10_000

    def total(h):
        m = build_variant(name, 7, h, num_layers=layers, **switches)
        return count_parameters(m) + ((h + 1) * out if out else 0)

    h = hidden_for_param_budget(name, 7, budget, num_layers=layers, output_size=out, **switches)
    step = 4 if name == "clockwork" else 1
    assert h % step == 0
    best = abs(total(h) - budget)
    assert best <= abs(total(h + step) - budget)
    if h > step:
        assert best < abs(total(h - step) - budget)  # ties go to the smaller size


def test_hidden_for_param_budget_examples():
    assert hidden_for_param_budget("lstm", 10, 10_000, output_size=10) == 43
    assert hidden_for_param_budget("lstm", 1, 1) == 1
    # 4H(1+H) + 8H = 4H^2 + 12H: H = 50 gives 10_600 exactly.
    assert hidden_for_param_budget("lstm", 1, 10_600) == 50
    with pytest.raises(ValueError, match="allowed"):
        hidden_for_param_budget("lstm", 1, 100, peepholes=True)


def test_benchmark_rows_and_table():
    rows = benchmark(["lstm", "clockwork"], batch=2, hidden=8, seq_len=4, warmup=0, repeats=1)
    assert [r["variant"] for r in rows] == ["torch.nn.LSTM", "lstm", "clockwork"]
    assert set(rows[0]) == {"variant", "params", "fwd_ms", "bwd_ms", "total_ms", "ratio_vs_lstm"}
    assert rows[0]["ratio_vs_lstm"] == 1.0 and rows[1]["params"] == rows[0]["params"]
    table = format_table(rows)
    assert table.count("\n") == 4 and "| clockwork |" in table


def test_shapes_only_builds_on_meta_and_on_the_cpu_only_where_meta_cannot():
    """A constructor that reads a value (meta tensors hold none) is built on the CPU, on a random stream of
    its own; a size the constructor refuses (ValueError) is not tried again."""
    assert shapes_only(lambda: nn.Linear(3, 3)).weight.is_meta
    tries = []

    def reads_a_value():
        tries.append(1)
        w = torch.randn(3, 3)
        scale = w.abs().max().item()  # RuntimeError on meta
        return nn.Linear(3, 3).requires_grad_(scale > 0)
    before = torch.random.get_rng_state()
    assert shapes_only(reads_a_value).weight.device.type == "cpu" and len(tries) == 2
    assert torch.equal(torch.random.get_rng_state(), before)

    def refuses():
        tries.append(1)
        raise ValueError("hidden_size must be a multiple of 4")
    with pytest.raises(ValueError, match="multiple of 4"):
        shapes_only(refuses)
    assert len(tries) == 3
