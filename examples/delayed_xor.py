"""Delayed XOR, a user's own task: the parity of the current bit and the bit ``lag`` steps back.

Use it from a study file with ``imports: [examples/delayed_xor.py]`` and ``task: delayed_xor``, or check it
with ``rnnbench check task delayed_xor --imports examples/delayed_xor.py --set lag=4``.

Input: T = ``seq_len`` bits x_t ~ Bernoulli(p), p = ``p_one``, as tokens 0/1. Target at every step t >= k
(k = ``lag``): y_t = x_t XOR x_{t-k}, read through a mask (steps t < k have no target). Loss: cross-entropy.
The difficulty knob (``ladder``) is the lag: the model must hold a window of the last k bits.

Memoryless baseline. A predictor without memory sees x_t (and t) but not x_{t-k}, which is independent of
both. Given x_t = 0, y_t = x_{t-k} is 1 with probability p; given x_t = 1, y_t is 1 with probability 1 - p.
Either way the best prediction has cross-entropy

    H(p) = -p ln p - (1 - p) ln(1 - p)        (p = 0.5: ln 2 = 0.6931; p = 0.3: 0.6109)

and t adds nothing, since every read step looks alike. Without x_t the best is a constant, P(y = 1) =
2p(1 - p), whose entropy is larger unless p = 0.5. The memoryless accuracy is max(p, 1 - p), which is why
p stays inside (0.05, 0.95): near 0 or 1 the task would be "solved" without memory.
Metrics: ``acc`` (argmax accuracy on the read steps). Solved: ``acc`` >= 0.99.
"""

import math
from dataclasses import dataclass

import torch

import tasks


@tasks.register
@dataclass(frozen=True)
class DelayedXor(tasks.Task):
    name = "delayed_xor"
    description = "XOR of the current bit and the bit `lag` steps back, at every step"
    paper = "a parity-at-lag task, as in many memory benchmarks"
    input_kind = "tokens"
    output_kind = "classes"
    readout = "mask"
    ladder = "lag"

    seq_len: int = 64  # T
    lag: int = 8  # k
    p_one: float = 0.5  # p, the probability of a 1 bit

    def __post_init__(self):
        self.check_int("lag", 1)
        self.check_int("seq_len", 1)
        self.check(self.seq_len > self.lag, "seq_len", f"needs a step after the lag ({self.lag})")
        self.check_real("p_one", 0.05, 0.95)

    @property
    def input_size(self) -> int:
        return 2

    @property
    def output_size(self) -> int:
        return 2

    @property
    def baseline(self) -> float:
        p = self.p_one
        return -p * math.log(p) - (1 - p) * math.log(1 - p)

    def sample(self, batch_size, generator, device="cpu"):
        k = self.lag
        x = (torch.rand(batch_size, self.seq_len, generator=generator) < self.p_one).long()
        y = torch.zeros_like(x)
        y[:, k:] = x[:, k:] ^ x[:, :-k]
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, k:] = True
        return tasks.Batch(x.to(device), y.to(device), mask.to(device))

    def extra_metrics(self, pred, target, batch):
        return {"acc": (pred.argmax(-1) == target).float().mean().item()}

    @property
    def solved_when(self):
        return ("acc", ">=", 0.99)
