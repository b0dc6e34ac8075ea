"""The LSTM family: torch's LSTM, peepholes, CIFG and Greff et al.'s ablations, as switches of one class.

Equations for one layer at step t (x input, h hidden output, c cell, σ sigmoid, ⊙ elementwise)::

    i = σ(W_i x_t + U_i h_{t-1} + p_i ⊙ c_{t-1} + b_i)            input gate     (i = 1 if not input_gate)
    f = σ(W_f x_t + U_f h_{t-1} + p_f ⊙ c_{t-1} + b_f)            forget gate    (f = 1 if not forget_gate;
                                                                                   f = 1 - i if coupled)
    g = tanh(W_g x_t + U_g h_{t-1} + b_g)                          block input    (no tanh if not input_activation)
    c_t = f ⊙ c_{t-1} + i ⊙ g
    o = σ(W_o x_t + U_o h_{t-1} + p_o ⊙ c_t + b_o)                output gate    (o = 1 if not output_gate)
    h_t = o ⊙ tanh(c_t)                                            (no tanh if not output_activation)

* With every switch at its default this is exactly ``torch.nn.LSTM`` (Hochreiter & Schmidhuber 1997 with the
  forget gate of Gers et al. 2000, no peepholes) and runs on torch's fused kernel (``torch.lstm``).
* ``peephole``: the diagonal peepholes p_i, p_f, p_o of Gers & Schmidhuber 2000 ("Recurrent nets that time
  and count"): i and f see c_{t-1}, o sees the updated c_t. Only gates that exist get one.
* ``coupled`` (CIFG): f = 1 - i, so the forget gate has no weights. ``forget_bias`` then goes, negated, into
  the input gate's bias (1 - σ(z) = σ(-z): it is the bias of f's pre-activation -z).
* ``full_gate_recurrence`` (FGR, Greff et al. 2017): every gate also receives the previous activations of
  all gates, z_gate += R_gate [i_{t-1}; f_{t-1}; o_{t-1}], one H x H matrix per (gate, gate) pair, 9 for the
  full LSTM (``weight_gg``). The previous activations are then part of the recurrent state, which becomes
  ``(h, c, a)``: ``a`` of shape (num_layers, batch, S*H) holds each layer's last sigmoid-gate activations
  [i; f; o] (only the S gates that exist: 3 for ``fgr``, 2 with ``coupled``), zero when the state is None.
  Without FGR the state is ``(h, c)``. Either way a sequence run in chunks, the returned state handed to the
  next call, equals one run over the whole sequence.
* ``forget_bias`` initialises the forget gate's bias (Jozefowicz et al. 2015 recommend 1): it is written into
  ``bias_ih``'s forget slice, ``bias_hh``'s is zeroed, on the native path too. Default 0 (torch's init).

Greff, Srivastava, Koutník, Steunebrink, Schmidhuber 2017, "LSTM: A Search Space Odyssey": their vanilla
LSTM *has* peepholes (preset ``greff``, the same equations as ``peephole``); ``nig``, ``nfg``, ``nog``,
``niaf``, ``noaf``, ``np``, ``cifg`` (alias ``coupled``) and ``fgr`` each change one thing of it.
``np`` is therefore ``torch.nn.LSTM`` and runs natively. Greff's networks have one bias per gate; we keep
torch's two (``bias_ih`` + ``bias_hh``) so weights load from ``nn.LSTM`` state dicts unchanged.

Parameters per layer k, named as in torch (gate rows in torch's order i, f, g, o, absent gates left out):
``weight_ih_l{k}`` (G*H, in), ``weight_hh_l{k}`` (G*H, H), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (G*H),
``weight_peephole_l{k}`` (S, H) for the S sigmoid gates, ``weight_gg_l{k}`` (S*H, S*H) with FGR.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from variants import register

_GREFF = "Greff et al. 2017, LSTM: A Search Space Odyssey"


class NativeWeights(nn.Module):
    """Base of the variants with a native fused path (``self.native``): its weights, in torch's order,
    kept in one cuDNN buffer after ``.to()``/``.cuda()`` (see :func:`flatten_native`)."""

    cudnn_mode = ""  # "LSTM", "GRU"

    def _native_weights(self):
        """The fused kernel's weight list, torch's order: per layer weight_ih, weight_hh, bias_ih, bias_hh."""
        return [getattr(self, f"{n}_l{k}") for k in range(self.num_layers)
                for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.native:
            flatten_native(self, self.cudnn_mode)
        return out


class LSTM(NativeWeights):
    """Batch-first LSTM family; see the module docstring for the equations and switches.

    ``self.native`` is True when the switches leave torch's equations unchanged; the fused kernel is used
    then. Setting it to False forces the step-by-step loop (the tests do, to prove the loop is right).
    """

    cudnn_mode = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, *,
                 input_gate=True, forget_gate=True, output_gate=True, input_activation=True,
                 output_activation=True, peephole=False, coupled=False, full_gate_recurrence=False,
                 forget_bias=0.0):
        super().__init__()
        if coupled and not forget_gate:
            raise ValueError("LSTM: coupled=True sets f = 1 - i but forget_gate=False sets f = 1; pick one")
        if coupled and not input_gate:
            raise ValueError("LSTM: coupled=True needs the input gate (f = 1 - i); input_gate=False sets i = 1")
        if forget_bias and not forget_gate:
            raise ValueError("LSTM: forget_bias has no effect with forget_gate=False")
        sigmoid_gates = [n for n, on in (("i", input_gate), ("f", forget_gate and not coupled),
                                         ("o", output_gate)) if on]
        if (peephole or full_gate_recurrence) and not sigmoid_gates:
            raise ValueError("LSTM: peephole/full_gate_recurrence need at least one gate")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout = float(dropout)
        self.input_gate, self.forget_gate, self.output_gate = input_gate, forget_gate, output_gate
        self.input_activation, self.output_activation = input_activation, output_activation
        self.peephole, self.coupled, self.full_gate_recurrence = peephole, coupled, full_gate_recurrence
        self.forget_bias = float(forget_bias)
        self.native = (input_gate and forget_gate and output_gate and input_activation and output_activation
                       and not (peephole or coupled or full_gate_recurrence))

        # Row blocks of the fused gate matrices, torch order i, f, g, o; absent gates take no rows.
        self.gates = [g for g in ("i", "f", "g", "o") if g == "g" or g in sigmoid_gates]
        self.sigmoid_gates = sigmoid_gates
        H, G, S = hidden_size, len(self.gates), len(sigmoid_gates)
        # The loop works in the layout [sigmoid gates (i, f, o order), g], so the sigmoid gates and the FGR
        # inputs are contiguous; the weights are permuted into it once per call (rows of the torch layout).
        loop_order = [self.gates.index(g) for g in sigmoid_gates + ["g"]]
        self.register_buffer("_loop_rows", torch.tensor([j * H + r for j in loop_order for r in range(H)]),
                             persistent=False)
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G * H, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G * H)))
            if peephole:
                self.register_parameter(f"weight_peephole_l{k}", nn.Parameter(torch.empty(S, H)))
            if full_gate_recurrence:
                self.register_parameter(f"weight_gg_l{k}", nn.Parameter(torch.empty(S * H, S * H)))
        self.reset_parameters()

    def reset_parameters(self):
        """torch's init, U(-1/sqrt(H), 1/sqrt(H)) for everything, then the forget bias."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        if self.forget_bias:
            H = self.hidden_size
            gate, sign = ("i", -1.0) if self.coupled else ("f", 1.0)
            rows = slice(self.gates.index(gate) * H, (self.gates.index(gate) + 1) * H)
            with torch.no_grad():
                for k in range(self.num_layers):
                    getattr(self, f"bias_ih_l{k}")[rows] = sign * self.forget_bias
                    getattr(self, f"bias_hh_l{k}")[rows] = 0.0

    def _slices(self):
        """Column slices of gates i, f, g, o in the loop's layout (None for an absent gate)."""
        H = self.hidden_size
        at = {g: slice(j * H, (j + 1) * H) for j, g in enumerate(self.sigmoid_gates + ["g"])}
        return at.get("i"), at.get("f"), at["g"], at.get("o")

    def extra_repr(self):
        on = {k: v for k, v in _switches(self).items() if v != LSTM_DEFAULTS[k]}
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}, native={self.native}" + "".join(f", {k}={v}" for k, v in on.items()))

    def _state_sizes(self):
        """The last dimension of each state tensor: (H, H), plus S*H for the gate activations with FGR."""
        H = self.hidden_size
        return (H, H, len(self.sigmoid_gates) * H) if self.full_gate_recurrence else (H, H)

    def forward(self, x, state=None):
        B = x.shape[0]
        sizes = self._state_sizes()
        if state is None:
            state = tuple(x.new_zeros(self.num_layers, B, n) for n in sizes)
        if not isinstance(state, (tuple, list)) or len(state) != len(sizes):
            form = "(h, c, a) (full_gate_recurrence)" if len(sizes) == 3 else "(h, c)"
            got = f"a tuple of {len(state)}" if isinstance(state, (tuple, list)) else type(state).__name__
            raise ValueError(f"LSTM: state must be {form}, got {got}")
        h0, c0 = state[:2]
        a0 = state[2] if self.full_gate_recurrence else None
        if self.native:
            out, h, c = torch.lstm(x, (h0, c0), self._native_weights(), True, self.num_layers, self.dropout,
                                   self.training, False, True)
            return out, (h, c)
        x = x.transpose(0, 1)  # time-major inside: every step's slice is contiguous
        hs, cs, gs = [], [], []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, h, c, a = self._layer(k, x, h0[k], c0[k], a0[k] if a0 is not None else None)
            hs.append(h)
            cs.append(c)
            gs.append(a)
        state = (torch.stack(hs), torch.stack(cs))
        return x.transpose(0, 1), state + (torch.stack(gs),) if a0 is not None else state

    def _layer(self, k, x, h, c, a):
        """One layer: the input projection of all steps in one matmul, then the recurrence."""
        rows = self._loop_rows
        b = (getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}"))[rows]
        xp = F.linear(x, getattr(self, f"weight_ih_l{k}")[rows], b)  # (T, B, G*H)
        peep = getattr(self, f"weight_peephole_l{k}") if self.peephole else None
        w_gg = getattr(self, f"weight_gg_l{k}") if self.full_gate_recurrence else None
        return _Recurrence.apply(self, xp, h, c, a, getattr(self, f"weight_hh_l{k}")[rows], peep, w_gg)


class _Recurrence(torch.autograd.Function):
    """One LSTM-family layer's recurrence over precomputed input projections xp (T, B, G*H), gate layout
    [sigmoid gates, g] (see ``LSTM._slices``), with hand-written backpropagation through time. With FGR,
    a0 (B, S*H) are the sigmoid-gate activations before the first step, and the last step's are returned.

    The walk over time is :func:`recurrence_forward` / :func:`recurrence_backward`, shared with the population
    trainer (``studies/population.py``), which runs P stacked models through it with a leading member axis.
    The forward pass runs without autograd bookkeeping, in place in preallocated buffers. The backward pass
    walks time in reverse computing only the pre-activation gradients dZ and the state gradients; the weight
    gradients are then each one matmul over all steps, not T small ones. Every switch combination is checked
    against autograd on a plain loop of the equations and by gradcheck in tests/test_variants.py.
    """

    @staticmethod
    def forward(ctx, cell, xp, h0, c0, a0, w_hh, peep, w_gg):
        T, B, _ = xp.shape
        H = cell.hidden_size
        SH = cell._slices()[2].start
        acts = torch.empty_like(xp)                  # gate activations: σ(i), σ(f), tanh(g) or g, σ(o)
        cs = xp.new_empty(T + 1, B, H)               # c_{-1} = c0, c_0, ..., c_{T-1}
        hs = xp.new_empty(T + 1, B, H)
        cs[0], hs[0] = c0, h0
        ys = xp.new_empty(T, B, H) if cell.output_activation else cs[1:]  # the cell output (tanh(c) or c)
        w_hh_t, xps, h_prev = w_hh.t(), xp.unbind(0), hs.unbind(0)

        def project(t, out):                         # xp_t + h_{t-1} W_hh^T, into the step's activations
            torch.addmm(xps[t], h_prev[t], w_hh_t, out=out)

        recurrence_forward(cell, acts.unbind(0), cs.unbind(0), h_prev, ys.unbind(0), project, peep,
                           w_gg.t() if w_gg is not None else None, a0)
        ctx.cell = cell
        ctx.save_for_backward(acts, cs, hs, ys if cell.output_activation else None, w_hh, peep, w_gg, a0)
        aT = acts[T - 1, :, :SH].clone() if w_gg is not None else None
        return hs[1:], hs[T].clone(), cs[T].clone(), aT

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, d_cT, d_aT):
        cell = ctx.cell
        acts, cs, hs, ys, w_hh, peep, w_gg, a0 = ctx.saved_tensors
        if ys is None:
            ys = cs[1:]
        T, B, GH = acts.shape
        H = cell.hidden_size
        SH = cell._slices()[2].start
        dZ = torch.empty_like(acts)                  # gradients of the gate pre-activations
        dh = d_hT.clone() if d_hT is not None else hs.new_zeros(B, H)
        dc = d_cT.clone() if d_cT is not None else hs.new_zeros(B, H)
        da = None  # FGR: d loss / d (this step's sigmoid-gate activations), from the next step and d_aT
        if w_gg is not None:
            da = d_aT.clone() if d_aT is not None else hs.new_zeros(B, SH)
        recurrence_backward(cell, acts.unbind(0), cs.unbind(0), ys.unbind(0),
                            d_out.unbind(0) if d_out is not None else None, dZ.unbind(0), dh, dc, da, w_hh, peep,
                            w_gg)
        flat = dZ.view(T * B, GH)
        # (h^T dZ)^T, not dZ^T h: BLAS ran the latter (a transposed T*B-row operand first) ~3x slower (measured).
        d_w_hh = (hs[:-1].reshape(T * B, H).t() @ flat).t()
        d_peep, d_w_gg = recurrence_small_grads(cell, dZ, cs, peep is not None,
                                                (acts[:-1, :, :SH], a0) if w_gg is not None else None)
        return None, dZ, dh, dc, da, d_w_hh, d_peep, d_w_gg


# The walk over time, shared by one model (steps (B, .), weights (m, n)) and the population trainer's P stacked
# models (a leading member axis: steps (P, B, .), weights (P, m, n)). The walk takes its buffers as sequences of
# per-step views (``unbind`` of the time axis, wherever the caller's layout puts it). Elementwise ops broadcast
# alike; the matmuls are torch.mm / addmm for one model and torch.bmm / baddbmm for P, so one model runs exactly
# the ops it always did.

def _mm(a, b, out):
    """out = a @ b: torch.mm for matrices, torch.bmm for stacks of them."""
    return torch.mm(a, b, out=out) if a.dim() == 2 else torch.bmm(a, b, out=out)


def _addmm_(out, a, b):
    """out += a @ b, in place (``addmm_`` / ``baddbmm_``)."""
    return out.addmm_(a, b) if a.dim() == 2 else out.baddbmm_(a, b)


def _addmm(c, a, b, out=None):
    """c + a @ b (``addmm`` / ``baddbmm``), into ``out`` if given."""
    return torch.addmm(c, a, b, out=out) if a.dim() == 2 else torch.baddbmm(c, a, b, out=out)


def _transposed(w):
    """w^T for a step's matmul: a view for one model's (m, n); a population's (P, m, n) stack made contiguous
    (CPU bmm copies a transposed operand at every call otherwise)."""
    return w.t() if w.dim() == 2 else w.transpose(1, 2).contiguous()


def _peephole_rows(cell, peep):
    """p_i, p_f, p_o (None where a gate or the peepholes are absent) and the i, f block p_if, shaped to
    broadcast against one step's (B, H) (one model, peep (S, H)) or (P, B, H) (population, peep (P, S, H))."""
    if peep is None:
        return None, None, None, None
    rows = peep.unsqueeze(-2).unbind(-3)        # each (1, H) or (P, 1, H)
    p = dict(zip(cell.sigmoid_gates, rows))
    K = ("i" in p) + ("f" in p)               # i and f lead the layout
    p_if = peep[..., :K, :].unsqueeze(-3) if K else None  # (1, K, H) or (P, 1, K, H)
    return p.get("i"), p.get("f"), p.get("o"), p_if


def recurrence_forward(cell, acts, cs, hs, ys, project, peep, w_gg_t, a0, tanh_via_sigmoid=False):
    """The forward walk over time of one LSTM-family layer, in place; one model or P stacked members.

    ``cell`` gives the switches and sizes. Buffers, as sequences of per-step views of shape (B, .) for one
    model, (P, B, .) for a population: ``acts`` (T steps of (B, G*H)) receives the gate activations in the
    loop's layout [sigmoid gates (i, f, o order), g]; ``cs``, ``hs`` (T+1 steps of (B, H)) hold the initial cell
    and hidden state at index 0 and receive c_t, h_t at t+1; ``ys`` (T steps) receives the cell output tanh(c_t)
    (``cs[1:]`` itself without output activation). ``project(t, out)`` writes step t's pre-activations without
    the FGR term into ``out`` = ``acts[t]``: the input projection of x_t plus h_{t-1} W_hh^T (h_{t-1} is
    ``hs[t]``). ``peep`` (S, H), ``w_gg_t`` (S*H, S*H) (FGR's matrix, transposed), ``a0`` (B, S*H) (FGR's
    activations before the first step), each with the member axis first for a population, or None.
    ``tanh_via_sigmoid``: compute tanh as 2σ(2x) - 1 (the population trainer's choice on the CPU; one model
    keeps torch.tanh).
    """
    H = cell.hidden_size
    si, sf, sg, so = cell._slices()
    SH = sg.start                                # the sigmoid gates come first
    K = (si is not None) + (sf is not None)      # i and f, the gates before the cell update
    KH = K * H
    p_o, p_if = _peephole_rows(cell, peep)[2:]
    prev_sig = a0                                # FGR: the sigmoid-gate activations of the step before
    for t, a in enumerate(acts):
        c_prev, c, y = cs[t], cs[t + 1], ys[t]
        project(t, a)
        if w_gg_t is not None:
            _addmm_(a[..., :SH], prev_sig, w_gg_t)
            prev_sig = a[..., :SH]
        if KH:  # i and f lead the layout: one peephole op and one sigmoid for both
            z_if = a[..., :KH]
            if p_if is not None:
                z_if.unflatten(-1, (K, H)).addcmul_(p_if, c_prev.unsqueeze(-2))
            z_if.sigmoid_()
        i = a[..., si] if si is not None else None
        f = a[..., sf] if sf is not None else None
        g = a[..., sg]
        if cell.input_activation:
            if tanh_via_sigmoid:
                _tanh_via_sigmoid(g, out=g)
            else:
                g.tanh_()
        if f is not None:
            torch.mul(f, c_prev, out=c)
        elif cell.coupled:                       # f = 1 - i
            torch.addcmul(c_prev, i, c_prev, value=-1.0, out=c)
        else:
            c.copy_(c_prev)
        if i is not None:
            c.addcmul_(i, g)
        else:
            c.add_(g)
        if cell.output_activation:
            if tanh_via_sigmoid:
                _tanh_via_sigmoid(c, out=y)
            else:
                torch.tanh(c, out=y)
        if so is not None:
            o = a[..., so]
            if p_o is not None:
                o.addcmul_(p_o, c)
            o.sigmoid_()
            torch.mul(o, y, out=hs[t + 1])
        else:
            hs[t + 1].copy_(y)


def recurrence_backward(cell, acts, cs, ys, d_out, dZ, dh, dc, da, w_hh, peep, w_gg, peep_grads=None):
    """The backward walk of :func:`recurrence_forward`, time reversed, over the same per-step views: fills
    ``dZ`` (T steps, shaped as ``acts``'s) with the gradients of the gate pre-activations. ``dh``, ``dc`` (B, H)
    and, with FGR, ``da`` (B, S*H) (member axis first for a population) hold the gradients w.r.t. the final state
    on entry and w.r.t. the initial state on return. ``d_out`` (T steps): the gradient w.r.t. each step's h, or
    None. ``w_hh`` (G*H, H) and ``w_gg`` (S*H, S*H) untransposed. ``peep_grads``: None, or accumulators
    (g_i, g_f, g_o), each (B, H) or None, into which the walk adds dz_gate ⊙ (the cell the gate's peephole
    sees) at every step (the population trainer's way to the peephole gradients; one model sums them after
    the walk, :func:`recurrence_small_grads`)."""
    H = cell.hidden_size
    si, sf, sg, so = cell._slices()
    SH = sg.start
    KH = ((si is not None) + (sf is not None)) * H
    p_i, p_f, p_o, _ = _peephole_rows(cell, peep)
    for t in reversed(range(len(acts))):
        if d_out is not None:
            dh.add_(d_out[t])
        a, dz, c_prev, y = acts[t], dZ[t], cs[t], ys[t]
        i = a[..., si] if si is not None else None
        f = a[..., sf] if sf is not None else None
        g = a[..., sg]
        if so is not None:
            o, dzo = a[..., so], dz[..., so]
            torch.mul(dh, y, out=dzo)
            if da is not None:
                dzo.add_(da[..., so])
            _sigmoid_backward(dzo, o, out=dzo)
            dy = dh * o
        else:
            dy = dh
        if cell.output_activation:
            dc.add_(_tanh_backward(dy, y, out=dy if so is not None else None))
        else:
            dc.add_(dy)
        if p_o is not None:
            dc.addcmul_(dzo, p_o)
        dzg = dz[..., sg]
        if i is not None:
            torch.mul(dc, i, out=dzg)
        else:
            dzg.copy_(dc)
        if cell.input_activation:
            _tanh_backward(dzg, g, out=dzg)
        if i is not None:
            dzi = dz[..., si]
            torch.mul(dc, g, out=dzi)
            if cell.coupled:
                dzi.addcmul_(dc, c_prev, value=-1.0)
        if f is not None:
            dzf = dz[..., sf]
            torch.mul(dc, c_prev, out=dzf)
        if KH:  # σ' for i and f together
            dz_if = dz[..., :KH]
            if da is not None:
                dz_if.add_(da[..., :KH])
            _sigmoid_backward(dz_if, a[..., :KH], out=dz_if)
        if f is not None:
            dc.mul_(f)                            # now dc is d loss / d c_{t-1}
        elif cell.coupled:
            dc.mul_(1.0 - i)
        if peep_grads is not None:
            g_i, g_f, g_o = peep_grads
            if g_i is not None:
                g_i.addcmul_(dzi, c_prev)
            if g_f is not None:
                g_f.addcmul_(dzf, c_prev)
            if g_o is not None:
                g_o.addcmul_(dzo, cs[t + 1])
        if p_i is not None:
            dc.addcmul_(dzi, p_i)
        if p_f is not None:
            dc.addcmul_(dzf, p_f)
        _mm(dz, w_hh, out=dh)                     # d loss / d h_{t-1}, before adding d_out[t-1]
        if da is not None:
            _mm(dz[..., :SH], w_gg, out=da)


def recurrence_small_grads(cell, dZ, cs, peephole, fgr):
    """The gradients of the peepholes (S, H) and of FGR's matrix (S*H, S*H) (None where absent), member axis
    first for a population, from :func:`recurrence_backward`'s dZ (T, B, G*H) and the cells ``cs`` (T+1, B, H)
    ((P, T, ...), (P, T+1, ...) for a population). ``fgr``: None, or (prev, a0) with ``prev`` (T-1, B, S*H)
    ((P, T-1, ...)) the sigmoid-gate activations of steps 0 .. T-2 and ``a0`` those before step 0."""
    si, sf, sg, so = cell._slices()
    SH = sg.start
    pop = dZ.dim() == 4
    steps = (1, 2) if pop else (0, 1)           # the time and batch axes
    d_peep = d_w_gg = None
    if peephole:
        c_before, c_after = (cs[:, :-1], cs[:, 1:]) if pop else (cs[:-1], cs[1:])
        rows = []
        for gate, sl in (("i", si), ("f", sf), ("o", so)):
            if sl is not None:
                cell_seen = c_after if gate == "o" else c_before  # o peeks at c_t, i and f at c_{t-1}
                rows.append((dZ[..., sl] * cell_seen).sum(steps))
        d_peep = torch.stack(rows, -2)
    if fgr is not None:  # step t's gates hear step t-1's activations; step 0's hear a0
        prev, a0 = fgr
        z0, z_rest = (dZ[:, 0], dZ[:, 1:]) if pop else (dZ[0], dZ[1:])
        d_w_gg_t = a0.transpose(-1, -2) @ z0[..., :SH]
        flat = (lambda u: u.reshape(u.shape[0], -1, SH)) if pop else (lambda u: u.reshape(-1, SH))
        _addmm_(d_w_gg_t, flat(prev).transpose(-1, -2), flat(z_rest[..., :SH]))
        d_w_gg = d_w_gg_t.transpose(-1, -2)
    return d_peep, d_w_gg


def flatten_native(module, mode):
    """On CUDA, make ``module._native_weights()`` views of one contiguous buffer in cuDNN's layout, as
    ``torch.nn.RNNBase.flatten_parameters`` does for nn.LSTM; otherwise cuDNN repacks them at every call (and
    warns). A no-op on the CPU, with mixed dtypes, or where cuDNN cannot take the weights. ``mode``: "LSTM",
    "GRU". Optimizers update parameters in place, so the views stay views."""
    weights = module._native_weights()
    first = weights[0]
    if not all(w.is_cuda and w.dtype == first.dtype and torch.backends.cudnn.is_acceptable(w) for w in weights):
        return
    if len({w.data_ptr() for w in weights}) != len(weights):
        return
    from torch.backends.cudnn import rnn as cudnn_rnn
    with torch.cuda.device_of(first), torch.no_grad():
        if torch._use_cudnn_rnn_flatten_weight():
            torch._cudnn_rnn_flatten_weight(weights, 4, module.input_size, cudnn_rnn.get_cudnn_mode(mode),
                                            module.hidden_size, 0, module.num_layers, True, False)


def _sigmoid_backward(grad, s, out):
    """grad ⊙ s ⊙ (1 - s) in one pass (ATen's fused derivative of σ, given its output s); out may alias grad."""
    return torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=out)


def _tanh_via_sigmoid(x, out):
    """tanh(x) = 2 σ(2x) - 1, into out (may be x): on the CPU torch's σ ran 3.6x faster than its tanh (measured)."""
    return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)


def _tanh_backward(grad, y, out=None):
    """grad ⊙ (1 - y²) in one pass (ATen's fused derivative of tanh, given its output y); out may alias grad."""
    if out is None:
        return torch.ops.aten.tanh_backward(grad, y)
    return torch.ops.aten.tanh_backward.grad_input(grad, y, grad_input=out)


LSTM_DEFAULTS = dict(input_gate=True, forget_gate=True, output_gate=True, input_activation=True,
                     output_activation=True, peephole=False, coupled=False, full_gate_recurrence=False,
                     forget_bias=0.0)


def _switches(m):
    return {k: getattr(m, k) for k in LSTM_DEFAULTS}


# Short names. Presets only fix switches; a study file may still set any switch on any of them.
_reg = [
    ("lstm", "LSTM with forget gate, no peepholes (torch.nn.LSTM; native kernel)",
     "Hochreiter & Schmidhuber 1997; Gers et al. 2000", {}),
    ("peephole", "LSTM with diagonal peepholes (i, f see c_{t-1}; o sees c_t)",
     "Gers & Schmidhuber 2000", dict(peephole=True)),
    ("greff", "Greff's vanilla LSTM: forget gate and peepholes (same equations as peephole)",
     _GREFF, dict(peephole=True)),
    ("cifg", "Coupled input-forget gate, f = 1 - i (Greff's CIFG: vanilla with peepholes)",
     _GREFF, dict(peephole=True, coupled=True)),
    ("coupled", "Alias of cifg: f = 1 - i, with peepholes", _GREFF, dict(peephole=True, coupled=True)),
    ("nig", "Greff vanilla without input gate (i = 1)", _GREFF, dict(peephole=True, input_gate=False)),
    ("nfg", "Greff vanilla without forget gate (f = 1)", _GREFF, dict(peephole=True, forget_gate=False)),
    ("nog", "Greff vanilla without output gate (o = 1)", _GREFF, dict(peephole=True, output_gate=False)),
    ("niaf", "Greff vanilla without input activation (g linear)", _GREFF,
     dict(peephole=True, input_activation=False)),
    ("noaf", "Greff vanilla without output activation (h = o * c)", _GREFF,
     dict(peephole=True, output_activation=False)),
    ("np", "Greff vanilla without peepholes (= torch.nn.LSTM; native kernel)", _GREFF, dict(peephole=False)),
    ("fgr", "Greff vanilla with full gate recurrence (9 extra H x H matrices)", _GREFF,
     dict(peephole=True, full_gate_recurrence=True)),
]
for _name, _desc, _paper, _preset in _reg:
    register(_name, description=_desc, paper=_paper, **_preset)(LSTM)
