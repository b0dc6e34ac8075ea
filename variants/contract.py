"""The interface every variant keeps (the rules in ``variants/__init__.py``), as checks anyone can run.

    >>> from variants.contract import check
    >>> [r.name for r in check("gru") if not r.passed]
    []

:func:`check` builds the registered variant at small sizes (3 inputs, about 8 units, 2 layers) and returns
one :class:`CheckResult` per rule, in this order:

* ``constructor``: ``__init__(input_size, hidden_size, num_layers=1, dropout=0.0, *, switch=default, ...)``
  and it builds with the given switches;
* ``unknown switch``: a switch the variant lacks is refused, by the registry and by the class itself;
* ``finite``: the output and state of a standard normal batch hold no NaN or inf (where they do, the
  checks below that compare outputs fail too: this row says why);
* ``batch-first``: output ``(B, T, H)``; permuting the batch permutes the results; a change at step k
  leaves the steps before k alone and reaches step k;
* ``state``: ``h`` or a tuple starting with ``h``; every tensor ``(num_layers, B, ...)``, ``h`` is
  ``(num_layers, B, H)`` and its top layer is the last output; ``state=None`` equals a zero state, and
  another initial state changes the output;
* ``chunked calls``: running ``x`` in chunks, each call given the last one's state (and ``t0``, the index of
  its first step, when the class says ``clocked = True``), equals one call: outputs, final state, and the
  gradients of the input, the initial state and every parameter;
* ``gradients``: every parameter gets a finite, nonzero gradient;
* ``seeded``: the same torch seed builds the same parameters and gives the same output;
* ``dropout``: ``dropout`` acts between layers (training only) and not within a single layer;
* ``gradcheck``: ``torch.autograd.gradcheck`` in float64 at tiny sizes, input, state and parameters.

:func:`assert_contract` raises ``AssertionError`` listing the failures, for a user's own pytest;
``rnnbench check variant NAME`` prints the same results as a table. The global torch RNG is left as found.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from variants import build_variant, get_variant, shapes_only

__all__ = ["CheckResult", "assert_contract", "check"]

ATOL, RTOL = 2e-5, 1e-4
INPUT, LAYERS, BATCH, T = 3, 2, 3, 13  # T = 13 spans clockwork's slowest default period, 8, and more


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    reason: str = ""  # why it failed; empty when it passed


class Violation(Exception):
    """A broken rule; the message is the reason shown to the user."""


def require(ok: bool, reason: str) -> None:
    if not ok:
        raise Violation(reason)


def require_close(got, expected, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Every tensor of ``got`` equals its partner in ``expected`` within tolerance."""
    require(len(got) == len(expected), f"{what}: {len(got)} tensors, expected {len(expected)}")
    for a, b in zip(got, expected):
        require(a is not None and b is not None, f"{what}: a gradient is missing")
        require(a.shape == b.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        require(torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: differ by up to {(a - b).abs().max():.2g}")


def run_checks(checks: list[tuple[str, Callable[[], None]]]) -> list[CheckResult]:
    """Run each check; one that raises fails, with its message as the reason (any exception counts)."""
    results = []
    for name, fn in checks:
        try:
            fn()
        except Violation as e:
            results.append(CheckResult(name, False, str(e)))
        except Exception as e:  # noqa: BLE001 - a crash in the user's code is a failed check, not our crash
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            results.append(CheckResult(name, False, f"{type(e).__name__}: {first}".rstrip(": ")))
        else:
            results.append(CheckResult(name, True))
    return results


def _flat(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, (tuple, list)) else [state]


def _like(state, tensors):
    """``tensors`` in the structure of ``state`` (a tensor or a tuple)."""
    return tuple(tensors) if isinstance(state, (tuple, list)) else tensors[0]


def _random_state(m, x, generator):
    """A random initial state with the structure and shapes ``m`` returns for input like ``x``."""
    with torch.no_grad():
        _, state = m(torch.zeros_like(x[:, :1]))
    return _like(state, [0.5 * torch.randn(s.shape, generator=generator, dtype=s.dtype) for s in _flat(state)])


def _loss(out, state, seed=0):
    """A loss that weights every output and state element differently, so no gradient hides in a sum."""
    gen = torch.Generator().manual_seed(seed)
    return sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum() for p in [out, *_flat(state)])


def _call(m, x, state, t0):
    return m(x, state, t0=t0) if getattr(m, "clocked", False) else m(x, state)


def _hidden(name, switches, at_least):
    """The smallest hidden size >= at_least the variant builds with (clockwork: a multiple of its modules)."""
    for hidden in range(at_least, at_least + 64):
        try:
            shapes_only(lambda: build_variant(name, INPUT, hidden, LAYERS, **switches))
        except Exception:  # noqa: BLE001 - a size it refuses (ValueError), or an __init__ that fails at this size
            continue
        return hidden
    return at_least  # let the constructor check report why it does not build


def check(name: str, **switches: Any) -> list[CheckResult]:
    """Check registered variant ``name`` (with ``switches``) against the interface; see the module docstring."""
    get_variant(name)  # an unknown name is a ValueError, not a failed check
    H = _hidden(name, switches, 8)
    gen = torch.Generator().manual_seed(0)

    def build(hidden=H, layers=LAYERS, dropout=0.0, input_size=INPUT, dtype=torch.float32):
        return build_variant(name, input_size, hidden, layers, dropout, **switches).to(dtype).eval()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            m = build()
        except Exception:  # noqa: BLE001 - reported by the constructor check, which stops here
            return run_checks([("constructor", lambda: _constructor(name, build))])
        x = torch.randn(BATCH, T, INPUT, generator=gen)
        return run_checks([
            ("constructor", lambda: _constructor(name, build)),
            ("unknown switch", lambda: _unknown_switch(name, switches, type(m), H)),
            ("finite", lambda: _finite(m, x)),
            ("batch-first", lambda: _batch_first(m, x, H)),
            ("state", lambda: _state(m, x, H, gen)),
            ("chunked calls", lambda: _chunked(m, x, gen)),
            ("gradients", lambda: _gradients(m, x, gen)),
            ("seeded", lambda: _seeded(build, x)),
            ("dropout", lambda: _dropout(build, x)),
            ("gradcheck", lambda: _gradcheck(name, switches, build)),
        ])


def assert_contract(name: str, **switches: Any) -> None:
    """``check`` for pytest: raise AssertionError naming every failed check and its reason.

    >>> assert_contract("lstm", peephole=True)
    """
    failed = [r for r in check(name, **switches) if not r.passed]
    if failed:
        raise AssertionError(f"variant {name!r} {switches or ''} breaks the interface:\n"
                             + "\n".join(f"  {r.name}: {r.reason}" for r in failed))


# --- the checks --------------------------------------------------------------------------------------------

def _constructor(name, build):
    m = build()
    params = list(inspect.signature(type(m).__init__).parameters.values())[1:]
    head = [(p.name, p.default, p.kind) for p in params[:4]]
    pk, empty = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty
    expected = [("input_size", empty, pk), ("hidden_size", empty, pk), ("num_layers", 1, pk), ("dropout", 0.0, pk)]
    require(head == expected, "__init__ must start (input_size, hidden_size, num_layers=1, dropout=0.0), got "
            f"({', '.join(str(p) for p in params[:4])})")
    for p in params[4:]:
        require(p.kind is p.KEYWORD_ONLY and p.default is not empty,
                f"switch {p.name!r} must be keyword-only with a default (after a bare *), got {p}")


def _unknown_switch(name, switches, cls, H):
    every = {**get_variant(name).switches, **switches}  # the class gets the preset's switches too
    for make in (lambda: build_variant(name, INPUT, H, **switches, no_such_switch=1),
                 lambda: cls(INPUT, H, **every, no_such_switch=1)):
        try:
            make()
        except (TypeError, ValueError) as e:
            require("no_such_switch" in str(e), f"refused without naming the switch: {e}")
        else:
            raise Violation("an unknown switch (no_such_switch=1) was accepted")


def _finite(m, x):
    out, state = m(x)
    for what, t in (("output", out), *((f"state[{i}]", s) for i, s in enumerate(_flat(state)))):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            require(bool(torch.isfinite(t).all()), f"{what} holds NaN or inf on a standard normal batch "
                    f"({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")


def _batch_first(m, x, H):
    B, steps = x.shape[:2]
    out, state = m(x)
    require(isinstance(out, torch.Tensor) and out.shape == (B, steps, H),
            f"output shape {tuple(getattr(out, 'shape', ()))}, expected (batch, time, hidden) = {(B, steps, H)}")
    perm = torch.tensor([2, 0, 1])
    out_p, state_p = m(x[perm])
    require_close([out_p, *_flat(state_p)], [out[perm], *[s[:, perm] for s in _flat(state)]],
                  "permuting the batch (dim 0 of x, dim 1 of the state)")
    x2 = x.clone()
    x2[:, 6] += 1.0
    out2, _ = m(x2)
    require(torch.equal(out2[:, :6], out[:, :6]), "a change of x at step 6 changed earlier outputs (time is dim 1)")
    require(not torch.allclose(out2[:, 6], out[:, 6]), "a change of x at step 6 did not change output step 6")


def _state(m, x, H, gen):
    B = x.shape[0]
    out, state = m(x)
    tensors = _flat(state)
    require(all(isinstance(s, torch.Tensor) for s in tensors), "state must be a tensor h or a tuple starting with h")
    for i, s in enumerate(tensors):
        require(s.dim() >= 2 and tuple(s.shape[:2]) == (LAYERS, B),
                f"state[{i}] has shape {tuple(s.shape)}; expected a leading (num_layers, batch) = {(LAYERS, B)}")
    require(tensors[0].shape == (LAYERS, B, H), f"h has shape {tuple(tensors[0].shape)}, expected {(LAYERS, B, H)}")
    require(torch.allclose(tensors[0][-1], out[:, -1]), "h[-1] (top layer) is not the last output step")
    zeros = _like(state, [torch.zeros_like(s) for s in tensors])
    out_z, state_z = m(x, zeros)
    require_close([out, *tensors], [out_z, *_flat(state_z)], "state=None vs a zero state")
    out_r, _ = m(x, _random_state(m, x, gen))
    require(not torch.allclose(out, out_r, atol=1e-4), "a random initial state gives the same output as zeros")


def _chunked(m, x, gen):
    x = x.clone().requires_grad_()
    state = _random_state(m, x, gen)
    for s in _flat(state):
        s.requires_grad_()
    whole = m(x, state)
    for bounds in ([0, 1, T], [0, 4, T], [0, 8, T], [0, 11, T], [0, T - 1, T], [0, 3, 5, 12, T],
                   list(range(T + 1))):
        st, outs = state, []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            out, st = _call(m, x[:, start:stop], st, start)
            outs.append(out)
        out = torch.cat(outs, 1)
        split = "one step per call" if len(bounds) == T + 1 else f"chunks at {bounds[1:-1]}"
        require_close([out, *_flat(st)], [whole[0], *_flat(whole[1])], f"{split} vs one call")
    wrt = [x, *_flat(state), *m.parameters()]  # the last split: one step per call
    require_close(torch.autograd.grad(_loss(out, st), wrt), torch.autograd.grad(_loss(*whole), wrt),
                  "gradients (input, initial state, parameters), one step per call vs one call")


def _gradients(m, x, gen):
    names, params = zip(*m.named_parameters()) if list(m.parameters()) else ((), ())
    require(params, "the variant has no parameters")
    out, state = m(x, _random_state(m, x, gen))
    grads = torch.autograd.grad(_loss(out, state), params, allow_unused=True)
    none = [n for n, g in zip(names, grads) if g is None]
    require(not none, f"no gradient reaches {', '.join(none)}")
    bad = [n for n, g in zip(names, grads) if not torch.isfinite(g).all()]
    require(not bad, f"non-finite gradient in {', '.join(bad)}")
    zero = [n for n, g in zip(names, grads) if not g.any()]
    require(not zero, f"zero gradient in {', '.join(zero)}")


def _seeded(build, x):
    torch.manual_seed(1)
    a = build()
    torch.manual_seed(1)
    b = build()
    require_close(list(a.state_dict().values()), list(b.state_dict().values()), "parameters built from one seed",
                  atol=0, rtol=0)
    require(torch.equal(a(x)[0], b(x)[0]) and torch.equal(a(x)[0], a(x)[0]), "same seed, different outputs")


def _dropout(build, x):
    m, plain = build(dropout=0.5).train(), build()
    plain.load_state_dict(m.state_dict())
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    require(not torch.allclose(a, m(x)[0]), "dropout=0.5 with 2 layers in training: two calls gave one output")
    m.eval()
    require_close([m(x)[0]], [plain(x)[0]], "dropout=0.5 in eval mode vs dropout=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.RNN warns that dropout needs 2 layers: it does nothing, as it should
        one = build(dropout=0.5, layers=1).train()
    torch.manual_seed(1)
    a = one(x)[0]
    torch.manual_seed(2)
    require_close([one(x)[0]], [a], "dropout=0.5 with 1 layer (nothing between layers) in training")


def _gradcheck(name, switches, build):
    m = build(hidden=_hidden(name, switches, 2), input_size=2, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    state = _random_state(m, x, gen)
    tensors = [s.requires_grad_() for s in _flat(state)]
    k = len(tensors)

    def f(x, *ts):
        out, new = torch.func.functional_call(m, dict(zip(names, ts[k:])), (x, _like(state, ts[:k])))
        return out, *_flat(new)

    # fast mode: a random projection of the Jacobian (much faster; a wrong backward still shows)
    torch.autograd.gradcheck(f, (x, *tensors, *m.parameters()), fast_mode=True)

