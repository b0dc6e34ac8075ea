"""Embedded Reber grammar (Hochreiter & Schmidhuber 1997, "Long Short-Term Memory", Exp. 1).

Symbols: B, T, P, S, X, V, E = 0..6; PAD = 7 (input only, after the string; never read).
A string is B, then T or P (1/2 each; call it m), then a Reber string, then m again, then E. The
Reber string walks this graph from node 0 (after its B) and ends with E after node 5; where a node
has two edges each is taken with probability 1/2, except the self-loops (node 1 --S--> 1 and
node 2 --T--> 2), taken with probability ``p_loop`` (1/2 in the paper):

    0 --T--> 1,  0 --P--> 2,  1 --S--> 1,  1 --X--> 3,  2 --T--> 2,  2 --V--> 4,
    3 --X--> 2,  3 --S--> 5,  4 --P--> 3,  4 --V--> 5,  5 --E--> end

e.g. B T BPTVVE T E. The long lag: predicting the second m needs the first, across the whole Reber
string. Raising ``p_loop`` lengthens the Reber strings (the difficulty ladder) without changing
which symbols are legal where. Mean full string length (``mean_length``, exact) and baseline:

    p_loop         0.5     0.8     0.9     0.95    0.98
    mean_length    12.0    16.5    24.0    39.0    84.0
    baseline       1.2718  1.1459  0.8844  0.6011  0.3143

Next-symbol prediction: input the string but its last E, target the string shifted by one; every
step of the real string is scored (padded batches, readout ``"mask"``). Loss: cross-entropy.
A step is correct if the legal next symbols (those the grammar allows after the whole prefix) are
exactly the top-k outputs, k = their number: every legal symbol scores strictly above every
illegal one (the paper: "the output units corresponding to the possible next symbols are always
the most active ones"). A string is correct if all its steps are.

Memoryless baseline: the best predictor that sees only the current symbol outputs
P(next | current), pooled over all scored steps; its loss is the conditional entropy
H = -sum_ab n(a, b) ln(n(a, b) / n(a)) / sum_ab n(a, b), where n(a, b) is the expected number of
times b follows a in a string. ``baseline`` computes n exactly from the grammar's Markov chain
(expected visits = a linear solve), not by sampling (values in the table above).
Metrics: ``step_acc``, ``string_acc`` (the paper's per-string success), ``lag_acc`` (argmax
accuracy of the second m: the long-lag step, chance 1/2).
Solved: every held-out string correct (``string_acc`` == 1), the paper's criterion.
"""

import math
from dataclasses import dataclass

import torch

from tasks import Batch, Task, register

SYMBOLS = "BTPSXVE"
B_, T_, P_, S_, X_, V_, E_ = range(7)
PAD = 7

# States are "what was just emitted". START: the outer B. Then, for each remembered m in (T, P),
# nine states (outer m, inner B, Reber nodes 1-5, inner E, second m); END absorbs.
# Each state has two options (symbol, next state); identical options mean a forced step.
START, END, N_STATES = 0, 19, 20


def _grammar():
    sym = [[0, 0] for _ in range(N_STATES)]
    nxt = [[END, END] for _ in range(N_STATES)]
    loops = []  # states whose option 0 is a self-loop
    sym[START], nxt[START] = [T_, P_], [1, 10]
    for m, o in ((T_, 1), (P_, 10)):
        A, IB, R1, R2, R3, R4, R5, IE, M = range(o, o + 9)
        table = {A: ((B_, IB), (B_, IB)), IB: ((T_, R1), (P_, R2)),
                 R1: ((S_, R1), (X_, R3)), R2: ((T_, R2), (V_, R4)),
                 R3: ((X_, R2), (S_, R5)), R4: ((P_, R3), (V_, R5)),
                 R5: ((E_, IE), (E_, IE)), IE: ((m, M), (m, M)), M: ((E_, END), (E_, END))}
        for s, ((a, sa), (b, sb)) in table.items():
            sym[s], nxt[s] = [a, b], [sa, sb]
        loops += [R1, R2]
    return torch.tensor(sym), torch.tensor(nxt), loops


NEXT_SYMBOL, NEXT_STATE, LOOP_STATES = _grammar()  # (N_STATES, 2) each
FORCED = NEXT_SYMBOL[:, 0] == NEXT_SYMBOL[:, 1]
LEGAL = torch.zeros(N_STATES, 7, dtype=torch.bool)  # legal next symbols per state
LEGAL[torch.arange(N_STATES)[:, None], NEXT_SYMBOL] = True
LEGAL[END] = False
PARSE = torch.full((N_STATES, 8), END)  # state after reading a symbol (END if illegal)
PARSE[torch.arange(N_STATES)[:, None], NEXT_SYMBOL] = NEXT_STATE
PARSE[END] = END


@register
@dataclass(frozen=True)
class EmbeddedReber(Task):
    name = "embedded_reber"
    description = "next-symbol prediction on the embedded Reber grammar (long lag: the T/P repeat)"
    paper = "Hochreiter & Schmidhuber 1997 (LSTM), Exp. 1"
    input_kind = "tokens"
    output_kind = "classes"
    readout = "mask"
    ladder = "p_loop"

    p_loop: float = 0.5  # probability of the self-loops S at node 1 and T at node 2

    def __post_init__(self):
        self.check_real("p_loop", 0.0, 1.0)

    @property
    def input_size(self) -> int:
        return 8

    @property
    def output_size(self) -> int:
        return 7

    def option0_prob(self) -> torch.Tensor:
        """Per state, the probability of option 0 (1 for forced steps)."""
        p = torch.full((N_STATES,), 0.5, dtype=torch.float64)
        p[LOOP_STATES] = self.p_loop
        p[FORCED] = 1.0
        return p

    def _pair_counts(self) -> torch.Tensor:
        """n[a, b]: expected times symbol b follows symbol a in one string (exact, from the chain
        over (state, last symbol) pairs: expected visits v solve v = e_start + v Q)."""
        n_aug = N_STATES * 7
        p0 = self.option0_prob()
        Q = torch.zeros(n_aug, n_aug, dtype=torch.float64)
        emit = torch.zeros(n_aug, 7, dtype=torch.float64)  # P(next symbol b | augmented state)
        for s in range(N_STATES):
            if s == END:
                continue
            for c, q in ((0, p0[s]), (1, 1 - p0[s])):
                b, s2 = NEXT_SYMBOL[s, c].item(), NEXT_STATE[s, c].item()
                for a in range(7):
                    emit[s * 7 + a, b] += q
                    if s2 != END:
                        Q[s * 7 + a, s2 * 7 + b] += q
        start = torch.zeros(n_aug, dtype=torch.float64)
        start[START * 7 + B_] = 1.0
        visits = torch.linalg.solve(torch.eye(n_aug, dtype=torch.float64) - Q.T, start)
        return (visits[:, None] * emit).reshape(N_STATES, 7, 7).sum(0)

    @property
    def mean_length(self) -> float:
        """Expected length of a full string, B to E."""
        return 1 + self._pair_counts().sum().item()

    @property
    def baseline(self) -> float:
        n = self._pair_counts()
        cond = n / n.sum(1, keepdim=True).clamp_min(1e-300)
        terms = torch.where(n > 0, n * cond.clamp_min(1e-300).log(), torch.zeros_like(n))
        return -(terms.sum() / n.sum()).item()

    def sample(self, batch_size, generator, device="cpu"):
        p0 = self.option0_prob().float()
        state = torch.full((batch_size,), START)
        columns = [torch.full((batch_size,), B_)]
        while (state != END).any():  # one iteration per time step, vectorised over the batch
            option = (torch.rand(batch_size, generator=generator) >= p0[state]).long()
            symbol = NEXT_SYMBOL[state, option]
            columns.append(torch.where(state == END, PAD, symbol))
            state = NEXT_STATE[state, option]
        strings = torch.stack(columns, 1)
        x, y = strings[:, :-1], strings[:, 1:]
        mask = y != PAD
        x, y = x.masked_fill(~mask, PAD), y.masked_fill(~mask, 0)  # the final E is a target only
        return Batch(x.to(device), y.to(device), mask.to(device))

    @staticmethod
    def legal_next(x: torch.Tensor) -> torch.Tensor:
        """(B, T, 7) bool: the symbols the grammar allows after each prefix of the inputs ``x``."""
        state = torch.full(x.shape[:1], START, device=x.device)  # x[:, 0] is the outer B
        states = [state]
        parse = PARSE.to(x.device)
        for t in range(1, x.shape[1]):
            state = parse[state, x[:, t]]
            states.append(state)
        return LEGAL.to(x.device)[torch.stack(states, 1)]

    def extra_metrics(self, pred, target, batch):
        legal = self.legal_next(batch.x)[batch.mask]
        lowest_legal = pred.masked_fill(~legal, math.inf).min(-1).values
        highest_illegal = pred.masked_fill(legal, -math.inf).max(-1).values
        step_ok = lowest_legal > highest_illegal
        per_step = torch.ones_like(batch.mask)
        per_step[batch.mask] = step_ok
        steps = batch.mask.sum(1)
        lag_step = torch.arange(batch.mask.shape[1], device=steps.device) == (steps - 2)[:, None]
        lag = lag_step[batch.mask]  # the step whose target is the second m
        return {"step_acc": step_ok.float().mean().item(),
                "string_acc": per_step.all(1).float().mean().item(),
                "lag_acc": (pred[lag].argmax(-1) == target[lag]).float().mean().item()}

    @property
    def solved_when(self):
        return ("string_acc", ">=", 1.0)
