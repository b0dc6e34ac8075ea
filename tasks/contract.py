"""The rules every task keeps (``tasks/__init__.py``), as checks anyone can run on a task.

    >>> from tasks.contract import check
    >>> [r.name for r in check("adding", seq_len=20) if not r.passed]
    []

:func:`check` builds the registered task with ``settings`` and returns one :class:`CheckResult` per rule:

* ``settings``: the task builds with them;
* ``declarations``: ``input_kind``, ``output_kind``, ``readout``, ``ladder`` (a setting), ``description``,
  ``paper``, a finite positive ``baseline`` and a ``solved_when`` triple are stated;
* ``batch layout``: ``sample`` and ``eval_batch`` give the shapes and dtypes the declarations promise, and
  ``metrics`` of any output is finite and reports ``loss``, ``solved`` and the ``solved_when`` metric;
* ``seeds``: the same seed gives the same data, another seed other data (``sample`` and ``eval_batch``),
  and the held-out set is not the training stream;
* ``settings change the data``: for every setting some other valid value (tried: nearby numbers, the other
  bool) changes ``sample``'s output for the same generator. No inert knobs;
* ``impossible settings``: an unknown setting and a value of the wrong type for every setting raise
  :class:`~tasks.TaskSettingError` naming ``task.field``;
* ``baseline``: the stated ``baseline`` is the loss of the best memoryless predictor, within ``TOLERANCE``
  (2%, relative), and that predictor is not ``solved``. *Memoryless* is made concrete by three predictors,
  each fitted by counting (classes: conditional frequencies; reals: conditional means) on one large
  sample and scored with ``task.loss`` on another: one that sees nothing (a constant), one that sees
  only the step index t, one that sees only the current input token (token inputs). The lowest of their
  losses must match. This covers a baseline of "predict the mean" (adding), "blank where certain, uniform
  where the data is" (copy_memory: per step) and "P(next | current symbol)" (embedded_reber: per token).
  Not covered: a memoryless predictor that needs real-valued inputs or the step and the token together;
  settings too large to sample in seconds (a vocabulary of thousands) fail with "not checked".

:func:`assert_contract` raises ``AssertionError`` listing the failures, for a user's own pytest;
``rnnbench check task NAME --set k=v`` prints the same results as a table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from tasks import Batch, Task, TaskSettingError, build_task, get_task_class, task_fields
from variants.contract import CheckResult, Violation, require, run_checks

__all__ = ["CheckResult", "assert_contract", "check"]

TOLERANCE = 0.02  # the baseline's, relative
# The baseline's samples: enough read positions and sequences (the independent draws: one long string of
# embedded_reber holds many read positions), at most this many steps.
READS, SEQUENCES, STEPS = 50_000, 4_000, 4_000_000
OUTPUTS_MAX = 2 ** 29  # model outputs scored per predictor; beyond that the baseline is not checked
TABLE_MAX = 2 ** 22  # entries of a fitted (key x output) table; larger ones are skipped


def check(name: str, **settings: Any) -> list[CheckResult]:
    """Check registered task ``name`` built with ``settings`` against the rules in the module docstring."""
    get_task_class(name)  # an unknown name is a TaskSettingError, not a failed check
    try:
        task = build_task(name, **settings)
    except Exception as e:  # noqa: BLE001 - reported as the first check, which stops here
        error = e
        return run_checks([("settings", lambda: _raise(error))])
    return run_checks([
        ("settings", lambda: None),
        ("declarations", lambda: _declarations(task)),
        ("batch layout", lambda: _batch_layout(task)),
        ("seeds", lambda: _seeds(task)),
        ("settings change the data", lambda: _knobs(task)),
        ("impossible settings", lambda: _impossible(task)),
        ("baseline", lambda: _baseline(task)),
    ])


def assert_contract(name: str, **settings: Any) -> None:
    """``check`` for pytest: raise AssertionError naming every failed check and its reason.

    >>> assert_contract("copy_memory", seq_len=10, n_copy=3)
    """
    failed = [r for r in check(name, **settings) if not r.passed]
    if failed:
        raise AssertionError(f"task {name!r} {settings or ''} breaks the task rules:\n"
                             + "\n".join(f"  {r.name}: {r.reason}" for r in failed))


def _raise(e):
    raise e


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same(a: Batch, b: Batch) -> bool:
    pairs = [(a.x, b.x), (a.y, b.y), (a.mask, b.mask)]
    return all((p is None and q is None) or (p is not None and q is not None and p.shape == q.shape
                                             and torch.equal(p, q)) for p, q in pairs)


# --- the checks --------------------------------------------------------------------------------------------

def _declarations(task: Task):
    cls = type(task)
    require(cls.input_kind in ("tokens", "real"), f"input_kind {cls.input_kind!r}: 'tokens' or 'real'")
    require(cls.output_kind in ("classes", "real"), f"output_kind {cls.output_kind!r}: 'classes' or 'real'")
    require(cls.readout in ("all", "last", "mask"), f"readout {cls.readout!r}: 'all', 'last' or 'mask'")
    require(cls.ladder in task_fields(cls.name), f"ladder {cls.ladder!r} is not a setting")
    require(bool(cls.description) and bool(cls.paper), "state a description and a paper")
    require(math.isfinite(task.baseline) and task.baseline > 0, f"baseline {task.baseline!r}: finite and > 0")
    when = task.solved_when
    require(len(when) == 3 and isinstance(when[0], str) and when[1] in ("<", "<=", ">=", ">")
            and isinstance(when[2], (int, float)), f"solved_when {when!r}: (metric, < <= >= or >, threshold)")


def _batch_layout(task: Task):
    for what, b in (("sample", task.sample(8, _gen(0))), ("eval_batch", task.eval_batch(8, seed=0))):
        B, T = b.x.shape[:2]
        require(B == 8, f"{what}(8): x has shape {tuple(b.x.shape)}; batch is dim 0")
        if task.input_kind == "tokens":
            require(b.x.dtype == torch.long and b.x.dim() == 2, f"{what}: token x must be (B, T) int64, "
                    f"got {tuple(b.x.shape)} {b.x.dtype}")
            require(0 <= b.x.min() and b.x.max() < task.input_size, f"{what}: tokens outside [0, input_size)")
        else:
            require(b.x.dtype == torch.float32 and b.x.shape == (B, T, task.input_size),
                    f"{what}: real x must be (B, T, input_size) float32, got {tuple(b.x.shape)} {b.x.dtype}")
        tail = () if task.output_kind == "classes" else (task.output_size,)
        expect = {"all": (B, T), "mask": (B, T), "last": (B,)}[task.readout] + tail
        require(b.y.shape == expect, f"{what}: y has shape {tuple(b.y.shape)}, expected {expect}")
        if task.output_kind == "classes":
            require(b.y.dtype == torch.long and 0 <= b.y.min() and b.y.max() < task.output_size,
                    f"{what}: class targets must be int64 in [0, output_size)")
        else:
            require(b.y.dtype == torch.float32, f"{what}: real targets must be float32, got {b.y.dtype}")
        require((b.mask is not None) == (task.readout == "mask"), f"{what}: a mask exactly when readout is 'mask'")
        if b.mask is not None:
            require(b.mask.dtype == torch.bool and b.mask.shape == (B, T) and bool(b.mask.any(1).all()),
                    f"{what}: mask must be (B, T) bool with a read step in every row")
        metrics = task.metrics(torch.randn(B, T, task.output_size, generator=_gen(1)), b)
        wanted = {"loss", "solved", task.solved_when[0]}
        require(wanted <= set(metrics), f"metrics lack {sorted(wanted - set(metrics))}")
        require(all(math.isfinite(v) for v in metrics.values()), f"non-finite metrics: {metrics}")


def _seeds(task: Task):
    require(same(task.sample(32, _gen(5)), task.sample(32, _gen(5))), "sample: one seed, different data")
    require(not same(task.sample(32, _gen(5)), task.sample(32, _gen(6))), "sample: two seeds, the same data")
    require(same(task.eval_batch(32, seed=0), task.eval_batch(32, seed=0)), "eval_batch: one seed, different data")
    require(not same(task.eval_batch(32, seed=0), task.eval_batch(32, seed=1)), "eval_batch: two seeds, same data")
    require(not same(task.eval_batch(32, seed=0), task.sample(32, _gen(0))), "eval_batch(seed=0) is sample(_gen(0))")


def _others(value):
    """Other values to try for a setting: the other bool, nearby numbers (each once, none the value itself)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        near = [value + 1, value - 1, 2 * value, value // 2, value + 2]
    elif isinstance(value, float):
        near = [value * 1.5, value / 2, (value + 1) / 2, value + 1, value - 1]
    else:
        return []
    return [v for v in dict.fromkeys(near) if v != value]


def _knobs(task: Task):
    base = task.sample(32, _gen(0))
    inert, untried = [], []
    for field in task_fields(task.name):
        valid = []
        for other in _others(getattr(task, field)):
            try:
                valid.append(dataclasses.replace(task, **{field: other}))
            except TaskSettingError:
                continue
        if not valid:
            untried.append(field)
        elif all(same(base, t.sample(32, _gen(0))) for t in valid):
            tried = [getattr(t, field) for t in valid]
            inert.append(f"{field} (tried {', '.join(f'{v:.6g}' if isinstance(v, float) else str(v) for v in tried)})")
    require(not inert, f"the data does not depend on {'; '.join(inert)}")
    require(not untried, f"no other valid value found near the current one for {', '.join(untried)}")


def _impossible(task: Task):
    name = task.name
    try:
        build_task(name, no_such_setting=1)
    except TaskSettingError as e:
        require("no_such_setting" in str(e), f"an unknown setting is refused without naming it: {e}")
    else:
        raise Violation("an unknown setting (no_such_setting=1) was accepted")
    bad_values = {bool: ["yes", 2], int: [True, 2.5, "3"], float: [True, "0.5", None], str: [3, None]}
    for field in task_fields(name):
        for bad in bad_values.get(type(getattr(task, field)), []):
            try:
                dataclasses.replace(task, **{field: bad})
            except TaskSettingError as e:
                require(f"{name}.{field}" in str(e), f"{field}={bad!r}: refused without naming {name}.{field}: {e}")
            except Exception as e:  # noqa: BLE001 - the wrong exception is a failure with its reason
                raise Violation(f"{field}={bad!r}: raised {type(e).__name__}, not TaskSettingError: {e}") from e
            else:
                raise Violation(f"{field}={bad!r} (wrong type) was accepted")


# --- the baseline: memoryless predictors fitted by counting ------------------------------------------------

def _keys(task: Task, b: Batch, kind: str) -> torch.Tensor:
    """(B, T) int64: what a memoryless predictor of this kind may see at each step."""
    B, T = b.x.shape[:2]
    if kind == "constant":
        return torch.zeros(B, T, dtype=torch.long)
    if kind == "step":
        return torch.arange(T).expand(B, T)
    return b.x  # "input": the current token


def _read(task: Task, b: Batch, keys: torch.Tensor):
    """The keys and targets at the positions the loss reads, in the same order."""
    k, y = task.select(keys[..., None], b)
    return k.reshape(-1), y.reshape(k.numel(), -1) if task.output_kind == "real" else y.reshape(-1)


def _fit(task: Task, kind: str, batches: list[Batch]) -> torch.Tensor | None:
    """Per key, the best constant output: log conditional frequencies (classes) or the conditional mean
    (reals); keys never seen fall back to the pooled fit. None if the table would be too large."""
    n_keys = 1 + max(int(_keys(task, b, kind).max()) for b in batches)
    O = task.output_size
    if n_keys * O > TABLE_MAX:
        return None
    sums = torch.zeros(n_keys, O, dtype=torch.float64)
    counts = torch.zeros(n_keys, 1, dtype=torch.float64)
    for b in batches:
        k, y = _read(task, b, _keys(task, b, kind))
        ones = torch.ones(len(k), dtype=torch.float64)
        counts.index_add_(0, k, ones[:, None])
        if task.output_kind == "classes":
            sums.index_put_((k, y), ones, accumulate=True)
        else:
            sums.index_add_(0, k, y.double())
    pooled = sums.sum(0) / counts.sum()
    fit = (sums + pooled) / (counts + 1)  # one pseudo-observation of the pooled fit per key
    return fit.clamp_min(1e-12).log().float() if task.output_kind == "classes" else fit.float()


def _score(task: Task, kind: str, table: torch.Tensor, batches: list[Batch]) -> float:
    """The loss of the fitted predictor, averaged over every read position of ``batches``."""
    total = n = 0
    for b in batches:
        keys = _keys(task, b, kind).clamp_max(len(table) - 1)
        reads = len(_read(task, b, keys)[0])
        total += task.loss(table[keys], b).item() * reads
        n += reads
    return total / n


def _plan(task: Task) -> tuple[int, int]:
    """(sequences per sample, batch size) for the baseline: enough read positions, bounded work."""
    probe = task.sample(64, _gen(0))
    T = probe.x.shape[1]
    reads_per_seq = max(len(_read(task, probe, _keys(task, probe, "constant"))[0]) / 64, 1e-9)
    n_seq = min(max(SEQUENCES, math.ceil(READS / reads_per_seq)), max(512, STEPS // T))
    require(n_seq * T * task.output_size <= OUTPUTS_MAX,
            f"not checked: {n_seq} sequences x {T} steps x {task.output_size} outputs is too much to score; "
            "check the baseline at smaller settings")
    return n_seq, max(1, min(1024, 2 ** 22 // (T * task.output_size)))  # bounds one (B, T, O) output


def _sample(task: Task, n_seq: int, size: int, seed: int) -> list[Batch]:
    return [task.sample(min(size, n_seq - i), _gen(seed + i)) for i in range(0, n_seq, size)]


def _baseline(task: Task):
    n_seq, size = _plan(task)
    fit_on, score_on = _sample(task, n_seq, size, 1_000_000), _sample(task, n_seq, size, 2_000_000)
    kinds = ["constant", "step"] + (["input"] if task.input_kind == "tokens" else [])
    losses, tables = {}, {}
    for kind in kinds:
        tables[kind] = _fit(task, kind, fit_on)
        if tables[kind] is not None:
            losses[kind] = _score(task, kind, tables[kind], score_on)
    best = min(losses, key=losses.get)
    seen = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    require(abs(losses[best] - task.baseline) <= TOLERANCE * task.baseline,
            f"stated {task.baseline:.4g}, but the best memoryless predictor scores {losses[best]:.4g} "
            f"(sees {best}; all: {seen})")
    b = task.eval_batch(256, seed=0)
    keys = _keys(task, b, best).clamp_max(len(tables[best]) - 1)
    require(task.metrics(tables[best][keys], b)["solved"] == 0.0,
            f"the memoryless predictor (sees {best}) counts as solved")
