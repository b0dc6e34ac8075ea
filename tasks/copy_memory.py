"""Copy memory (Arjovsky, Shah & Bengio 2016, uRNN official code's format).

Alphabet: 0 = blank, 1..A = data symbols, A+1 = delimiter (A = 8 by default, 10 categories).
Input, length T + 2K: K data symbols drawn uniformly with replacement from 1..A, T-1 blanks,
the delimiter, K blanks. Target, same length: T+K blanks, then the K data symbols in order.
Loss: cross-entropy averaged over all T + 2K positions.

Memoryless baseline: predict blank everywhere it is certain and uniform over the A symbols on the
last K steps: K ln(A) / (T + 2K)  (T=100, K=10, A=8: 0.1733).
Metrics: ``recall_acc`` (argmax accuracy on the last K positions), ``seq_acc`` (all K right).
Solved: ``recall_acc`` >= 0.99 on the held-out set.
"""

import math
from dataclasses import dataclass

import torch

from tasks import Batch, Task, register


@register
@dataclass(frozen=True)
class CopyMemory(Task):
    name = "copy_memory"
    description = "recall K symbols after a lag of T blanks"
    paper = "Arjovsky, Shah & Bengio 2016 (uRNN)"
    input_kind = "tokens"
    output_kind = "classes"
    readout = "all"

    seq_len: int = 100  # T, the lag
    n_copy: int = 10  # K, symbols to recall
    n_symbols: int = 8  # A, data alphabet size

    def __post_init__(self):
        self.check_int("seq_len", 1)
        self.check_int("n_copy", 1)
        self.check_int("n_symbols", 2)  # one symbol would leave nothing to remember

    @property
    def input_size(self) -> int:
        return self.n_symbols + 2

    @property
    def output_size(self) -> int:
        return self.n_symbols + 2

    @property
    def baseline(self) -> float:
        return self.n_copy * math.log(self.n_symbols) / (self.seq_len + 2 * self.n_copy)

    def sample(self, batch_size, generator, device="cpu"):
        T, K = self.seq_len, self.n_copy
        data = torch.randint(1, self.n_symbols + 1, (batch_size, K), generator=generator).to(device)
        x = torch.zeros(batch_size, T + 2 * K, dtype=torch.long, device=device)
        y = torch.zeros_like(x)
        x[:, :K] = data
        x[:, T + K - 1] = self.n_symbols + 1
        y[:, T + K:] = data
        return Batch(x, y)

    def extra_metrics(self, pred, target, batch):
        recall = pred[:, -self.n_copy:].argmax(-1) == target[:, -self.n_copy:]
        return {"recall_acc": recall.float().mean().item(), "seq_acc": recall.all(-1).float().mean().item()}

    @property
    def solved_when(self):
        return ("recall_acc", ">=", 0.99)
