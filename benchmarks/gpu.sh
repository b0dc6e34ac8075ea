#!/usr/bin/env bash
# Device checks and timings for a CUDA machine; run from the repository root:   bash benchmarks/gpu.sh
#
# Needs python with CUDA torch, numpy and pytest; no optuna, mlflow, pydantic, click or network (nothing is
# installed: PYTHONPATH=. imports the tree as it is). About 5 minutes on one H100; each part has its own timeout.
#   1. tests: every variant's outputs and gradients on CUDA against the CPU, flat cuDNN weights, training on CUDA
#      against the CPU (tests/test_training.py); populations against sequential runs, on both devices
#      (tests/test_population.py)
#   2. population speed-up at hidden 128, B=64, T=100: populations of 1, 16, 32 against sequential runs
#   3. every variant against nn.LSTM (cuDNN), B=64, H=128, T=100
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

"$PY" - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{torch.cuda.get_device_name()}")
PY

echo "== 1. tests (CUDA parity, populations)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_training.py tests/test_population.py \
    || status=1

echo "== 2. population vs sequential on CUDA (hidden 128, B=64, T=100)"
timeout 180 "$PY" benchmarks/population.py --device cuda --hidden 128 --sizes 1 16 32 --repeats 5 || status=1

echo "== 3. variants vs nn.LSTM (cuDNN), B=64 H=128 T=100"
timeout 90 "$PY" - <<'PY' || status=1
from variants.bench import benchmark, format_table
print(format_table(benchmark(batch=64, hidden=128, seq_len=100, device="cuda", warmup=3, repeats=10)))
PY
exit $status
