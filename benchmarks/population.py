"""Replicates trained as one population against the same runs one after another (see studies/population.py).

    python benchmarks/population.py                                   # CPU, 1 thread: B=64, T=100, H 32/64/128
    python benchmarks/population.py --families lstm-family --sizes 8 16 --repeats 5
    python benchmarks/population.py --device cuda --hidden 128 --sizes 1 16 32
    python benchmarks/population.py --families depth_gated clockwork --sizes 8 16
    rnnbench bench --population                                       # the default families, from the command line

Per family (lstm: native kernel; peephole and Greff's ablations cifg ... fgr: the custom LSTM loop; gru: native;
gru_cho: custom loop; rnn: native; depth_gated, clockwork: their hand-written walks) and hidden size: ms per training step (forward, backward, clipping, Adam) of
one model and of a population of P models, and the speed-up in models trained per second, the median over
rounds with its range (each round times one step of every runner, round-robin). On the CPU with one thread the
clock is the process's CPU time (robust on a shared machine; ``--clock wall`` for wall time). ``population_pays``
is drawn from this table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studies.population import (BENCH_FAMILIES, DEFAULT_BENCH_FAMILIES, benchmark_population,  # noqa: E402
                                format_population_table)
from studies.training import device_name, resolve_device  # noqa: E402

GROUPS = {"lstm-family": ["peephole", "cifg", "nig", "nfg", "nog", "niaf", "noaf", "fgr"], "all": list(BENCH_FAMILIES)}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=None, choices=list(BENCH_FAMILIES) + list(GROUPS),
                    help=f"default: {' '.join(DEFAULT_BENCH_FAMILIES)}; lstm-family: the custom LSTM loops "
                         f"({' '.join(GROUPS['lstm-family'])}); all")
    ap.add_argument("--hidden", nargs="*", type=_positive, default=[32, 64, 128])
    ap.add_argument("--sizes", nargs="*", type=_positive, default=[1, 4, 8, 16, 32])
    ap.add_argument("--batch", type=_positive, default=64)
    ap.add_argument("--seq-len", type=_positive, default=100)
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    ap.add_argument("--threads", type=_positive, default=1)
    ap.add_argument("--repeats", type=_positive, default=3)
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto")
    a = ap.parse_args(argv)
    families = None
    if a.families:
        families = [f for name in a.families for f in GROUPS.get(name, [name])]
    try:
        device = resolve_device(a.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    if not (a.hidden and a.sizes):
        ap.error("--hidden and --sizes need at least one value")
    print(f"population vs sequential: B={a.batch} T={a.seq_len} device={device_name(device)} threads={a.threads}, "
          f"{a.repeats} rounds round-robin after warm-up", flush=True)
    rows = benchmark_population(families, a.hidden, a.sizes, a.batch, a.seq_len, str(device), a.threads,
                                repeats=a.repeats, clock=a.clock)
    print(format_population_table(rows))


if __name__ == "__main__":
    main()
