"""GRU (Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder"), in two conventions.

    r = σ(W_r x_t + b_ir + U_r h_{t-1} + b_hr)
    z = σ(W_z x_t + b_iz + U_z h_{t-1} + b_hz)
    n = tanh(W_n x_t + b_in + r ⊙ (U_n h_{t-1} + b_hn))      reset_after=True  (torch.nn.GRU; ``gru``)
    n = tanh(W_n x_t + b_in + U_n (r ⊙ h_{t-1}) + b_hn)      reset_after=False (Cho et al. 2014; ``gru_cho``)
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}

The paper applies r *before* the recurrent matmul; torch (and cuDNN) apply it after, which lets U h be
computed in one fused matmul. ``gru`` defaults to torch's form so the native kernel (``torch.gru``) runs;
``gru_cho`` is the paper's form on a step-by-step loop (two dependent matmuls per step). In the Cho form
b_hn sits outside the reset gate. Parameters are named and laid out as in torch (rows r, z, n).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from variants import register
from variants.lstm import NativeWeights


@register("gru", description="GRU, reset after the recurrent matmul (torch.nn.GRU; native kernel)",
          paper="Cho et al. 2014")
@register("gru_cho", description="GRU as in the paper, reset before the recurrent matmul: U(r*h)",
          paper="Cho et al. 2014", reset_after=False)
class GRU(NativeWeights):
    """Batch-first GRU. ``self.native`` (True for reset_after=True) picks torch's fused kernel; setting it
    to False forces the step-by-step loop (the tests do, to prove the loop is right)."""

    cudnn_mode = "GRU"

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, *, reset_after=True):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.reset_after = float(dropout), reset_after
        self.native = reset_after
        H = hidden_size
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(3 * H, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(3 * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(3 * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(3 * H)))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}, "
                f"reset_after={self.reset_after}, native={self.native}")

    def forward(self, x, state=None):
        if state is None:
            state = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        if self.native:
            if not self.reset_after:
                raise ValueError("GRU: the native kernel only computes reset_after=True")
            out, h = torch.gru(x, state, self._native_weights(), True, self.num_layers, self.dropout, self.training,
                               False, True)
            return out, h
        hs = []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, h = self._layer(k, x, state[k])
            hs.append(h)
        return x, torch.stack(hs)

    def _layer(self, k, x, h):
        H = self.hidden_size
        w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
        b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
        outs = []
        if self.reset_after:
            # torch form: U h + b_hh in one matmul; b_hr, b_hz could join the input side but need not.
            xp = F.linear(x.transpose(0, 1), w_ih, b_ih)
            w_hh_t = w_hh.t()
            for xt in xp.unbind(0):
                hp = torch.addmm(b_hh, h, w_hh_t)
                rz = (xt[:, :2 * H] + hp[:, :2 * H]).sigmoid()
                r, z = rz[:, :H], rz[:, H:]
                n = torch.addcmul(xt[:, 2 * H:], r, hp[:, 2 * H:]).tanh()
                h = torch.lerp(n, h, z)  # (1 - z) n + z h
                outs.append(h)
        else:
            # Cho form: every bias is outside the reset gate, so all of them join the input projection.
            xp = F.linear(x.transpose(0, 1), w_ih, b_ih + b_hh)
            w_rz_t, w_n_t = w_hh[:2 * H].t(), w_hh[2 * H:].t()
            for xt in xp.unbind(0):
                rz = torch.addmm(xt[:, :2 * H], h, w_rz_t).sigmoid()
                r, z = rz[:, :H], rz[:, H:]
                n = torch.addmm(xt[:, 2 * H:], r * h, w_n_t).tanh()
                h = torch.lerp(n, h, z)
                outs.append(h)
        return torch.stack(outs, 1), h
