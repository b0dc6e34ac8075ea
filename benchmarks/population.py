"""Replicates trained as one population against the same runs one after another (see studies/population.py).

    python benchmarks/population.py                                   # CPU, 1 thread: B=64, T=100, H 32/64/128
    python benchmarks/population.py --device cuda --hidden 128 --sizes 1 16 32
    rnnbench bench --population                                       # the same, from the command line

Per family (lstm: native kernel; peephole: custom LSTM loop; gru: native; gru_cho: custom loop; rnn: native)
and hidden size: ms per training step (forward, backward, clipping, Adam) of one model and of a population of
P models, and the speed-up in models trained per second. ``population_pays`` is drawn from this table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studies.population import BENCH_FAMILIES, benchmark_population, format_population_table  # noqa: E402
from studies.training import device_name, resolve_device  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=None, choices=list(BENCH_FAMILIES))
    ap.add_argument("--hidden", nargs="*", type=int, default=[32, 64, 128])
    ap.add_argument("--sizes", nargs="*", type=int, default=[1, 4, 8, 16, 32])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    device = resolve_device(a.device)
    print(f"population vs sequential: B={a.batch} T={a.seq_len} device={device_name(device)} threads={a.threads}, "
          f"median of {a.repeats} round-robin after warm-up", flush=True)
    rows = benchmark_population(a.families, a.hidden, a.sizes, a.batch, a.seq_len, str(device), a.threads,
                                repeats=a.repeats)
    print(format_population_table(rows))


if __name__ == "__main__":
    main()
