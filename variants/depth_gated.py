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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from variants import register


@register("depth_gated", description="Depth-gated LSTM: gated cell-to-cell path between stacked layers",
          paper="Yao et al. 2015, Depth-Gated LSTM")
class DepthGatedLSTM(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, *, forget_bias=0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.forget_bias = float(dropout), float(forget_bias)
        H = hidden_size
        self.weight_proj = nn.Parameter(torch.empty(H, input_size))
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
        lower_cells = F.linear(x.transpose(0, 1), self.weight_proj)  # (T, B, H): stands in for c^{-1}
        hs, cs = [], []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, lower_cells, h, c = self._layer(k, x, lower_cells, h0[k], c0[k])
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))

    def _layer(self, k, x, lower_cells, h, c):
        """One layer over time. Everything in d that does not depend on this layer's own state (b_d, W_xd x,
        w_ld ⊙ c^{L-1}) is computed for all steps at once; per step there is one 4H-wide matmul."""
        H = self.hidden_size
        w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
        b = getattr(self, f"bias_ih_l{k}") + F.pad(getattr(self, f"bias_hh_l{k}"), (0, H))
        w_ld, w_cd = getattr(self, f"weight_ld_l{k}"), getattr(self, f"weight_cd_l{k}")
        xp = F.linear(x.transpose(0, 1), w_ih, b)  # (T, B, 5H)
        dp = torch.addcmul(xp[..., 4 * H:], w_ld, lower_cells)  # (T, B, H)
        w_hh_t = w_hh.t()
        outs, cells = [], []
        for xt, dt, lower in zip(xp[..., :4 * H].unbind(0), dp.unbind(0), lower_cells.unbind(0)):
            z = torch.addmm(xt, h, w_hh_t)
            ifo = z.sigmoid()  # computing σ on g's slice too is cheaper than a third slice op
            i, f, o = ifo[:, :H], ifo[:, H:2 * H], ifo[:, 3 * H:]
            g = z[:, 2 * H:3 * H].tanh()
            d = torch.addcmul(dt, w_cd, c).sigmoid()
            c = torch.addcmul(torch.addcmul(i * g, f, c), d, lower)
            h = o * c.tanh()
            outs.append(h)
            cells.append(c)
        return torch.stack(outs, 1), torch.stack(cells), h, c
