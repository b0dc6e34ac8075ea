"""Clockwork RNN (Koutník, Greff, Gomez, Schmidhuber 2014, "A Clockwork RNN").

The H hidden units are split into g equal modules; module i has period T_i (default 2^i for i = 0..g-1,
i.e. 1, 2, 4, ...; fastest first). At absolute step t (every module updates at t = 0)::

    h_t^(i) = tanh(W_I^(i) x_t + b^(i) + Σ_{j >= i} W_H^(i,j) h_{t-1}^(j))   if t mod T_i == 0
    h_t^(i) = h_{t-1}^(i)                                                   otherwise (kept exactly)

Recurrent connections run only from slower (or equal-index) modules to faster ones, so W_H is block
upper-triangular when modules are sorted fastest first; input connections (and any output head) are full.
Only the blocks on and above the diagonal are parameters: ``weight_hh_l{k}_m{i}`` of shape
(H/g, (g-i) H/g) holds module i's incoming row block, so a clockwork RNN has fewer parameters than an
Elman RNN of the same width (equal for g = 1, where it *is* the Elman RNN). ``weight_ih_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}`` are named and shaped as in torch.nn.RNN.

The clock is absolute: ``forward(x, state, t0=0)`` takes the index of x's first step (keyword only), so a
sequence run in chunks, each call given the returned state and its own start ``t0``, equals one run over the
whole sequence. ``clocked = True`` on the class tells callers that unroll step by step to pass ``t0``.

Switches: ``modules`` (g; default 4, or len(periods)), ``periods`` (a non-decreasing list of positive ints,
one per module). hidden_size must be divisible by g.

Speed: sorted fastest first, the modules whose period divides t form a prefix whenever each period divides
the next (the default powers of two). Each step therefore multiplies only the active prefix's rows of W_H,
forward and backward (on average under 2 of g modules for powers of two); for other period lists the rows up
to the last active module are computed and the idle ones in between are restored. The input projection of
all steps is one matmul; backpropagation through time is written by hand (``_Recurrence``). Which modules
run at each step is planned once per (sequence length, t0 mod lcm(periods)) and cached.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from variants import register
from variants.lstm import _addmm, _addmm_, _transposed


@lru_cache(maxsize=256)
def _schedule(periods: tuple[int, ...], module_size: int, steps: int, phase: int):
    """Per step of a call whose first step has absolute index ``phase`` (mod the periods' lcm): (rows to
    recompute, the active modules among them or None when all of them are)."""
    plan = []
    for t in range(phase, phase + steps):
        active = [i for i, p in enumerate(periods) if t % p == 0]
        n = (active[-1] + 1) if active else 0
        plan.append((n * module_size, None if len(active) == n else tuple(active)))
    return tuple(plan)


@register("clockwork", description="Clockwork RNN: modules updated at periods 1, 2, 4, ...; slow-to-fast links",
          paper="Koutník et al. 2014, A Clockwork RNN")
class ClockworkRNN(nn.Module):
    clocked = True  # forward takes t0, the absolute index of the input's first step

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, *, modules=None, periods=None):
        super().__init__()
        if periods is not None:
            periods = tuple(periods)
            if modules is not None and modules != len(periods):
                raise ValueError(f"clockwork: modules={modules} but {len(periods)} periods {list(periods)}")
            if not periods or any(not isinstance(p, int) or p < 1 for p in periods):
                raise ValueError(f"clockwork: periods must be positive integers, got {list(periods)}")
            if list(periods) != sorted(periods):
                raise ValueError(f"clockwork: list periods fastest first (non-decreasing), got {list(periods)}")
        else:
            modules = 4 if modules is None else modules
            if not isinstance(modules, int) or modules < 1:
                raise ValueError(f"clockwork: modules must be a positive integer, got {modules!r}")
            periods = tuple(2 ** i for i in range(modules))
        g = len(periods)
        if hidden_size % g:
            raise ValueError(f"clockwork: hidden_size={hidden_size} is not divisible by modules={g}; "
                             f"use a multiple of {g}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.periods, self.module_size = float(dropout), periods, hidden_size // g
        self._cycle = math.lcm(*periods)  # the schedule repeats with this period
        m = self.module_size
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(hidden_size, n_in)))
            for i in range(g):
                self.register_parameter(f"weight_hh_l{k}_m{i}", nn.Parameter(torch.empty(m, (g - i) * m)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(hidden_size)))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}, "
                f"periods={list(self.periods)}")

    def recurrent_matrix(self, k=0, weight=None):
        """Layer k's full (H, H) W_H: module i's row block is zero left of column i * H/g. ``weight(name)``:
        the blocks by parameter name, default this model's; a population's stacked ones give (P, H, H)."""
        m, g = self.module_size, len(self.periods)
        weight = weight or (lambda name: getattr(self, name))
        return torch.cat([F.pad(weight(f"weight_hh_l{k}_m{i}"), (i * m, 0)) for i in range(g)], -2)

    def forward(self, x, state=None, *, t0: int = 0):
        """``t0``: the absolute index of x's first step (module i updates at steps t with t mod T_i == 0)."""
        try:
            start = operator.index(t0)
        except TypeError:
            start = -1
        if start < 0:
            raise ValueError(f"clockwork: t0 must be a non-negative integer, got {t0!r}")
        if state is None:
            state = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        plan = _schedule(self.periods, self.module_size, x.shape[1], start % self._cycle)
        x = x.transpose(0, 1)  # time-major inside: every step's slice is contiguous
        hs = []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, h = self._layer(k, x, state[k], plan)
            hs.append(h)
        return x.transpose(0, 1), torch.stack(hs)

    def _layer(self, k, x, h, plan):
        """One layer: the input projection of all steps in one matmul, then the scheduled recurrence."""
        b = getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}")
        xp = F.linear(x, getattr(self, f"weight_ih_l{k}"), b)  # (T, B, H)
        return _Recurrence.apply(plan, self.module_size, xp, h, self.recurrent_matrix(k))


class _Recurrence(torch.autograd.Function):
    """The clockwork recurrence over precomputed input projections xp (T, B, H), with hand-written
    backpropagation through time: per step only the active prefix's units (columns of the (B, H) state) are
    computed, forward and backward, and the recurrent weight gradient is one matmul over all steps (autograd
    on a loop would allocate a full H x H gradient per step for the row slices). Per-step views are made in
    bulk, once per distinct prefix width. The same walk serves P stacked models (``studies/population.py``):
    xp (P, T, B, H), h0 (P, B, H), w (P, H, H), batched matmuls. Checked against autograd on the plain
    equations and by gradcheck in tests/test_variants.py."""

    @staticmethod
    def forward(ctx, plan, m, xp, h0, w):
        *lead, T, B, H = xp.shape  # lead: () for one model, (P,) for a population
        tax = len(lead)            # the time axis
        hs = xp.new_empty(*lead, T + 1, B, H)
        hs.select(tax, 0).copy_(h0)
        widths = {n for n, _ in plan if n}
        w_t = {n: _transposed(w[..., :n, :]) for n in widths}
        xp_n = _prefix_views(xp, widths, tax)
        hs_n = _prefix_views(hs.narrow(tax, 1, T), widths, tax)
        kept = {n: hs[..., n:].unbind(tax) for n in {n for n, _ in plan if n < H}}  # units after the prefix
        for t, ((n, active), h_prev, h) in enumerate(zip(plan, hs.unbind(tax), hs.narrow(tax, 1, T).unbind(tax))):
            if n < H:
                kept[n][t + 1].copy_(kept[n][t])
            if n:
                _addmm(xp_n[n][t], h_prev, w_t[n], out=hs_n[n][t]).tanh_()
                for j in _idle(active, n, m):  # modules inside the prefix that are not scheduled
                    h[..., j] = h_prev[..., j]
        ctx.plan, ctx.m = plan, m
        ctx.save_for_backward(hs, w)
        return hs.narrow(tax, 1, T), hs.select(tax, T).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT):
        hs, w = ctx.saved_tensors
        plan, m = ctx.plan, ctx.m
        *lead, T1, B, H = hs.shape
        tax = len(lead)
        dZ = hs.new_zeros(*lead, T1 - 1, B, H)  # gradients of the pre-activations; zero where a module idles
        dh = d_hT.clone() if d_hT is not None else hs.new_zeros(*lead, B, H)
        widths = {n for n, _ in plan if n}
        w_n = {n: w[..., :n, :] for n in widths}
        dh_n = {n: dh[..., :n] for n in widths}
        dz_n = _prefix_views(dZ, widths, tax)
        hs_n = _prefix_views(hs.narrow(tax, 1, T1 - 1), widths, tax)
        d_out = d_out.unbind(tax) if d_out is not None else None
        for t in reversed(range(T1 - 1)):
            if d_out is not None:
                dh.add_(d_out[t])
            n, active = plan[t]
            if not n:
                continue  # every module kept its state: the gradient passes through unchanged
            dz = dz_n[n][t]
            torch.ops.aten.tanh_backward.grad_input(dh_n[n], hs_n[n][t], grad_input=dz)  # dh ⊙ (1 - h²)
            idle = _idle(active, n, m)
            for j in idle:
                dz[..., j] = 0.0
            kept = dh[..., :n].clone() if idle else None
            dh_n[n].zero_()  # updated units don't pass their gradient straight to h_{t-1} ...
            for j in idle:
                dh[..., j] = kept[..., j]  # ... idle ones do
            _addmm_(dh, dz, w_n[n])
        # (h^T dZ)^T, not dZ^T h: BLAS ran the latter (a transposed T*B-row operand first) ~3x slower (measured).
        h_prev = hs.narrow(tax, 0, T1 - 1).reshape(*lead, -1, H)
        d_w = (h_prev.transpose(-1, -2) @ dZ.view(*lead, -1, H)).transpose(-1, -2)
        return None, None, dZ, dh, d_w


def _prefix_views(x, widths, tax=0):
    """{n: [x[t, :, :n] for every t]} for each width n (t along axis ``tax``), made in bulk (cheaper than per
    step)."""
    return {n: x[..., :n].unbind(tax) for n in widths}


def _idle(active, n, m):
    """Column slices of the modules among the first n units that are not scheduled (none if all are)."""
    if active is None:
        return []
    return [slice(i * m, (i + 1) * m) for i in range(n // m) if i not in active]
