"""One training run: a task, a variant wrapped into a sequence model, a budget; no Optuna, no MLflow.

The engine (``studies.engine``) calls :func:`train` once per trial and turns its ``on_eval``
callbacks into Optuna reports and MLflow metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tasks import Batch, Task
from variants import build_variant

EMBED_MAX = 64  # token embeddings are min(vocab, 64) wide


class SequenceModel(nn.Module):
    """Task input -> recurrent variant -> linear head; emits ``(B, T, task.output_size)``.

    Token inputs go through an embedding of width ``min(vocab, 64)``; real inputs feed the variant
    directly. The head reads every step; the task picks the positions its loss reads.
    """

    def __init__(self, task: Task, variant: str, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, switches: dict[str, Any] | None = None):
        super().__init__()
        if task.input_kind == "tokens":
            self.embed = nn.Embedding(task.input_size, min(task.input_size, EMBED_MAX))
            rnn_in = self.embed.embedding_dim
        else:
            self.embed = None
            rnn_in = task.input_size
        self.rnn = build_variant(variant, rnn_in, hidden_size, num_layers, dropout, **(switches or {}))
        self.head = nn.Linear(hidden_size, task.output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        out, _ = self.rnn(x)
        return self.head(out)


class Divergence(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    lr: float = 1e-3
    steps: int = 1000
    batch_size: int = 64
    eval_every: int = 100
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    max_seconds: float | None = None  # wall-clock budget; training stops at the first step past it


@dataclass
class TrainResult:
    metrics: dict[str, float]  # the last evaluation
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, eval metrics)
    steps: int = 0
    seconds: float = 0.0


def train(task: Task, model: nn.Module, cfg: TrainConfig, eval_batch: Batch, seed: int,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` on fresh batches from ``task``; evaluate on ``eval_batch`` every ``eval_every`` steps.

    ``on_eval(step, metrics)`` is called after each evaluation and may raise to stop the run
    (the engine raises ``optuna.TrialPruned``). Raises :class:`Divergence` on a non-finite loss.
    """
    torch.set_flush_denormal(True)  # subnormal floats can slow CPU recurrences ~10x
    data = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = TrainResult(metrics={})
    start = time.perf_counter()
    step = 0
    while step < cfg.steps:
        model.train()
        batch = task.sample(cfg.batch_size, data)
        loss = task.loss(model(batch.x), batch)
        if not math.isfinite(loss.item()):
            raise Divergence(f"training loss became {loss.item()} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - start >= cfg.max_seconds
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            result.metrics = evaluate(task, model, eval_batch)
            result.history.append((step, result.metrics))
            result.steps, result.seconds = step, time.perf_counter() - start
            if on_eval is not None:
                on_eval(step, result.metrics)
        if out_of_time:
            break
    return result


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, batch: Batch) -> dict[str, float]:
    model.eval()
    return task.metrics(model(batch.x), batch)
