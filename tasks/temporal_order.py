"""Temporal order (Hochreiter & Schmidhuber 1997, "Long Short-Term Memory", Exp. 6a and 6b).

Symbols: a, b, c, d = 0..3 (distractors), X = 4, Y = 5, E = 6 (start), B = 7 (end, the trigger),
PAD = 8 (after the end; never read). Each sequence has its own length, uniform in [L, L + L//10]
(L = ``seq_len``; the paper's 100..110 at L = 100). Element 1 is E, the last element is B, every
other element is a distractor drawn uniformly from {a, b, c, d}, except ``n_relevant`` elements
that are X or Y (each 1/2), one uniformly in each window (1-based element numbers, paper at L = 100):

* ``n_relevant`` = 2 (Exp. 6a): [10, 20], [50, 60]; 4 classes;
* ``n_relevant`` = 3 (Exp. 6b): [10, 20], [33, 43], [66, 76]; 8 classes.

For other L each window bound b becomes b * L / 100 rounded half up (L = 25: 10 -> 3, 50 -> 13). The class is the X/Y pattern read as
a binary number, X = 0, Y = 1, first relevant element most significant (6a: XX, XY, YX, YY =
0..3, the paper's Q, R, S, U). It is read at each sequence's own last step (the B): padded
batches, readout ``"mask"`` with one true position per sequence. Loss: cross-entropy.

Memoryless baseline: the classes are uniform and the last input (B) says nothing, so
ln(2 ** n_relevant): 6a ln 4 = 1.386, 6b ln 8 = 2.079 (chance accuracy 1/4, 1/8).
Metrics: ``acc`` (argmax); ``seq_acc``, the paper's criterion carried over to softmax outputs: every
output within 0.3 of the one-hot target, which for a softmax means p(true class) > 0.7.
Solved: every held-out sequence correct (``seq_acc`` == 1), as the paper's stopping test asked of
the 2000 most recent training sequences. Deviation: softmax + cross-entropy instead of the paper's
sigmoid outputs with squared error.
"""

import math
from dataclasses import dataclass

import torch

from tasks import Batch, Task, register

X, Y, E, B, PAD = 4, 5, 6, 7, 8
WINDOWS = {2: ((10, 20), (50, 60)), 3: ((10, 20), (33, 43), (66, 76))}  # 1-based, at L = 100
CORRECT_PROB = 0.7  # all softmax outputs within 0.3 of one-hot <=> p(true) > 0.7


@register
@dataclass(frozen=True)
class TemporalOrder(Task):
    name = "temporal_order"
    description = "classify the order of 2 (6a) or 3 (6b) widely separated X/Y symbols"
    paper = "Hochreiter & Schmidhuber 1997 (LSTM), Exp. 6"
    input_kind = "tokens"
    output_kind = "classes"
    readout = "mask"

    seq_len: int = 100  # L, the minimum length; lengths are uniform in [L, L + L//10]
    n_relevant: int = 2  # 2: Exp. 6a (4 classes); 3: Exp. 6b (8 classes)

    def __post_init__(self):
        self.check_int("seq_len", 20)  # below 20 the scaled windows touch the start symbol
        self.check_int("n_relevant", 2, 3)

    @property
    def input_size(self) -> int:
        return 9

    @property
    def output_size(self) -> int:
        return 2 ** self.n_relevant

    @property
    def max_len(self) -> int:
        return self.seq_len + self.seq_len // 10

    def windows(self) -> list[tuple[int, int]]:
        """The 1-based element windows of the relevant symbols at this length."""
        L = self.seq_len
        return [((lo * L + 50) // 100, (hi * L + 50) // 100) for lo, hi in WINDOWS[self.n_relevant]]  # round half up

    @property
    def baseline(self) -> float:
        return self.n_relevant * math.log(2)

    def sample(self, batch_size, generator, device="cpu"):
        Bs, W = batch_size, self.max_len
        rows, steps = torch.arange(Bs), torch.arange(W)
        lengths = torch.randint(self.seq_len, W + 1, (Bs,), generator=generator)
        x = torch.randint(0, 4, (Bs, W), generator=generator)
        x[:, 0] = E
        label = torch.zeros(Bs, dtype=torch.long)
        for lo, hi in self.windows():
            pos = torch.randint(lo - 1, hi, (Bs,), generator=generator)  # 0-based step
            bit = torch.randint(0, 2, (Bs,), generator=generator)
            x[rows, pos] = X + bit
            label = 2 * label + bit
        x[rows, lengths - 1] = B
        x[steps >= lengths[:, None]] = PAD
        mask = steps == (lengths - 1)[:, None]
        y = torch.zeros(Bs, W, dtype=torch.long)
        y[rows, lengths - 1] = label
        return Batch(x.to(device), y.to(device), mask.to(device))

    def extra_metrics(self, pred, target, batch):
        p_true = pred.softmax(-1).gather(-1, target[:, None]).squeeze(-1)
        return {"acc": (pred.argmax(-1) == target).float().mean().item(),
                "seq_acc": (p_true > CORRECT_PROB).float().mean().item()}

    @property
    def solved_when(self):
        return ("seq_acc", ">=", 1.0)
