"""Recurrent cells under study, by short name.

Every variant is an ``nn.Module`` with one interface, the one ``torch.nn.RNNBase`` has:

    output, state = module(x, state=None)

* ``x`` is **batch-first**: ``(batch, time, input_size)``; ``output`` is ``(batch, time, hidden_size)``,
  the top layer's hidden output at every step.
* ``state`` is the variant's recurrent state with a leading ``num_layers`` axis, as in torch:
  a tensor ``h`` of shape ``(num_layers, batch, hidden_size)`` for cells without a memory cell
  (rnn, gru, gru_cho, clockwork), a tuple ``(h, c)`` of such tensors for the LSTM family and depth_gated,
  and ``(h, c, a)`` with full gate recurrence (fgr): ``a`` of shape ``(num_layers, batch, S * hidden_size)``
  holds the previous activations of the S sigmoid gates (S = 3 for ``fgr``). A tuple state always starts
  with ``h``. ``None`` means zeros.
* Calls compose: running ``x[:, :k]`` and then ``x[:, k:]`` from the returned state equals one run over
  ``x``, outputs and final state, for any k. A variant whose update depends on the absolute step has the
  class attribute ``clocked = True`` and a keyword-only ``t0`` (the index of x's first step, default 0):
  the second call then gets ``t0=k`` (clockwork).
* Constructors take ``(input_size, hidden_size, num_layers=1, dropout=0.0, **switches)``;
  ``dropout`` acts between stacked layers, as in torch.

A variant registers itself with :func:`register` in the module that defines it; a study file names
it by that short name. ``build_variant`` rejects switches the variant does not have.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class VariantInfo:
    name: str
    build: Callable[..., nn.Module]
    description: str
    paper: str
    switches: dict[str, Any] = field(default_factory=dict)  # switch -> default value


VARIANTS: dict[str, VariantInfo] = {}
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")  # what a variant or task may be called


def register(name: str, *, description: str, paper: str, **preset: Any):
    """Class decorator: make ``cls`` available to study files as ``name``.

    ``preset`` fixes switches (e.g. ``register("nfg", ..., forget_gate=False)`` on the Greff LSTM);
    a preset's switches can still be overridden from a study file.
    The switches a variant accepts are the keyword-only arguments of its constructor (with defaults).
    """

    def deco(cls):
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
        unknown = set(preset) - set(defaults)
        if unknown:
            raise TypeError(f"preset {name!r} sets unknown switches {sorted(unknown)}")
        if not NAME.fullmatch(name):
            raise ValueError(f"variant name {name!r}: use letters, digits, _ . - (it is part of cell keys such as "
                             "adding(seq_len=100)/lstm)")
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} registered twice (the name is taken: give yours another)")

        def build(input_size, hidden_size, num_layers=1, dropout=0.0, **switches):
            return cls(input_size, hidden_size, num_layers=num_layers, dropout=dropout,
                       **{**preset, **switches})

        VARIANTS[name] = VariantInfo(name, build, description, paper, {**defaults, **preset})
        return cls

    return deco


def get_variant(name: str) -> VariantInfo:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(sorted(VARIANTS))}") from None


def check_switches(name: str, switches: dict[str, Any]) -> None:
    """Raise ValueError naming the allowed switches if ``switches`` has one ``name`` lacks, or a value of
    another kind than the switch's default (a bool for a bool: YAML's quoted "no" is a true string)."""
    allowed = get_variant(name).switches
    unknown = sorted(set(switches) - set(allowed))
    if unknown:
        listed = ", ".join(sorted(allowed)) or "none"
        raise ValueError(f"variant {name!r} has no switch {', '.join(map(repr, unknown))}; "
                         f"allowed: {listed}")
    for key, value in switches.items():
        default = allowed[key]
        kinds = ((bool,) if isinstance(default, bool) else (int,) if isinstance(default, int)
                 else (int, float) if isinstance(default, float) else (str,) if isinstance(default, str) else None)
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            kind = {(bool,): "true or false", (int,): "an integer", (int, float): "a number", (str,): "a string"}[kinds]
            raise ValueError(f"variant {name!r}: switch {key!r} takes {kind} (its default is {default!r}), "
                             f"got {value!r}")


def build_variant(name: str, input_size: int, hidden_size: int, num_layers: int = 1,
                  dropout: float = 0.0, **switches: Any) -> nn.Module:
    check_switches(name, switches)
    return get_variant(name).build(input_size, hidden_size, num_layers, dropout, **switches)


def shapes_only(build: Callable[[], Any]) -> Any:
    """``build()`` for its shapes only: on the meta device (no memory, no init cost), or on the CPU where the
    constructor cannot run there, as one reading a value, which meta tensors lack (a cell of yours that scales
    its weights by ``.item()`` or through NumPy). A ValueError (a size it refuses) is raised as it is; any other
    error is the CPU build's own."""
    try:
        with torch.device("meta"):
            return build()
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - tried again where tensors hold values: the CPU says what is wrong, if anything
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
            return build()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def hidden_for_param_budget(name: str, input_size: int, budget: int, num_layers: int = 1,
                            output_size: int = 0, **switches: Any) -> int:
    """The hidden size whose parameter count is closest to ``budget`` (ties: the smaller one).

    Counted: the variant plus a linear head hidden -> ``output_size`` with bias (0: no head). Models are
    built for their shapes only (:func:`shapes_only`) and the size is found by bisection, since the count
    grows with the hidden size. Sizes a variant rejects (clockwork: not a multiple of ``modules``) are
    skipped: the search runs over multiples of the smallest size that builds.

    >>> hidden_for_param_budget("lstm", input_size=10, budget=10_000, output_size=10)
    43
    """
    check_switches(name, switches)

    def count(hidden: int) -> int:
        model = shapes_only(lambda: build_variant(name, input_size, hidden, num_layers, **switches))
        return count_parameters(model) + (hidden + 1) * output_size if output_size else count_parameters(model)

    step = next((h for h in range(1, 1025) if _refusal(name, input_size, h, num_layers, switches) is None), None)
    if step is None:
        raise ValueError(f"variant {name!r} builds with no hidden size up to 1024 for switches {switches}: "
                         f"{_refusal(name, input_size, 1024, num_layers, switches)}")
    lo, hi = 1, 1  # in units of step
    while count(hi * step) < budget:
        lo, hi = hi, hi * 2
    while lo < hi:  # smallest multiple whose count reaches the budget
        mid = (lo + hi) // 2
        if count(mid * step) >= budget:
            hi = mid
        else:
            lo = mid + 1
    if hi > 1 and budget - count((hi - 1) * step) <= count(hi * step) - budget:
        hi -= 1
    return hi * step


def _refusal(name, input_size, hidden, num_layers, switches) -> ValueError | None:
    """What the variant says when it refuses to build at this size, or None if it builds."""
    try:
        shapes_only(lambda: build_variant(name, input_size, hidden, num_layers, **switches))
    except ValueError as e:
        return e
    return None


# Importing the family modules registers their variants.
# Order here is the order `rnnbench list variants` shows.
from variants import elman, lstm, gru, depth_gated, clockwork  # noqa: E402,F401,I001
