"""Every task is learnable: a small LSTM clearly beats the task's memoryless baseline at a short length.

copy_memory and adding run in the default suite; the others are ``slow``. One torch thread: on two
cores a second thread made the step-by-step variants several times slower, not faster.
"""

from __future__ import annotations

import pytest
import torch

from studies.training import SequenceModel, TrainConfig, train
from tasks import build_task

# task -> (settings, hidden size, learning rate, steps, {metric: minimum} beyond "loss < half the baseline")
RUNS = {
    "copy_memory": (dict(seq_len=10, n_copy=3, n_symbols=4), 64, 1e-2, 600, {}),
    "adding": (dict(seq_len=20), 64, 1e-2, 500, {}),
    "adding_1997": (dict(seq_len=20), 32, 1e-3, 1000, {}),
    "temporal_order": (dict(seq_len=20, n_relevant=2), 64, 3e-3, 400, {"acc": 0.9}),
    "embedded_reber": (dict(p_loop=0.5), 64, 3e-3, 500, {"lag_acc": 0.9, "step_acc": 0.95}),
    "selective_copy": (dict(seq_len=16, n_copy=2, vocab=6), 64, 1e-2, 500, {"acc": 0.9}),
    "associative_recall": (dict(seq_len=16, n_pairs=2, n_queries=2, vocab=16), 64, 1e-2, 800, {"acc": 0.8}),
}
FAST = {"copy_memory", "adding"}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def params() -> list:
    return [pytest.param(name, id=name, marks=() if name in FAST else pytest.mark.slow) for name in RUNS]


@pytest.mark.parametrize("name", params())
def test_small_lstm_beats_the_memoryless_baseline(name, one_thread):
    settings, hidden, lr, steps, minimum = RUNS[name]
    task = build_task(name, **settings)
    torch.manual_seed(0)
    model = SequenceModel(task, "lstm", hidden)
    result = train(task, model, TrainConfig(lr=lr, steps=steps, eval_every=steps), task.eval_batch(256, seed=0),
                   seed=1)
    m = result.metrics
    print(f"{name} {settings}: loss {m['loss']:.4g} vs baseline {task.baseline:.4g} after {steps} steps; {m}")
    assert m["loss"] < 0.5 * task.baseline, m
    for metric, low in minimum.items():
        assert m[metric] >= low, (metric, m)
