"""Multi-query associative recall, MQAR (Arora, Eyuboglu et al. 2023, "Zoology"; format of the
official generator ``zoology/data/multiquery_ar.py``).

Vocabulary of V = ``vocab`` tokens; keys come from 1..V//2-1, values from V//2..V-1.
Input, length L = ``seq_len``: first ``n_pairs`` key-value pairs k1 v1 k2 v2 ... (distinct keys,
distinct values, all uniform), then the query region (steps 2P..L-1, P = ``n_pairs``).
``n_queries`` of the pairs, a uniform random subset, are queried once each: query i puts its key
at step 2P + 2 g_i, where the gaps g_i are distinct, drawn without replacement from 0..(L-2P)//2-1
with weights (g + 1) ** (a - 1), a = ``power_a`` (0.01 as in Zoology: short gaps favoured;
a = 1 is uniform). Every other step of the query region holds a noise token uniform over all V
tokens (Zoology's ``random_non_queries``). The target at a query step is the queried key's value
(readout ``"mask"``: only query steps are scored). Loss: cross-entropy over V classes.
Paper grid: V = 8192, (L, P) in {(64, 4), (128, 8), (256, 16)}, every key queried (n_queries = P).
Defaults here: L = 64, P = 4, all 4 queried, V = 128. Deviations: ``n_queries`` < P is an
extension; Zoology also asserts V > L and L even, which nothing here needs, so they are not enforced.

Memoryless baseline: a predictor that sees the query key but not the pairs knows only that the
answer is one of the V - V//2 values, each equally likely: ln(V - V//2) (V = 128: ln 64 = 4.159).
Metrics: ``acc`` (accuracy at query steps, what Zoology reports), ``seq_acc`` (all queries right).
Solved: ``acc`` >= 0.99.
"""

import math
from dataclasses import dataclass

import torch

from tasks import Batch, Task, register


@register
@dataclass(frozen=True)
class AssociativeRecall(Task):
    name = "associative_recall"
    description = "multi-query associative recall: recall the value paired with each queried key"
    paper = "Arora, Eyuboglu et al. 2023 (Zoology)"
    input_kind = "tokens"
    output_kind = "classes"
    readout = "mask"

    seq_len: int = 64  # L, the whole input
    n_pairs: int = 4  # P, key-value pairs at the start
    n_queries: int = 4  # queried keys (distinct), at most n_pairs
    vocab: int = 128  # V; keys 1..V//2-1, values V//2..V-1 (Zoology: 8192)
    power_a: float = 0.01  # query gaps ~ (g + 1) ** (power_a - 1); 1 is uniform

    def __post_init__(self):
        self.check_int("n_pairs", 1)
        self.check_int("vocab", 4)
        self.check(self.n_pairs <= self.vocab // 2 - 1, "vocab",
                   f"too small for {self.n_pairs} distinct keys from 1..vocab//2-1; needs >= {2 * self.n_pairs + 2}")
        self.check_int("n_queries", 1, self.n_pairs)
        self.check_int("seq_len", 1)
        need = 2 * self.n_pairs + 2 * self.n_queries
        self.check(self.seq_len >= need, "seq_len",
                   f"too short for {self.n_pairs} pairs and {self.n_queries} queries on even steps; needs >= {need}")
        self.check_real("power_a", 0.0, math.inf)

    @property
    def input_size(self) -> int:
        return self.vocab

    @property
    def output_size(self) -> int:
        return self.vocab

    @property
    def baseline(self) -> float:
        return math.log(self.vocab - self.vocab // 2)

    def sample(self, batch_size, generator, device="cpu"):
        Bs, L, P, Q, V = batch_size, self.seq_len, self.n_pairs, self.n_queries, self.vocab
        rows = torch.arange(Bs)[:, None]
        half = V // 2
        keys = torch.rand(Bs, half - 1, generator=generator).argsort(1)[:, :P] + 1
        values = torch.rand(Bs, V - half, generator=generator).argsort(1)[:, :P] + half
        x = torch.randint(0, V, (Bs, L), generator=generator)  # noise everywhere, then overwrite
        x[:, 0:2 * P:2], x[:, 1:2 * P:2] = keys, values
        asked = torch.rand(Bs, P, generator=generator).argsort(1)[:, :Q]  # which pairs are queried
        space = (L - 2 * P) // 2
        weights = (torch.arange(1, space + 1, dtype=torch.float64) ** (self.power_a - 1)).expand(Bs, space)
        gaps = torch.multinomial(weights, Q, replacement=False, generator=generator)
        steps = 2 * P + 2 * gaps
        x[rows, steps] = keys.gather(1, asked)
        y = torch.zeros(Bs, L, dtype=torch.long)
        y[rows, steps] = values.gather(1, asked)
        mask = torch.zeros(Bs, L, dtype=torch.bool)
        mask[rows, steps] = True
        return Batch(x.to(device), y.to(device), mask.to(device))

    def extra_metrics(self, pred, target, batch):
        right = (pred.argmax(-1) == target).view(-1, self.n_queries)  # n_queries steps per sequence
        return {"acc": right.float().mean().item(), "seq_acc": right.all(1).float().mean().item()}

    @property
    def solved_when(self):
        return ("acc", ">=", 0.99)
