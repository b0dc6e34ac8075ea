"""Synthetic long-dependency tasks, by short name.

A task is a frozen dataclass whose fields are its knobs (``seq_len`` and friends). It generates
batches from a ``torch.Generator``, so a seed reproduces the data exactly, and states:

* ``input_kind``: ``"tokens"`` (``x`` is ``(B, T)`` int64 in ``[0, input_size)``) or ``"real"``
  (``x`` is ``(B, T, input_size)`` float32);
* ``output_kind``: ``"classes"`` (targets are class indices, the model emits ``output_size`` logits)
  or ``"real"`` (targets are ``output_size`` reals, loss MSE);
* ``readout``: where predictions are read: ``"all"`` (every step; ``y`` is ``(B, T)`` or
  ``(B, T, O)``), ``"last"`` (the last step; ``y`` is ``(B,)`` or ``(B, O)``) or ``"mask"``
  (the steps where ``batch.mask`` is true; ``y`` is ``(B, T)`` or ``(B, T, O)``);
* ``baseline``: the loss of the best memoryless predictor for these settings: of the predictors that see one thing per step (nothing, the step
  index, or the current input token), the best, as ``tasks.contract`` checks; and ``solved()``.

Models always emit ``(B, T, output_size)``; :meth:`Task.select` picks the positions the loss reads.
Tasks whose sequences differ in length within a batch (adding_1997, temporal_order, embedded_reber)
pad at the end and read through ``"mask"``; the models are causal, so padding never reaches a read
step. Settings are checked in ``__post_init__`` with :meth:`Task.check_int` / :meth:`Task.check_real`
/ :meth:`Task.check`, which raise :class:`TaskSettingError` naming ``task.field``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


_COMPARE = {"<": operator.lt, "<=": operator.le, ">=": operator.ge, ">": operator.gt}


@dataclass
class Batch:
    x: Tensor
    y: Tensor
    mask: Tensor | None = None


class TaskSettingError(ValueError):
    """An impossible task setting; the message names the task and the field."""


@dataclass(frozen=True)
class Task:
    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str]
    input_kind: ClassVar[str]
    output_kind: ClassVar[str]
    readout: ClassVar[str]
    ladder: ClassVar[str] = "seq_len"  # the difficulty knob a study sweeps

    # --- what subclasses define -------------------------------------------------------------
    @property
    def input_size(self) -> int:
        raise NotImplementedError

    @property
    def output_size(self) -> int:
        raise NotImplementedError

    @property
    def baseline(self) -> float:
        """Loss of the best memoryless predictor: one that sees nothing, the step index or the current input
        token, not the step and the token together (formula in the subclass docstring; ``tasks.contract``)."""
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator, device: str | torch.device = "cpu") -> Batch:
        raise NotImplementedError

    @property
    def solved_when(self) -> tuple[str, str, float]:
        """The solved criterion as data: (eval metric, comparison in ``<``, ``<=``, ``>=``, ``>``, threshold),
        e.g. ``("recall_acc", ">=", 0.99)``. Logged with every run, drawn and stated in reports."""
        raise NotImplementedError

    def solved(self, metrics: dict[str, float]) -> bool:
        metric, op, threshold = self.solved_when
        return _COMPARE[op](metrics[metric], threshold)

    def extra_metrics(self, pred: Tensor, target: Tensor, batch: Batch) -> dict[str, float]:
        """Task-specific metrics on the read-out positions (accuracies, per-sequence correctness)."""
        return {}

    # --- shared machinery ------------------------------------------------------------------
    def check(self, ok: bool, field: str, message: str) -> None:
        if not ok:
            raise TaskSettingError(f"{self.name}.{field}: {message} (got {getattr(self, field)!r})")

    def check_int(self, field: str, minimum: int, maximum: int | None = None) -> None:
        """``field`` is an int (not a bool, not a float) in ``[minimum, maximum]``."""
        value = getattr(self, field)
        self.check(isinstance(value, int) and not isinstance(value, bool), field, "must be an integer")
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        self.check(minimum <= value and (maximum is None or value <= maximum), field, f"must be {allowed}")

    def check_real(self, field: str, low: float, high: float) -> None:
        """``field`` is a real number (not a bool) strictly inside ``(low, high)``; ints become floats,
        so ``p: 1`` and ``p: 1.0`` in a study file are the same setting (and the same eval set)."""
        value = getattr(self, field)
        self.check(isinstance(value, (int, float)) and not isinstance(value, bool), field, "must be a number")
        object.__setattr__(self, field, float(value))
        self.check(low < value < high, field, f"must lie strictly between {low} and {high}")

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def select(self, out: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The predictions and targets the loss reads, from model output ``(B, T, O)``."""
        if self.readout == "all":
            return out, batch.y
        if self.readout == "last":
            return out[:, -1], batch.y
        if self.readout == "mask":
            return out[batch.mask], batch.y[batch.mask]
        raise AssertionError(self.readout)

    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        pred, target = self.select(out, batch)
        if self.output_kind == "classes":
            return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))
        return F.mse_loss(pred, target)

    @torch.no_grad()
    def metrics(self, out: Tensor, batch: Batch) -> dict[str, float]:
        pred, target = self.select(out, batch)
        metrics = {"loss": self.loss(out, batch).item(), **self.extra_metrics(pred, target, batch)}
        metrics["solved"] = float(self.solved(metrics))
        return metrics

    def eval_batch(self, size: int, seed: int, device: str | torch.device = "cpu") -> Batch:
        """The held-out set: fixed by (task, settings, seed), so every variant of a study shares it."""
        key = json.dumps([self.name, self.settings(), seed], sort_keys=True).encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
        return self.sample(size, g, device)


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    from variants import NAME  # one rule for the names in cell keys

    if not isinstance(cls.name, str) or not NAME.fullmatch(cls.name):
        raise ValueError(f"task name {cls.name!r}: use letters, digits, _ . - (it is part of cell keys such as "
                         "adding(seq_len=100)/lstm)")
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} registered twice (the name is taken: give yours another)")
    TASKS[cls.name] = cls
    return cls


def task_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get_task_class(name))]


def get_task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskSettingError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def build_task(name: str, **settings: Any) -> Task:
    """Build task ``name``; unknown settings and impossible values raise :class:`TaskSettingError`."""
    unknown = sorted(set(settings) - set(task_fields(name)))
    if unknown:
        raise TaskSettingError(f"task {name!r} has no setting {', '.join(map(repr, unknown))}; "
                               f"allowed: {', '.join(task_fields(name))}")
    return get_task_class(name)(**settings)


# Importing the task modules registers them.
from tasks import (adding, adding_1997, associative_recall, copy_memory, embedded_reber,  # noqa: E402,F401
                   selective_copy, temporal_order)
