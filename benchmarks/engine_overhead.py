"""Two engine measurements from a real study, read back from MLflow (issue 5):

1. bookkeeping share: seconds spent in Optuna and MLflow calls (claiming, run creation, per-eval
   logging, reports to the pruner, closing) over each trial's wall time, for trials of >= 10 s;
2. parallel throughput: trials per hour with --workers 1 and --workers 2, same study.

    python benchmarks/engine_overhead.py [--steps 700] [--trials 4] [--out /tmp/overhead]

Timings depend on the machine and on what else runs on it: run it on a quiet one.
"""

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from mlflow.tracking import MlflowClient  # noqa: E402

SPEC = """\
name: overhead
seed: 0
tasks: [{{task: adding, seq_len: 100}}]
variants: [lstm, gru]
model: {{hidden_size: 128}}
train: {{steps: {steps}, eval_every: 50, eval_size: 512, batch_size: 64}}
search_space: {{lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}}}
trials: {trials}
replicates: 0
pruner: none
"""


def runs_of(root: Path):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("overhead")
    return client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'trial'", max_results=10000)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700, help="training steps per trial (aim for >= 10 s)")
    ap.add_argument("--trials", type=int, default=4, help="trials per cell (2 cells)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rnnbench-overhead"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    spec = args.out / "overhead.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(steps=args.steps, trials=args.trials)))
    rate = {}
    for workers in (1, 2):
        root = args.out / f"w{workers}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rnnbench", "run", str(spec), "--root", str(root),
                        "--workers", str(workers)], check=True, stdout=subprocess.DEVNULL)
        total = time.perf_counter() - start
        runs = runs_of(root)
        span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
        wall = sum(r.data.metrics["wall_seconds"] for r in runs)
        book = sum(r.data.metrics["bookkeeping_seconds"] for r in runs)
        rate[workers] = len(runs) / span * 3600
        print(f"workers={workers}: {len(runs)} trials, mean trial {wall / len(runs):.1f} s, "
              f"bookkeeping {book / len(runs) * 1000:.0f} ms/trial = {book / wall:.2%} of trial wall time; "
              f"trial phase {span:.1f} s -> {rate[workers]:.0f} trials/hour (command total {total:.1f} s)")
    print(f"parallel speed-up, 2 workers over 1: {rate[2] / rate[1]:.2f}x")


if __name__ == "__main__":
    main()
