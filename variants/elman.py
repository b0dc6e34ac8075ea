"""Elman RNN (Elman 1990, "Finding Structure in Time"): h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

* ``nonlinearity``: φ = "tanh" (default) or "relu".
* ``identity_init``: W_hh = I and both biases 0 at initialisation (Le, Jaitly, Hinton 2015, "A Simple Way
  to Initialize Recurrent Networks of Rectified Linear Units": the IRNN). ``None`` (default) means
  "on exactly when nonlinearity is relu", so ``nonlinearity="relu"`` alone gives the IRNN; set it to
  False for a relu RNN with torch's init, or True for an identity-initialised tanh RNN.
  W_ih keeps torch's init U(-1/sqrt(H), 1/sqrt(H)) (the paper draws it from N(0, 0.001)).

The math is torch's, so it runs on the fused ``nn.RNN`` kernel.
"""

from torch import nn

from variants import register


@register("rnn", description="Elman RNN, tanh (relu + identity init: IRNN)", paper="Elman 1990; Le et al. 2015")
class ElmanRNN(nn.RNN):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, *, nonlinearity="tanh",
                 identity_init=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"rnn: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.identity_init = (nonlinearity == "relu") if identity_init is None else bool(identity_init)
        super().__init__(input_size, hidden_size, num_layers, nonlinearity=nonlinearity,
                         batch_first=True, dropout=dropout)

    def reset_parameters(self):
        super().reset_parameters()
        if self.identity_init:
            for k in range(self.num_layers):
                nn.init.eye_(getattr(self, f"weight_hh_l{k}"))
                nn.init.zeros_(getattr(self, f"bias_ih_l{k}"))
                nn.init.zeros_(getattr(self, f"bias_hh_l{k}"))
