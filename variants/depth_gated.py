"""Depth-gated LSTM (Yao, Cohn, Vylomova, Duh, Dyer 2015, "Depth-Gated LSTM").

A stacked LSTM whose layer L also receives, through a depth gate d, the cell of the layer below at the
same step::

    i, f, o = σ(W_· x_t + U_· h_{t-1} + b_·)                    (torch.nn.LSTM's gates, no peepholes)
    g = tanh(W_g x_t + U_g h_{t-1} + b_g)
    d = σ(b_d + w_ld ⊙ c_t^{L-1} + W_xd x_t + w_cd ⊙ c_{t-1}^L)   depth gate
    c_t^L = f ⊙ c_{t-1}^L + i ⊙ g + d ⊙ c_t^{L-1}
    h_t^L = o ⊙ tanh(c_t^L)

x_t is the layer's input (h_t^{L-1}, after inter-layer dropout; the cell c_t^{L-1} passed up is not
dropped out). Conventions, against the paper's official code:

* Lowest layer: it has no lower cell; like the official code we use a linear projection of the input in
  its place, c_t^0 := W_proj x_t (``weight_proj``, no bias), so every layer has a depth gate.
* Forget gate: separate, not coupled (the shipped code couples f = 1 - i; the paper's equations don't).
* Peepholes: only the depth gate's two diagonal ones, w_ld and w_cd, as the paper's equation writes them
  (vectors; the shipped code uses full matrices). i, f, o have none, as in torch.nn.LSTM.

So with the depth gate shut (d = 0) the network is exactly a stacked torch.nn.LSTM: the tests check this.

Parameters per layer k, named as in torch: ``weight_ih_l{k}`` (5H, in) rows i, f, g, o, d; ``weight_hh_l{k}``
(4H, H) rows i, f, g, o (d has no h input); ``bias_ih_l{k}`` (5H, the d slice is b_d); ``bias_hh_l{k}`` (4H);
``weight_ld_l{k}``, ``weight_cd_l{k}`` (H); ``weight_proj`` (H, input_size).
``forget_bias`` initialises the forget slice of ``bias_ih`` (``bias_hh``'s is zeroed), as for ``lstm``.

Speed: each layer is one autograd Function (``_Recurrence``) with backpropagation through time written by
hand, as for the LSTM family: the input projection of all steps is one matmul, and the depth gate's terms
that do not depend on the layer's own state (b_d, W_xd x_t, w_ld ⊙ c_t^{L-1}; for the lowest layer the
projection of the input) are added for all steps at once, before the walk over time. (A population of P
models, ``studies/population.py``, walks time-major activations instead: see ``_population_buffers``.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from variants import register
# _sigmoid_backward, _tanh_backward: ATen's fused σ' and tanh'; the others serve one model and a population alike
from variants.lstm import _addmm_, _mm, _sigmoid_backward, _tanh_backward, _tanh_via_sigmoid


@register("depth_gated", description="Depth-gated LSTM: gated cell-to-cell path between stacked layers",
          paper="Yao et al. 2015, Depth-Gated LSTM")
class DepthGatedLSTM(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, *, forget_bias=0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.forget_bias = float(dropout), float(forget_bias)
        H = hidden_size
        self.weight_proj = nn.Parameter(torch.empty(H, input_size))
        # The recurrence works in the gate layout [o, i, f, g, d] (see _Recurrence): rows of the torch layout
        # [i, f, g, o, d], gathered once per call; the first 4H of them are also weight_hh's (it has no d rows).
        self.register_buffer("_rows", torch.tensor([j * H + r for j in (3, 0, 1, 2, 4) for r in range(H)]),
                             persistent=False)
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(5 * H, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(5 * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * H)))
            self.register_parameter(f"weight_ld_l{k}", nn.Parameter(torch.empty(H)))
            self.register_parameter(f"weight_cd_l{k}", nn.Parameter(torch.empty(H)))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        if self.forget_bias:
            H = self.hidden_size
            with torch.no_grad():
                for k in range(self.num_layers):
                    getattr(self, f"bias_ih_l{k}")[H:2 * H] = self.forget_bias
                    getattr(self, f"bias_hh_l{k}")[H:2 * H] = 0.0

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}, "
                f"forget_bias={self.forget_bias}")

    def forward(self, x, state=None):
        if state is None:
            z = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
            state = (z, z)
        h0, c0 = state
        x = x.transpose(0, 1)  # time-major inside: every step's slice is contiguous
        lower_cells = F.linear(x, self.weight_proj)  # (T, B, H): stands in for c^{-1}
        hs, cs = [], []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, lower_cells, h, c = self._layer(k, x, lower_cells, h0[k], c0[k])
            hs.append(h)
            cs.append(c)
        return x.transpose(0, 1), (torch.stack(hs), torch.stack(cs))

    def _layer(self, k, x, lower_cells, h, c):
        """One layer over time: the hidden outputs and cells of every step (the cells feed the layer above)
        and the final h, c."""
        return _Recurrence.apply(x, lower_cells, h, c, *layer_weights(self, k, lambda name: getattr(self, name)))


def layer_weights(cell, k, weight, rows=None):
    """Layer k's arguments to ``_Recurrence`` after (x, lower, h0, c0), rows permuted into its gate layout:
    w_ih, b (b_ih + b_hh, none for d), w_hh, w_ld, w_cd. ``weight(name)`` gives a parameter by its name in
    ``cell``: one model's, or a population's stacked (P, ...) ones, with ``rows`` (``cell._rows``) on its device."""
    H, rows = cell.hidden_size, cell._rows if rows is None else rows
    b = weight(f"bias_ih_l{k}") + F.pad(weight(f"bias_hh_l{k}"), (0, H))
    return (weight(f"weight_ih_l{k}")[..., rows, :], b[..., rows], weight(f"weight_hh_l{k}")[..., rows[:4 * H], :],
            weight(f"weight_ld_l{k}"), weight(f"weight_cd_l{k}"))


class _Recurrence(torch.autograd.Function):
    """One depth-gated layer over time-major x (T, B, in), with hand-written backpropagation through time
    (the scheme of the LSTM family's ``lstm._Recurrence``, plus the depth gate and the input projection).
    The same walk serves P stacked models (``studies/population.py``): every tensor then has a leading member
    axis, x (P, T, B, in), the weights (P, m, n) and (P, H), and the matmuls are batched (``bmm``/``baddbmm``).

    Gate layout inside: [o, i, f, g, d], H columns each. The input projection of all steps is one matmul,
    written straight into the activation buffer; d's pre-activation gets w_ld ⊙ c_t^{L-1} for all steps at
    once, w_cd ⊙ c_{t-1} per step; the recurrent matmul adds into the first 4H columns (a population's forward
    computes each step's pre-activations in one matmul instead: :func:`_population_buffers`). The forward pass runs
    without autograd bookkeeping, in place, walking per-step views made once. The backward pass walks time in
    reverse computing only the pre-activation gradients dZ and the state gradients; the weight and input
    gradients are then matmuls over a chunk of steps at a time. Checked against autograd on the plain
    equations and by gradcheck in tests/test_variants.py.
    """

    @staticmethod
    def forward(ctx, x, lower, h0, c0, w_ih, b, w_hh, w_ld, w_cd):
        ctx.set_materialize_grads(False)  # the top layer's cells go nowhere: no zeros to add at every step
        x = x.contiguous()  # layer 0's is a transposed view of the batch-first input
        *lead, T, B, n_in = x.shape  # lead: () for one model, (P,) for a population
        tax = len(lead)              # the time axis
        H = w_hh.shape[-1]
        cs = x.new_empty(*lead, T + 1, B, H)  # c_{-1} = c0, c_0, ..., c_{T-1}
        ys = x.new_empty(*lead, T, B, H)      # tanh(c_t)
        cs.select(tax, 0).copy_(c0)
        if lead:  # a population: see _population_buffers
            acts, hs, project, tanh = _population_buffers(x, lower, h0, w_ih, b, w_hh, w_ld)
        else:
            # The pre-activations, made activations in place: σ(o), σ(i), σ(f), tanh(g), σ(d).
            acts = torch.addmm(b, x.view(T * B, n_in), w_ih.t()).view(T, B, 5 * H)
            acts[..., 4 * H:].addcmul_(w_ld, lower)
            hs = x.new_empty(T + 1, B, H)
            hs[0].copy_(h0)
            z_rec, w_hh_t = acts[..., :4 * H].unbind(0), w_hh.t()

            def project(t):  # the recurrent term of step t
                z_rec[t].addmm_(hs[t], w_hh_t)

            def tanh(a, out):
                return torch.tanh(a, out=out)
        w_cd_b = _per(w_cd, 1)
        o, i, f, g, d = (a.unbind(tax) for a in acts.split(H, -1))
        z_sig = acts[..., :3 * H].unbind(tax)
        for t, (lower_t, c_prev, c, y, h) in enumerate(zip(*(u.unbind(tax) for u in (
                lower, cs, cs.narrow(tax, 1, T), ys, hs.narrow(tax, 1, T))))):
            project(t)
            d[t].addcmul_(w_cd_b, c_prev).sigmoid_()
            z_sig[t].sigmoid_()  # o, i, f
            tanh(g[t], g[t])
            torch.mul(f[t], c_prev, out=c)
            c.addcmul_(i[t], g[t]).addcmul_(d[t], lower_t)
            tanh(c, y)
            torch.mul(o[t], y, out=h)
        ctx.save_for_backward(x, acts, cs, hs, ys, lower, w_ih, w_hh, w_ld, w_cd)
        return hs.narrow(tax, 1, T), cs.narrow(tax, 1, T), hs.select(tax, T).clone(), cs.select(tax, T).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_cells, d_hT, d_cT):
        x, acts, cs, hs, ys, lower, w_ih, w_hh, w_ld, w_cd = ctx.saved_tensors
        *lead, T, B, H5 = acts.shape
        tax = len(lead)
        H = H5 // 5
        # Per step, with the factors K that do not depend on the gradients:
        #   dz_o = dh ⊙ K_o;  dc_t = dc + dh ⊙ K_c;  dz_[i, f, g, d] = dc_t ⊙ K_[i, f, g, d]
        # The K are written into dZ itself (then scaled in place), a chunk of steps at a time, and the chunk's
        # weight and input gradients follow while it is in cache: no T-long temporaries, whose first touch
        # (page faults) costs on CPU about as much as the walk itself (measured).
        dZ = acts.new_empty(acts.shape)  # member-major for a population (its acts are time-major)
        k_c = hs.new_empty(*lead, _CHUNK, B, H)
        d_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        d_lower = lower.new_empty(lower.shape)
        d_w_ih_t, d_b = w_ih.new_zeros(*lead, x.shape[-1], H5), w_ih.new_zeros(*lead, H5)  # weights' gradients
        d_w_hh_t = w_hh.new_zeros(*lead, H, 4 * H)  # transposed: BLAS ran dZ^T h (a strided transpose) 3x slower
        d_w_ld, d_w_cd = torch.zeros_like(w_ld), torch.zeros_like(w_cd)  # than h^T dZ
        dh = d_hT.clone() if d_hT is not None else hs.new_zeros(*lead, B, H)
        dc = d_cT.clone() if d_cT is not None else hs.new_zeros(*lead, B, H)
        dc_col = dc.unsqueeze(-2)
        w_ld_b, w_cd_b = _per(w_ld, 2), _per(w_cd, 1)
        dz_rec = dZ[..., :4 * H].unbind(tax)
        dz_o, dz_d = dZ[..., :H].unbind(tax), dZ[..., 4 * H:].unbind(tax)
        dz_ifgd = dZ[..., H:].unflatten(-1, (4, H)).unbind(tax)
        k_cs = k_c.unbind(tax)
        d_out = d_out.unbind(tax) if d_out is not None else None
        d_cells = d_cells.unbind(tax) if d_cells is not None else None
        d_gate, f_gate, d_low = (u.unbind(tax) for u in (acts[..., 4 * H:], acts[..., 2 * H:3 * H], d_lower))
        for start in reversed(range(0, T, _CHUNK)):
            n = min(_CHUNK, T - start)
            o, i, f, g, d = acts.narrow(tax, start, n).split(H, -1)
            dZ_n = dZ.narrow(tax, start, n)
            K_o, K_i, K_f, K_g, K_d = dZ_n.split(H, -1)
            c_prev, y, low = (u.narrow(tax, start, n) for u in (cs, ys, lower))
            _sigmoid_backward(y, o, out=K_o)         # tanh(c) σ'(o)
            _tanh_backward(o, y, out=k_c.narrow(tax, 0, n))  # o tanh'(c)
            _sigmoid_backward(g, i, out=K_i)
            _sigmoid_backward(c_prev, f, out=K_f)
            _tanh_backward(i, g, out=K_g)
            _sigmoid_backward(low, d, out=K_d)
            for t in reversed(range(start, start + n)):
                if d_out is not None:
                    dh.add_(d_out[t])
                if d_cells is not None:
                    dc.add_(d_cells[t])
                dz_o[t].mul_(dh)
                dc.addcmul_(dh, k_cs[t - start])       # now dc is d loss / d c_t
                dz_ifgd[t].mul_(dc_col)
                torch.mul(dc, d_gate[t], out=d_low[t])
                dc.mul_(f_gate[t]).addcmul_(dz_d[t], w_cd_b)  # d loss / d c_{t-1}, before adding d_cells[t-1]
                _mm(dz_rec[t], w_hh, out=dh)           # d loss / d h_{t-1}, before adding d_out[t-1]
            dz = dZ_n.reshape(*lead, n * B, H5)
            dz_d_c = dZ_n[..., 4 * H:]
            d_lower.narrow(tax, start, n).addcmul_(dz_d_c, w_ld_b)
            d_w_ld.add_((dz_d_c * low).sum((tax, tax + 1)))
            d_w_cd.add_((dz_d_c * c_prev).sum((tax, tax + 1)))
            _addmm_(d_w_hh_t, hs.narrow(tax, start, n).reshape(*lead, n * B, H).transpose(-1, -2), dz[..., :4 * H])
            _addmm_(d_w_ih_t, x.narrow(tax, start, n).reshape(*lead, n * B, -1).transpose(-1, -2), dz)
            d_b.add_(dz.sum(-2))
            if d_x is not None:
                _mm(dz, w_ih, out=d_x.narrow(tax, start, n).view(*lead, n * B, -1))
        return d_x, d_lower, dh, dc, d_w_ih_t.transpose(-1, -2), d_b, d_w_hh_t.transpose(-1, -2), d_w_ld, d_w_cd


def _population_buffers(x, lower, h0, w_ih, b, w_hh, w_ld):
    """A population's forward buffers and per-step ops (CPU-minded, as ``studies.population._LSTMRecurrence``):
    the activations are time-major, (T, P, B, 5H) seen as (P, T, B, 5H), and step t's pre-activations are one
    ``baddbmm`` of [x_t, h_{t-1}] with [W_ih; W_hh]^T (zeros for d, which has no h input) into that contiguous
    block: torch's CPU baddbmm ran one addmm per member into a member-strided slice, and the input projection of
    all steps went through memory once more. hs, (P, T+1, B, H), lives in the [x_t, h_{t-1}] buffer. On the CPU
    tanh is 2σ(2x) - 1 (``_tanh_via_sigmoid``). Returns acts, hs, project(t), tanh(a, out)."""
    P, T, B, n_in = x.shape
    H = w_hh.shape[-1]
    xh = x.new_empty(P, T + 1, B, n_in + H)  # [x_t, h_{t-1}] at t; row T holds h_{T-1}
    xh[:, :T, :, :n_in] = x
    xh[:, T, :, :n_in] = 0
    hs = xh[..., n_in:]
    hs[:, 0] = h0
    w = torch.cat([w_ih, F.pad(w_hh, (0, 0, 0, H))], 2).transpose(1, 2).contiguous()  # (P, in+H, 5H)
    acts = x.new_empty(T, P, B, 5 * H)
    b_row, w_ld_b, xh_t, lower_t = b.unsqueeze(1), _per(w_ld, 1), xh.unbind(1), lower.unbind(1)

    def project(t):
        torch.baddbmm(b_row, xh_t[t], w, out=acts[t])[..., 4 * H:].addcmul_(w_ld_b, lower_t[t])

    def tanh(a, out):
        return _tanh_via_sigmoid(a, out) if x.device.type == "cpu" else torch.tanh(a, out=out)
    return acts.transpose(0, 1), hs, project, tanh


_CHUNK = 8  # steps whose backward factors and weight gradients are computed together


def _per(v, k):
    """A per-unit vector (H) or a population's (P, H) shaped to broadcast over k more axes (batch, time)."""
    return v if v.dim() == 1 else v.view(v.shape[0], *(1,) * k, v.shape[1])
