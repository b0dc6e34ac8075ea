"""Adding problem, original form (Hochreiter & Schmidhuber 1997, "Long Short-Term Memory", Exp. 4).

Each step is a pair (value, marker). Values ~ U[-1, 1]. Each sequence has its own length, an
integer uniform in [T, T + T//10]. Two pairs are marked with marker 1: the first uniformly among
the first 10 pairs (value X1), the second uniformly among the first T//2 - 1 pairs still unmarked,
i.e. among steps {0, ..., T//2 - 1} minus the first mark (value X2). Every other marker is 0,
except the first and the final pair, whose marker is -1 (unless the first pair is marked). When
the first pair is marked its value is set to 0, as in the paper. Target, read at each sequence's
own last step: 0.5 + (X1 + X2) / 4. Loss: MSE. A sequence is correct if |error| < 0.04.

Batches hold sequences of different lengths: they are padded at the end with (0, 0) pairs to
T + T//10 steps, and ``batch.mask`` is true only at each sequence's last real step (readout
``"mask"``, one position per sequence). The models are causal, so the padding is never seen before
the read step.

Memoryless baseline: predict E[target] = 0.5. Each marked value has variance 1/3 unless it sits on
the first pair (then it is 0): with p1 = 1/10 (X1 on the first pair) and p2 = (9/10) / (T//2 - 1)
(X2 on the first pair), MSE = Var(target) = (2 - p1 - p2) / 48. T=100: 0.03920 (the paper's
"about 0.0417" is 1/24, which ignores the first-pair rule).
Metrics: ``seq_acc``, the fraction of sequences with |error| < 0.04.
Solved: every held-out sequence correct (``seq_acc`` == 1), the paper's stopping test (it asked
for the 2000 most recent training sequences).
"""

from dataclasses import dataclass

import torch

from tasks import Batch, Task, register

FIRST_WINDOW = 10  # the first mark is among the first 10 pairs
TOLERANCE = 0.04  # a sequence is correct if |error| < 0.04


@register
@dataclass(frozen=True)
class Adding1997(Task):
    name = "adding_1997"
    description = "the 1997 adding problem: variable length, values in [-1, 1], |error| < 0.04"
    paper = "Hochreiter & Schmidhuber 1997 (LSTM), Exp. 4"
    input_kind = "real"
    output_kind = "real"
    readout = "mask"

    seq_len: int = 100  # T, the minimum length; lengths are uniform in [T, T + T//10]

    def __post_init__(self):
        # The first mark (within the first 10 steps) must lie inside the second mark's range.
        self.check_int("seq_len", 2 * FIRST_WINDOW)

    @property
    def input_size(self) -> int:
        return 2

    @property
    def output_size(self) -> int:
        return 1

    @property
    def max_len(self) -> int:
        return self.seq_len + self.seq_len // 10

    @property
    def baseline(self) -> float:
        p1 = 1 / FIRST_WINDOW
        p2 = (1 - p1) / (self.seq_len // 2 - 1)
        return (2 - p1 - p2) / 48

    def sample(self, batch_size, generator, device="cpu"):
        B, T, W = batch_size, self.seq_len, self.max_len
        rows, steps = torch.arange(B), torch.arange(W)
        lengths = torch.randint(T, W + 1, (B,), generator=generator)
        values = torch.rand(B, W, generator=generator) * 2 - 1
        first = torch.randint(0, FIRST_WINDOW, (B,), generator=generator)
        second = torch.randint(0, T // 2 - 1, (B,), generator=generator)
        second += (second >= first).long()  # uniform over {0..T//2-1} minus the first mark
        real = steps < lengths[:, None]
        marker = torch.zeros(B, W)
        marker[:, 0] = -1.0
        marker[rows, lengths - 1] = -1.0
        marker[rows, first] = 1.0
        marker[rows, second] = 1.0
        values[:, 0] = torch.where(marker[:, 0] == 1.0, 0.0, values[:, 0])  # the first-pair rule
        values = values * real
        target = 0.5 + (values[rows, first] + values[rows, second]) / 4
        mask = steps == (lengths - 1)[:, None]
        y = torch.zeros(B, W, 1)
        y[rows, lengths - 1, 0] = target
        return Batch(torch.stack([values, marker], -1).to(device), y.to(device), mask.to(device))

    def extra_metrics(self, pred, target, batch):
        return {"seq_acc": ((pred - target).abs() < TOLERANCE).float().mean().item()}

    @property
    def solved_when(self):
        return ("seq_acc", ">=", 1.0)
