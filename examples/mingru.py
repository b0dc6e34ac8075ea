"""minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?"), a user's own cell.

Use it from a study file with ``imports: [examples/mingru.py]`` and ``variants: [mingru]``, or check it
with ``rnnbench check variant mingru --imports examples/mingru.py``. Per layer (x_t: the layer's input)::

    z_t = σ(W_z x_t + b_z)                      update gate: sees the input only, not h_{t-1}
    h̃_t = W_h x_t + b_h                         candidate: linear, no tanh
    h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t

Since neither z_t nor h̃_t depends on h_{t−1}, the recurrence is affine, h_t = a_t ⊙ h_{t−1} + b_t with
a_t = 1 − z_t and b_t = z_t ⊙ h̃_t, and a whole sequence is one prefix scan over the pairs (a_t, b_t):
composing step s then step t gives (a_t a_s, a_t b_s + b_t). ``forward`` runs that scan in ⌈log2 T⌉
elementwise rounds (Hillis & Steele); with ``parallel = False`` it runs the step-by-step loop above (the
slow, obviously right twin; tests/test_contract.py shows they agree). The paper's log-space scan
(positive h̃ through g(x)) is a different parameterisation and is not what this file implements.

Parameters, torch-style: ``weight_ih_l{k}`` (2H x input) holds [W_z; W_h], ``bias_ih_l{k}`` (2H)
[b_z; b_h]. There is no weight_hh: the cell has no recurrent matrix. State: h, (num_layers, B, H).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import variants


@variants.register("mingru", description="minGRU: input-only update gate, linear candidate; a parallel scan",
                   paper="Feng et al. 2024, Were RNNs All We Needed?")
class MinGRU(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout = dropout
        self.parallel = True  # the scan; False: the step-by-step loop
        bound = 1 / math.sqrt(hidden_size)
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            weight, bias = torch.empty(2 * hidden_size, n_in), torch.empty(2 * hidden_size)
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(weight.uniform_(-bound, bound)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(bias.uniform_(-bound, bound)))

    def forward(self, x, state=None):
        h0 = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size) if state is None else state
        last = []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            z_pre, cand = F.linear(x, getattr(self, f"weight_ih_l{k}"), getattr(self, f"bias_ih_l{k}")).chunk(2, -1)
            z = torch.sigmoid(z_pre)
            a, b = 1 - z, z * cand
            x = scan(a, b, h0[k]) if self.parallel else loop(a, b, h0[k])
            last.append(x[:, -1])
        return x, torch.stack(last)


def loop(a, b, h):
    """h_t = a_t ⊙ h_{t-1} + b_t, one step at a time; a, b: (B, T, H), h: (B, H)."""
    out = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        out.append(h)
    return torch.stack(out, 1)


def scan(a, b, h):
    """The same as :func:`loop`, as an inclusive prefix scan: after the round with offset d, (a_t, b_t)
    is the composition of steps t-2d+1..t (of all steps up to t once 2d > t)."""
    d = 1
    while d < a.shape[1]:
        a_prev = F.pad(a[:, :-d], (0, 0, d, 0), value=1.0)  # the segment ending at t - d; identity before 0
        b_prev = F.pad(b[:, :-d], (0, 0, d, 0))
        a, b = a * a_prev, a * b_prev + b
        d *= 2
    return a * h[:, None] + b
