"""Time every variant's forward and backward against torch.nn.LSTM (see variants/bench.py).

    python benchmarks/bench_variants.py                          # B=64, H=128, T=200, 1 thread, all variants
    python benchmarks/bench_variants.py --names rnn clockwork --seq-len 1000
    python benchmarks/bench_variants.py --names depth_gated --layers 2
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from variants.bench import benchmark, format_table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", nargs="*", default=None, help="variants to time (default: all registered)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1, help="num_layers of every model, nn.LSTM too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    rows = benchmark(a.names, batch=a.batch, hidden=a.hidden, seq_len=a.seq_len, threads=a.threads,
                     input_size=a.input_size, warmup=a.warmup, repeats=a.repeats, num_layers=a.layers)
    print(f"B={a.batch} H={a.hidden} T={a.seq_len} input={a.input_size} layers={a.layers} threads={a.threads}, "
          f"median of {a.repeats} after {a.warmup} warm-up")
    print(format_table(rows))


if __name__ == "__main__":
    main()
