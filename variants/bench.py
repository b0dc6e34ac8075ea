"""Speed of every variant against torch.nn.LSTM, measured in the same run.

Forward (with autograd recording, as in training) and backward (``loss.backward()`` on the sum of the
outputs) are timed separately, after warm-up; each figure is the median over ``repeats``, taken round-robin
over the models so that load from other processes hits every row alike. Subnormal
floats are flushed (they can dominate CPU RNN time) and the thread count is fixed.

    >>> rows = benchmark(["lstm", "peephole"], batch=8, hidden=32, seq_len=20, warmup=1, repeats=2)
    >>> print(format_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from variants import VARIANTS, build_variant, count_parameters

REFERENCE = "torch.nn.LSTM"


def _time_once(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # CUDA runs asynchronously
    model.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    loss = model(x)[0].sum()
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def benchmark(names: list[str] | None = None, batch: int = 64, hidden: int = 128, seq_len: int = 200,
              threads: int = 1, input_size: int = 32, warmup: int = 3, repeats: int = 10,
              num_layers: int = 1, device: str = "cpu") -> list[dict]:
    """One row per variant (plus torch.nn.LSTM first, with as many layers): variant, params, fwd_ms, bwd_ms,
    total_ms, ratio_vs_lstm (total time over nn.LSTM's total time). On ``device="cuda"`` nn.LSTM is cuDNN's."""
    torch.set_flush_denormal(True)
    torch.backends.cudnn.allow_tf32 = False  # float32 on cuDNN too, as studies train (studies.training.full_float32)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, seq_len, input_size, device=device)
    models = {REFERENCE: nn.LSTM(input_size, hidden, num_layers, batch_first=True).to(device)}
    for name in names or list(VARIANTS):
        models[name] = build_variant(name, input_size, hidden, num_layers).to(device)
    for model in models.values():
        for _ in range(warmup):
            _time_once(model, x)
    # Round-robin over the models, so that a load change on the machine hits them all alike.
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(_time_once(model, x))
    rows = []
    for name, model in models.items():
        fwd = statistics.median(f for f, _ in times[name]) * 1e3
        bwd = statistics.median(b for _, b in times[name]) * 1e3
        rows.append(dict(variant=name, params=count_parameters(model), fwd_ms=fwd, bwd_ms=bwd,
                         total_ms=fwd + bwd))
    base = rows[0]["total_ms"]
    for row in rows:
        row["ratio_vs_lstm"] = row["total_ms"] / base
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`benchmark`'s rows."""
    lines = ["| variant | params | fwd ms | bwd ms | total ms | vs nn.LSTM |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | "
                     f"{r['total_ms']:.1f} | {r['ratio_vs_lstm']:.2f}x |")
    return "\n".join(lines)
