"""Where a population's training step spends its time, and the most a population could gain on this CPU.

    python benchmarks/population_floor.py                                  # depth_gated, fgr, peephole, clockwork at H=64
    python benchmarks/population_floor.py --families fgr --hidden 32 64 --members 16

A population (studies/population.py) runs one batched matmul where P models run P small ones, and one
elementwise op over P models' data where they run P small ops. What it saves is per-op overhead: the matmuls'
arithmetic and the elementwise arithmetic cost the same per member as for one model. So however well it is
written, a population's step per member costs at least its matmuls. This script measures, per family, hidden
size and population size (adding task, by default B=64, T=100; Adam and clipping, one thread):

* ``one model`` and ``population / P``: ms per training step, unprofiled (process CPU time, the median over
  ``--repeats`` rounds, each timing both in turn), and the speed-up in models per second;
* the population's step per member, split in the shares the profiler gives (self time): ``matmul`` (mm/bmm/addmm/baddbmm),
  ``elementwise`` (every other ATen op that computes: σ, tanh, products, sums, copies, Adam's arithmetic)
  and ``overhead`` (Python, autograd and view bookkeeping: what a bigger population divides further);
* ``ceiling``: one model's step over the population's matmuls per member, the speed-up if everything but the
  matmuls were free; ``2x needs``: the most the rest may cost per member for a speed-up of 2, against what it
  costs (elementwise + overhead).

The profiler adds a little time per op, so the split is a guide (it rates the matmuls' share low, so the ceiling
high); the step times are unprofiled.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studies.population import (BENCH_FAMILIES, PopulationSpec, _sequential_step, keep_freed_memory,  # noqa: E402
                                population_step)
from tasks import build_task  # noqa: E402

MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_"}
# ATen ops that only make views or metadata (no arithmetic): bookkeeping, counted with the overhead
VIEWS = {"aten::" + op for op in (
    "select", "slice", "as_strided", "unbind", "view", "reshape", "transpose", "expand", "unsqueeze", "squeeze",
    "t", "split", "split_with_sizes", "narrow", "detach", "alias", "unflatten", "flatten", "permute", "_unsafe_view",
    "empty", "empty_like", "empty_strided", "resize_", "result_type", "lift_fresh", "contiguous", "matmul",
    "linear", "to", "_to_copy", "item", "_local_scalar_dense", "is_nonzero", "zeros", "zeros_like", "stack", "cat",
    "resolve_conj", "resolve_neg")}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side writes a line at each start and stop to the process's stderr: not to ours."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def split(step) -> dict[str, float]:
    """ms of self time per category in one profiled step (the least total of 3)."""
    best = None
    for _ in range(3):
        with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        parts = {"matmul": 0.0, "elementwise": 0.0, "overhead": 0.0}
        for e in prof.key_averages():
            kind = ("matmul" if e.key in MATMUL else
                    "elementwise" if e.key.startswith("aten::") and e.key not in VIEWS else "overhead")
            parts[kind] += e.self_cpu_time_total / 1e3
        if best is None or sum(parts.values()) < sum(best.values()):
            best = parts
    return best


def timed(steps: dict, repeats: int) -> dict[str, float]:
    """Median ms per step of each runner, timed in turn (process CPU time)."""
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t0 = time.process_time()
            step()
            times[k].append((time.process_time() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", choices=list(BENCH_FAMILIES),
                    default=["depth_gated", "fgr", "peephole", "clockwork"])
    ap.add_argument("--hidden", nargs="*", type=int, default=[64])
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=100)
    a = ap.parse_args(argv)
    if min(a.members, a.repeats, a.batch, a.seq_len, *a.hidden) < 1 or not a.hidden:
        ap.error("--members, --repeats, --batch, --seq-len and --hidden must be 1 or more")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    cpu, P = torch.device("cpu"), a.members
    task = build_task("adding", seq_len=a.seq_len)
    print(f"one training step, adding B={a.batch} T={a.seq_len}, one thread, populations of {P}; ms per model "
          f"(the population's split by the profiler, per member)")
    print("| family | hidden | one model | population / P | speed-up | matmul | elementwise | overhead | ceiling "
          "| 2x needs rest <= | rest |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for family in a.families:
        for hidden in a.hidden:
            spec = PopulationSpec(family, {}, hidden_size=hidden)
            steps = {"one": _sequential_step(task, spec, a.batch, cpu),
                     "pop": population_step(task, spec, P, a.batch, cpu)}
            timed(steps, 2)  # warm-up
            ms = timed(steps, a.repeats)
            one, per = ms["one"], ms["pop"] / P
            profiled = split(steps["pop"])  # its shares, of the unprofiled step (the profiler's clock is wall time)
            parts = {k: per * v / sum(profiled.values()) for k, v in profiled.items()}
            print(f"| {family} | {hidden} | {one:.1f} | {per:.1f} | {one / per:.2f}x | {parts['matmul']:.1f} "
                  f"| {parts['elementwise']:.1f} | {parts['overhead']:.1f} | {one / parts['matmul']:.2f}x "
                  f"| {one / 2 - parts['matmul']:.1f} | {parts['elementwise'] + parts['overhead']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
