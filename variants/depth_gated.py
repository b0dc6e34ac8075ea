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
projection of the input) are added for all steps at once, before the walk over time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from variants import register
from variants.lstm import _sigmoid_backward, _tanh_backward  # ATen's fused σ' and tanh'


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
        and the final h, c. The weights' rows are permuted into the recurrence's gate layout."""
        H, rows = self.hidden_size, self._rows
        b = getattr(self, f"bias_ih_l{k}") + F.pad(getattr(self, f"bias_hh_l{k}"), (0, H))
        return _Recurrence.apply(x, lower_cells, h, c, getattr(self, f"weight_ih_l{k}")[rows], b[rows],
                                 getattr(self, f"weight_hh_l{k}")[rows[:4 * H]],
                                 getattr(self, f"weight_ld_l{k}"), getattr(self, f"weight_cd_l{k}"))


class _Recurrence(torch.autograd.Function):
    """One depth-gated layer over time-major x (T, B, in), with hand-written backpropagation through time
    (the scheme of the LSTM family's ``lstm._Recurrence``, plus the depth gate and the input projection).

    Gate layout inside: [o, i, f, g, d], H columns each. The input projection of all steps is one matmul,
    written straight into the activation buffer; d's pre-activation gets w_ld ⊙ c_t^{L-1} for all steps at
    once, w_cd ⊙ c_{t-1} per step; the recurrent matmul adds into the first 4H columns. The forward pass runs
    without autograd bookkeeping, in place, walking per-step views made once. The backward pass walks time in
    reverse computing only the pre-activation gradients dZ and the state gradients; the weight and input
    gradients are then matmuls over a chunk of steps at a time. Checked against autograd on the plain
    equations and by gradcheck in tests/test_variants.py.
    """

    @staticmethod
    def forward(ctx, x, lower, h0, c0, w_ih, b, w_hh, w_ld, w_cd):
        ctx.set_materialize_grads(False)  # the top layer's cells go nowhere: no zeros to add at every step
        x = x.contiguous()  # layer 0's is a transposed view of the batch-first input
        T, B, _ = x.shape
        H = w_hh.shape[1]
        # The pre-activations, made activations in place: σ(o), σ(i), σ(f), tanh(g), σ(d).
        acts = torch.addmm(b, x.reshape(T * B, -1), w_ih.t()).view(T, B, 5 * H)
        acts[..., 4 * H:].addcmul_(w_ld, lower)
        cs = x.new_empty(T + 1, B, H)  # c_{-1} = c0, c_0, ..., c_{T-1}
        hs = x.new_empty(T + 1, B, H)
        ys = x.new_empty(T, B, H)      # tanh(c_t)
        cs[0], hs[0] = c0, h0
        w_hh_t = w_hh.t()
        o, i, f, g, d = (a.unbind(0) for a in acts.split(H, -1))
        z_rec, z_sig = acts[..., :4 * H].unbind(0), acts[..., :3 * H].unbind(0)
        for t, (lower_t, h_prev, c_prev, c, y, h) in enumerate(zip(
                lower.unbind(0), hs.unbind(0), cs.unbind(0), cs[1:].unbind(0), ys.unbind(0), hs[1:].unbind(0))):
            z_rec[t].addmm_(h_prev, w_hh_t)
            d[t].addcmul_(w_cd, c_prev).sigmoid_()
            z_sig[t].sigmoid_()  # o, i, f
            g[t].tanh_()
            torch.mul(f[t], c_prev, out=c)
            c.addcmul_(i[t], g[t]).addcmul_(d[t], lower_t)
            torch.tanh(c, out=y)
            torch.mul(o[t], y, out=h)
        ctx.save_for_backward(x, acts, cs, hs, ys, lower, w_ih, w_hh, w_ld, w_cd)
        return hs[1:], cs[1:], hs[T].clone(), cs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_cells, d_hT, d_cT):
        x, acts, cs, hs, ys, lower, w_ih, w_hh, w_ld, w_cd = ctx.saved_tensors
        T, B, H5 = acts.shape
        H = H5 // 5
        # Per step, with the factors K that do not depend on the gradients:
        #   dz_o = dh ⊙ K_o;  dc_t = dc + dh ⊙ K_c;  dz_[i, f, g, d] = dc_t ⊙ K_[i, f, g, d]
        # The K are written into dZ itself (then scaled in place), a chunk of steps at a time, and the chunk's
        # weight and input gradients follow while it is in cache: no T-long temporaries, whose first touch
        # (page faults) costs on CPU about as much as the walk itself (measured).
        dZ = torch.empty_like(acts)
        k_c = hs.new_empty(_CHUNK, B, H)
        d_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        d_lower = lower.new_empty(lower.shape)
        d_w_ih_t, d_b = w_ih.new_zeros(x.shape[2], H5), w_ih.new_zeros(H5)  # weights' gradients transposed:
        d_w_hh_t = w_hh.new_zeros(H, 4 * H)  # BLAS ran dZ^T h (a strided transpose) 3x slower than h^T dZ
        d_w_ld, d_w_cd = torch.zeros_like(w_ld), torch.zeros_like(w_cd)
        dh = d_hT.clone() if d_hT is not None else hs.new_zeros(B, H)
        dc = d_cT.clone() if d_cT is not None else hs.new_zeros(B, H)
        dc_col = dc.unsqueeze(1)
        dz_rec = dZ[..., :4 * H].unbind(0)
        dz_o, dz_d = dZ[..., :H].unbind(0), dZ[..., 4 * H:].unbind(0)
        dz_ifgd = dZ[..., H:].unflatten(-1, (4, H)).unbind(0)
        k_cs = k_c.unbind(0)
        d_out = d_out.unbind(0) if d_out is not None else None
        d_cells = d_cells.unbind(0) if d_cells is not None else None
        d_gate, f_gate, d_low = (u.unbind(0) for u in (acts[..., 4 * H:], acts[..., 2 * H:3 * H], d_lower))
        for start in reversed(range(0, T, _CHUNK)):
            span = slice(start, min(start + _CHUNK, T))
            n = span.stop - start
            o, i, f, g, d = acts[span].split(H, -1)
            K_o, K_i, K_f, K_g, K_d = dZ[span].split(H, -1)
            c_prev, y, low = cs[span], ys[span], lower[span]
            _sigmoid_backward(y, o, out=K_o)         # tanh(c) σ'(o)
            _tanh_backward(o, y, out=k_c[:n])        # o tanh'(c)
            _sigmoid_backward(g, i, out=K_i)
            _sigmoid_backward(c_prev, f, out=K_f)
            _tanh_backward(i, g, out=K_g)
            _sigmoid_backward(low, d, out=K_d)
            for t in reversed(range(start, span.stop)):
                if d_out is not None:
                    dh.add_(d_out[t])
                if d_cells is not None:
                    dc.add_(d_cells[t])
                dz_o[t].mul_(dh)
                dc.addcmul_(dh, k_cs[t - start])       # now dc is d loss / d c_t
                dz_ifgd[t].mul_(dc_col)
                torch.mul(dc, d_gate[t], out=d_low[t])
                dc.mul_(f_gate[t]).addcmul_(dz_d[t], w_cd)  # d loss / d c_{t-1}, before adding d_cells[t-1]
                torch.mm(dz_rec[t], w_hh, out=dh)      # d loss / d h_{t-1}, before adding d_out[t-1]
            dz = dZ[span].view(n * B, H5)
            dz_d_c = dZ[span, :, 4 * H:]
            d_lower[span].addcmul_(dz_d_c, w_ld)
            d_w_ld.add_((dz_d_c * low).sum((0, 1)))
            d_w_cd.add_((dz_d_c * c_prev).sum((0, 1)))
            d_w_hh_t.addmm_(hs[span].reshape(n * B, H).t(), dz[:, :4 * H])
            d_w_ih_t.addmm_(x[span].view(n * B, -1).t(), dz)
            d_b.add_(dz.sum(0))
            if d_x is not None:
                torch.mm(dz, w_ih, out=d_x[span].view(n * B, -1))
        return d_x, d_lower, dh, dc, d_w_ih_t.t(), d_b, d_w_hh_t.t(), d_w_ld, d_w_cd


_CHUNK = 8  # steps whose backward factors and weight gradients are computed together

