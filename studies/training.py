"""One training run: a task, a variant wrapped into a sequence model, a budget; no Optuna, no MLflow.

The worker (``studies.worker``) calls :func:`train` once per trial and turns its ``on_eval``
callbacks into Optuna reports and MLflow metrics. Runs on any torch device (``device=``): the model,
every batch and the held-out set live there, and the loop never waits for the device between
evaluations (a non-finite loss is noted on the device and raised at the next evaluation).
Many replicates of one configuration train together as one population: ``studies.population``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tasks import Batch, Task
from variants import build_variant

EMBED_MAX = 64  # token embeddings are min(vocab, 64) wide


def rnn_input_size(task: Task) -> int:
    """The recurrent variant's input width: the task's, or for tokens their embedding's, min(vocab, 64)."""
    return min(task.input_size, EMBED_MAX) if task.input_kind == "tokens" else task.input_size


class SequenceModel(nn.Module):
    """Task input -> recurrent variant -> linear head; emits ``(B, T, task.output_size)``.

    Token inputs go through an embedding of width ``min(vocab, 64)``; real inputs feed the variant
    directly. The head reads every step; the task picks the positions its loss reads.
    """

    def __init__(self, task: Task, variant: str, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, switches: dict[str, Any] | None = None):
        super().__init__()
        rnn_in = rnn_input_size(task)
        self.embed = nn.Embedding(task.input_size, rnn_in) if task.input_kind == "tokens" else None
        self.rnn = build_variant(variant, rnn_in, hidden_size, num_layers, dropout, **(switches or {}))
        self.head = nn.Linear(hidden_size, task.output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        out, _ = self.rnn(x)
        return self.head(out)


class Divergence(RuntimeError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"``: that device."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def full_float32() -> None:
    """No TF32 on CUDA: cuDNN's RNNs use it by default (torch's matmuls do not), which put the native cells'
    outputs ~1e-4 from float32 on an H200 while the custom cells, the CPU and the population walks compute in
    float32. Every cell of a study then computes in float32 on every device."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def device_name(device: str | torch.device) -> str:
    """What to log as the run's device: ``"cpu"`` or the GPU's name (e.g. ``"NVIDIA H100 80GB HBM3"``)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor on ``device`` (the same object when already there)."""
    if batch.x.device == device:
        return batch
    return Batch(batch.x.to(device), batch.y.to(device), None if batch.mask is None else batch.mask.to(device))


@dataclass
class TrainConfig:
    lr: float = 1e-3
    steps: int = 1000
    batch_size: int = 64
    eval_every: int = 100
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    max_seconds: float | None = None  # wall-clock budget; training stops at the first step past it
    optimizer: str = "adam"           # one of OPTIMIZERS
    momentum: float = 0.0             # sgd and nesterov only (as the study file's train.momentum)


OPTIMIZERS = ("adam", "sgd", "nesterov", "rmsprop")
GRAD_PROBE_SIZE = 64  # sequences in the gradient-by-lag probe of replicate runs


def optimizer_name(hp: dict) -> str:
    """The name in OPTIMIZERS for a trial's hyperparameters: ``sgd`` with ``nesterov`` is ``nesterov``."""
    return "nesterov" if hp["optimizer"] == "sgd" and hp["nesterov"] else hp["optimizer"]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch's optimizer named by ``cfg.optimizer``, with ``cfg.lr`` and ``cfg.weight_decay`` (``sgd`` and
    ``nesterov`` with momentum ``cfg.momentum``; everything else at torch's defaults)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.optimizer == "nesterov")
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")


@dataclass
class TrainResult:
    metrics: dict[str, float]  # the last evaluation
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, eval metrics)
    steps: int = 0
    seconds: float = 0.0
    # This model's share of the time: a population member's share of the population's (each stretch between
    # evaluations divided among the members training in it); None for a run alone: all of ``seconds``.
    own_seconds: float | None = None


def train(task: Task, model: nn.Module, cfg: TrainConfig, eval_batch: Batch, seed: int,
          on_eval: Callable[[int, dict[str, float]], None] | None = None,
          device: str | torch.device | None = None) -> TrainResult:
    """Train ``model`` on fresh batches from ``task``; evaluate on ``eval_batch`` every ``eval_every`` steps.

    ``on_eval(step, metrics)`` is called after each evaluation and may raise to stop the run
    (the engine raises ``optuna.TrialPruned``). ``device`` (default: where the model's parameters are) gets
    the model, the batches and ``eval_batch``; the batches are drawn on the CPU from the seeded generator, so
    every device trains on the same data. A non-finite loss raises :class:`Divergence` at the next
    evaluation, naming the step where it first happened (no host sync per step).
    """
    torch.set_flush_denormal(True)  # subnormal floats can slow CPU recurrences ~10x
    full_float32()
    device = next(model.parameters()).device if device is None else resolve_device(device)
    model.to(device)
    eval_batch = batch_to(eval_batch, device)
    data = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model.parameters(), cfg)
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with a non-finite loss; 0: none
    bad_loss = torch.zeros((), device=device)
    result = TrainResult(metrics={})
    start = time.perf_counter()
    step = 0
    while step < cfg.steps:
        model.train()
        batch = task.sample(cfg.batch_size, data, device)
        loss = task.loss(model(batch.x), batch)
        new = ~torch.isfinite(loss.detach()) & (first_bad == 0)
        first_bad = torch.where(new, step + 1, first_bad)
        bad_loss = torch.where(new, loss.detach(), bad_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - start >= cfg.max_seconds
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            if first_bad.item():
                raise Divergence(f"training loss became {bad_loss.item()} at step {first_bad.item()}")
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
    batch = batch_to(batch, next(model.parameters()).device)
    return task.metrics(model(batch.x), batch)


def gradient_by_lag(task: Task, model: SequenceModel, batch: Batch) -> list[float]:
    """Mean over the batch of ||d loss / d h_t|| (the top layer's hidden state), indexed by lag T-1-t.

    The vanishing-gradient picture (Hochreiter 1991; Bengio et al. 1994): how much the loss still
    depends on the state long before the end. The model is unrolled one step per call through the
    common ``(x, state)`` interface so every h_t is a node of the graph; a clocked variant
    (``clocked = True``, e.g. clockwork) is told the absolute step with ``t0``.
    """
    model.eval()
    batch = batch_to(batch, next(model.parameters()).device)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN backward refuses eval mode; torch's own does not
        x = model.embed(batch.x) if model.embed is not None else batch.x
        rnn, state, outs, hs = model.rnn, None, [], []
        for t, x_t in enumerate(x.unbind(1)):
            kwargs = {"t0": t} if getattr(rnn, "clocked", False) else {}
            out, state = rnn(x_t.unsqueeze(1), state, **kwargs)
            h = state[0] if isinstance(state, tuple) else state
            for node in (out, h):
                node.retain_grad()
            hs.append((out, h))
            outs.append(out)
        loss = task.loss(model.head(torch.cat(outs, 1)), batch)
        model.zero_grad(set_to_none=True)
        loss.backward()
    # h_t reaches the loss twice: through the head at step t (out) and through later steps (state);
    # ``out[:, 0]`` and ``h[-1]`` hold the same values as two nodes of the graph, so their gradients add.
    def grad(node, top):
        return 0 if node.grad is None else top(node.grad)
    norms = [(grad(out, lambda g: g[:, 0]) + grad(h, lambda g: g[-1])).norm(dim=-1).mean().item()
             for out, h in hs]
    model.zero_grad(set_to_none=True)
    return norms[::-1]
