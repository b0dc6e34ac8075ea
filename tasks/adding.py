"""Adding problem, modern form (Le, Jaitly & Hinton 2015; Arjovsky et al. 2016).

Two input channels of length T: values ~ U[0, 1] and a marker channel with exactly two 1s, one
uniform in the first half [0, T//2), one uniform in the second half [T//2, T) (0-based steps).
Target: the sum of the two marked values, read at the last step. Loss: MSE.

Memoryless baseline: always predict E[U1 + U2] = 1; MSE = Var(U1 + U2) = 1/6. A predictor
that also reads the real-valued input at the last step does a little better, since the second mark falls on
it with probability 1/(T - T//2): 1/6 - 1/(12 (T - T//2)) (T = 20: 0.158; T = 100: 0.165). The contract's
predictors see tokens, not real values, so it does not count that one.
Solved: MSE below 1% of the baseline.
"""

from dataclasses import dataclass

import torch

from tasks import Batch, Task, register


@register
@dataclass(frozen=True)
class Adding(Task):
    name = "adding"
    description = "sum the two marked values of a long real sequence"
    paper = "Le, Jaitly & Hinton 2015"
    input_kind = "real"
    output_kind = "real"
    readout = "last"

    seq_len: int = 100  # T

    def __post_init__(self):
        self.check_int("seq_len", 2)  # one position in each half

    @property
    def input_size(self) -> int:
        return 2

    @property
    def output_size(self) -> int:
        return 1

    @property
    def baseline(self) -> float:
        return 1 / 6

    def sample(self, batch_size, generator, device="cpu"):
        T, half = self.seq_len, self.seq_len // 2
        values = torch.rand(batch_size, T, generator=generator)
        first = torch.randint(0, half, (batch_size,), generator=generator)
        second = torch.randint(half, T, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        marker = torch.zeros(batch_size, T)
        marker[rows, first] = 1.0
        marker[rows, second] = 1.0
        y = (values[rows, first] + values[rows, second]).unsqueeze(-1)
        return Batch(torch.stack([values, marker], -1).to(device), y.to(device))

    @property
    def solved_when(self):
        return ("loss", "<", 0.01 * self.baseline)
