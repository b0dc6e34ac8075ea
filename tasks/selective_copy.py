"""Selective copying (Gu & Dao 2023, "Mamba", Sec. 3.1 and App. E.1; data format of the S4
repository's copying generator with ``variable=True``, which the paper's task follows).

Vocabulary of A = ``vocab`` tokens: 0 = noise, 1..A-2 = data, A-1 = the copy marker.
Input, length N + K (N = ``seq_len``, K = ``n_copy``): K data tokens drawn uniformly with
replacement from 1..A-2, placed in order at K distinct positions chosen uniformly among the first
N (the rest are noise), then K markers. Target: the K data tokens in order, read at the K marker
steps (readout ``"mask"``; ``y`` holds them there). Loss: cross-entropy over those K steps.
Paper setting: N = 4096, K = 16, A = 16 (the defaults). Deviation to note: the paper says
"length 4096" without saying whether the K marker steps count; here N excludes them.

Memoryless baseline: uniform over the A-2 data tokens at each read step: ln(A - 2)
(A = 16: ln 14 = 2.639).
Metrics: ``acc`` (token accuracy on the K read steps, what the paper reports), ``seq_acc`` (all K).
Solved: ``acc`` >= 0.99.
"""

import math
from dataclasses import dataclass

import torch

from tasks import Batch, Task, register


@register
@dataclass(frozen=True)
class SelectiveCopy(Task):
    name = "selective_copy"
    description = "copy K data tokens scattered among noise tokens, in order, after the sequence"
    paper = "Gu & Dao 2023 (Mamba)"
    input_kind = "tokens"
    output_kind = "classes"
    readout = "mask"

    seq_len: int = 4096  # N, positions the data tokens are scattered among
    n_copy: int = 16  # K, data tokens to copy
    vocab: int = 16  # A: noise + (A-2) data tokens + marker

    def __post_init__(self):
        self.check_int("seq_len", 1)
        self.check_int("n_copy", 1)
        self.check(self.n_copy <= self.seq_len, "n_copy", f"needs a position each among seq_len={self.seq_len}")
        self.check_int("vocab", 4)  # at least 2 data tokens, else there is nothing to remember

    @property
    def input_size(self) -> int:
        return self.vocab

    @property
    def output_size(self) -> int:
        return self.vocab

    @property
    def baseline(self) -> float:
        return math.log(self.vocab - 2)

    def sample(self, batch_size, generator, device="cpu"):
        N, K = self.seq_len, self.n_copy
        data = torch.randint(1, self.vocab - 1, (batch_size, K), generator=generator)
        positions = torch.rand(batch_size, N, generator=generator).argsort(1)[:, :K].sort(1).values
        x = torch.zeros(batch_size, N + K, dtype=torch.long)
        x.scatter_(1, positions, data)
        x[:, N:] = self.vocab - 1
        y = torch.zeros_like(x)
        y[:, N:] = data
        mask = torch.zeros(batch_size, N + K, dtype=torch.bool)
        mask[:, N:] = True
        return Batch(x.to(device), y.to(device), mask.to(device))

    def extra_metrics(self, pred, target, batch):
        right = (pred.argmax(-1) == target).view(-1, self.n_copy)  # K read steps per sequence
        return {"acc": right.float().mean().item(), "seq_acc": right.all(1).float().mean().item()}

    @property
    def solved_when(self):
        return ("acc", ">=", 0.99)
