"""The training loop and the gradient-by-lag diagnostic."""

import math

import pytest
import torch

from studies.training import Divergence, SequenceModel, TrainConfig, gradient_by_lag, train
from tasks import build_task


def brute_force_grad_norm(task, model, batch, t: int) -> float:
    """||d loss / d h_t|| by cutting the graph at step t: h_t becomes a leaf feeding both the head at
    step t and the rest of the sequence (1 layer)."""
    x = model.embed(batch.x) if model.embed is not None else batch.x
    out, state = model.rnn(x[:, :t + 1])
    h = state[0] if isinstance(state, tuple) else state
    leaf = h.detach().requires_grad_()
    rest_state = (leaf, state[1].detach()) if isinstance(state, tuple) else leaf
    outs = [out[:, :t].detach(), leaf[-1].unsqueeze(1)]
    if t + 1 < x.shape[1]:
        outs.append(model.rnn(x[:, t + 1:], rest_state)[0])
    loss = task.loss(model.head(torch.cat(outs, 1)), batch)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad[-1].norm(dim=-1).mean().item()


@pytest.mark.parametrize("variant", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("task_name, settings", [("adding", {"seq_len": 12}),
                                                 ("copy_memory", {"seq_len": 4, "n_copy": 2})])
def test_gradient_by_lag_matches_cutting_the_graph(variant, task_name, settings):
    task = build_task(task_name, **settings)
    torch.manual_seed(0)
    model = SequenceModel(task, variant, 8)
    batch = task.eval_batch(6, seed=0)
    by_lag = gradient_by_lag(task, model, batch)
    T = batch.x.shape[1]
    assert len(by_lag) == T
    for t in (0, 3, T - 2, T - 1):
        assert by_lag[T - 1 - t] == pytest.approx(brute_force_grad_norm(task, model, batch, t), rel=1e-4)


def test_divergence_is_raised_with_the_step():
    task = build_task("adding", seq_len=10)
    torch.manual_seed(0)
    model = SequenceModel(task, "rnn", 16)
    with pytest.raises(Divergence, match="training loss became inf at step 2"):
        train(task, model, TrainConfig(lr=1e30, steps=20, eval_every=10, batch_size=8, grad_clip=None),
              task.eval_batch(16, 0), seed=1)


def test_training_is_deterministic_and_reports_every_eval():
    task = build_task("copy_memory", seq_len=5, n_copy=2)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = SequenceModel(task, "lstm", 8)
        seen = []
        result = train(task, model, TrainConfig(lr=1e-2, steps=30, eval_every=10, batch_size=8),
                       task.eval_batch(32, 0), seed=4, on_eval=lambda step, m: seen.append(step))
        runs.append(result)
        assert seen == [10, 20, 30] and [s for s, _ in result.history] == seen
    assert runs[0].metrics == runs[1].metrics and math.isfinite(runs[0].metrics["loss"])


def test_time_budget_stops_training_with_a_final_eval():
    task = build_task("adding", seq_len=10)
    model = SequenceModel(task, "rnn", 8)
    result = train(task, model, TrainConfig(steps=1000, eval_every=500, batch_size=4, max_seconds=1e-9),
                   task.eval_batch(16, 0), seed=0)
    assert result.steps == 1 and result.history[-1][0] == 1


def test_token_tasks_get_an_embedding_and_real_tasks_do_not():
    copy, adding = build_task("copy_memory", seq_len=5), build_task("adding", seq_len=5)
    assert SequenceModel(copy, "gru", 8).embed.embedding_dim == 10
    assert SequenceModel(build_task("associative_recall"), "gru", 8).embed.embedding_dim == 64
    assert SequenceModel(adding, "gru", 8).embed is None
    out = SequenceModel(copy, "gru", 8)(copy.eval_batch(3, 0).x)
    assert out.shape == (3, 5 + 2 * 10, copy.output_size)
