"""Train P replicates of one configuration together, as one population module.

Replicate runs (and search trials that differ only in learning rate, clipping or weight decay) share every
shape: task, variant, switches, hidden size, layers, batch size. Stacking the P members' weights on a leading
member axis turns P small recurrent matmuls per step into one batched matmul (``torch.baddbmm``) and P
sequences of small elementwise kernels into one; on a GPU, or on a CPU at small hidden sizes where per-op
overhead dominates, that trains P models in much less than P times the time of one (``benchmarks/population.py``
measures it; :func:`population_pays` is the rule drawn from those measurements).

Each member is exactly the run :func:`studies.training.train` would do with its seed:

* initial weights: ``torch.manual_seed(seed)`` then ``SequenceModel(...)``, as the engine builds a trial's
  model (:func:`member_models`), then stacked;
* data: its own ``torch.Generator().manual_seed(seed)``, one ``task.sample(batch_size, generator)`` per step;
* loss and gradient: the members' losses are summed, and no member's graph touches another's, so each member's
  gradient is the gradient of its own loss;
* gradient clipping on each member's own total norm (as ``clip_grad_norm_``), then an optimizer whose state,
  learning rate and weight decay are per member (:class:`PopulationOptimizer`: Adam, SGD with momentum or
  Nesterov momentum, RMSprop, each torch's update rule vectorised over the member axis).

A member whose loss becomes non-finite fails alone (:class:`~studies.training.Divergence` in its result, noted on
the device and checked at each evaluation, like ``train``); a member whose ``on_eval`` returns False or raises
(pruned) leaves; the others go on. ``tests/test_population.py`` checks a population against sequential runs.

Equations as in the variants' docstrings: ``variants/lstm.py`` (every LSTM-family switch: Hochreiter &
Schmidhuber 1997, Gers et al. 2000, Greff et al. 2017), ``variants/gru.py`` (Cho et al. 2014, both reset
conventions), ``variants/elman.py`` (Elman 1990; tanh or relu), ``variants/depth_gated.py`` (Yao et al. 2015),
``variants/clockwork.py`` (Koutník et al. 2014). The LSTM family runs the sequential model's own walk over time with
hand-written backpropagation (``variants.lstm.recurrence_forward``/``_backward``) with a member axis
(:class:`_LSTMRecurrence`); so do depth_gated and clockwork (their modules' ``_Recurrence``, which take a leading
member axis: batched matmuls, the same elementwise ops; clockwork updates only the modules due at each step, as
one model does); GRU and Elman are a plain loop over time in autograd (one ``baddbmm`` and a few elementwise ops
per step). Every shipped variant has a population form (:func:`supports_population`: not with dropout between
layers). On the CPU, :func:`train_population`
makes malloc keep freed memory (:func:`keep_freed_memory`): a population's per-step buffers are otherwise page
faulted in afresh at every step.

    >>> from tasks import build_task
    >>> task = build_task("adding", seq_len=10)
    >>> results = train_population(task, PopulationSpec("peephole", hidden_size=8),
    ...                            [Member(seed=s, lr=1e-2) for s in range(3)],
    ...                            TrainConfig(steps=4, eval_every=2, batch_size=4), task.eval_batch(8, 0))
    >>> [r.steps for r in results]
    [4, 4, 4]
"""

from __future__ import annotations

import copy
import ctypes
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from studies.training import (OPTIMIZERS, Divergence, SequenceModel, TrainConfig, TrainResult, batch_to,
                              full_float32, resolve_device)
from tasks import Batch, Task
from variants import build_variant, shapes_only
from variants.clockwork import ClockworkRNN, _schedule
from variants.clockwork import _Recurrence as _ClockworkRecurrence
from variants.depth_gated import DepthGatedLSTM, layer_weights
from variants.depth_gated import _Recurrence as _DepthGatedRecurrence
from variants.elman import ElmanRNN
from variants.gru import GRU
from variants.lstm import LSTM, recurrence_backward, recurrence_forward, recurrence_small_grads

__all__ = ["PopulationSpec", "Member", "MemberResult", "PopulationModel", "PopulationOptimizer",
           "train_population", "member_models", "supports_population", "population_pays", "keep_freed_memory"]


@dataclass(frozen=True)
class PopulationSpec:
    """What every member shares: the model's shape."""
    variant: str
    switches: dict[str, Any] = field(default_factory=dict)
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0


@dataclass(frozen=True)
class Member:
    """What a member has of its own: the seed (initial weights and data) and the per-member hyperparameters."""
    seed: int
    lr: float = 1e-3
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0


@dataclass
class MemberResult(TrainResult):
    error: BaseException | None = None  # Divergence, or what on_eval raised (e.g. optuna.TrialPruned)
    model: SequenceModel | None = None   # the member's weights when it left or finished (e.g. for gradient_by_lag)


def _family(rnn: nn.Module) -> str | None:
    """The population walk that computes ``rnn``'s equations, or None. The class itself, not a subclass: a
    user's cell derived from a shipped one (its own ``forward`` or ``_layer``) computes something else, which
    the population's walks know nothing of; it trains one by one."""
    cls = type(rnn)
    if cls is GRU:
        return "gru_cho" if not rnn.reset_after else "gru"
    return {LSTM: "lstm", ElmanRNN: "rnn", DepthGatedLSTM: "depth_gated", ClockworkRNN: "clockwork"}.get(cls)


def _meta_rnn(variant: str, switches: dict[str, Any] | None, num_layers: int = 1) -> nn.Module | None:
    """The variant built for its shapes (:func:`variants.shapes_only`) at a width it accepts (clockwork: a
    multiple of its modules), or None where its switches are refused."""
    for hidden in range(4, 257, 4):
        try:
            return shapes_only(lambda: build_variant(variant, 1, hidden, num_layers, 0.0, **(switches or {})))
        except ValueError:
            continue
        except TypeError:
            return None
    return None


def supports_population(variant: str, switches: dict[str, Any] | None = None, num_layers: int = 1,
                        dropout: float = 0.0) -> bool:
    """Whether :func:`train_population` can train this configuration; if not, run the members one by one.

    Supported: the LSTM family (every switch), GRU (both conventions), Elman RNN, depth-gated LSTM, clockwork
    RNN. Not with dropout between layers: sequential runs draw their dropout masks from the global RNG, which a
    population cannot replay."""
    if num_layers > 1 and dropout > 0:
        return False
    rnn = _meta_rnn(variant, switches, num_layers)
    return rnn is not None and _family(rnn) is not None


def population_pays(variant: str, switches: dict[str, Any] | None, hidden_size: int,
                    device: str | torch.device) -> bool:
    """Whether training replicates as one population beats running them one after another.

    Drawn from ``python benchmarks/population.py`` (adding task, B=64, T=100, one CPU thread, Adam + clipping;
    per-model throughput of a population against the same runs one after another, timed side by side in one
    process in CPU time; the medians over 3-5 rounds of two runs, and in brackets the worst single round; a
    shared 2-core machine; wall time on the quiet machine agreed):

    * custom LSTM-family loops (peephole/greff, cifg, nig, nfg, nog, niaf, noaf), populations of 8-16: hidden 32
      2.8-4.3x (2.2), hidden 64 2.0-3.0x (1.5), hidden 128 1.5-1.8x (1.2); of 2 and 4 (peephole): 1.5-2.3x at
      hidden 32-64, 1.5-1.6x at 128; hidden 256 (P = 8) 1.14x. Paid at hidden <= 128.
    * fgr (9 more H x H matmuls per step, the same cost per model in a population): hidden 32 2.4-2.8x (2.1),
      64 1.6-1.8x (1.4), 128 1.2-1.3x (1.05); P = 2-4: 1.4-1.9x at 32-64. Paid at hidden <= 64.
    * gru (nn.GRU alone) 2.6-3.0x, 1.7x, 1.1-1.2x at hidden 32, 64, 128; gru_cho 2.2-2.8x, 2.2-2.5x, 1.5x; rnn
      (nn.RNN) 2.6-2.9x, 2.3x, 1.5x (P = 8-16, 3 rounds). Paid at hidden <= 64, as before (small populations
      not measured at 128).
    * ``lstm``/``np`` (the fused nn.LSTM kernel alone, against the population's loop): 1.15-1.3x at hidden 32,
      0.9-1.1x at 64-128: never paid (too thin to be sure of).
    * depth_gated (its hand-written walk, one model against P; two runs of 3 rounds on a busy machine and one
      of 5 on a quiet one, P = 8-16): hidden 32 1.6-2.4x (1.3), 64 1.2-1.4x (0.91), 128 1.0-1.2x (0.83). Paid
      at hidden <= 32 (64 is as thin as fgr's 128).
    * clockwork (default 4 modules; only the modules due at a step are computed, in both; the same three
      runs): hidden 32 2.6-3.3x (1.8), 64 1.9-2.4x (1.8), 128 1.3-1.8x (1.26). Paid at hidden <= 128.

    The population's edge at these sizes is per-op overhead shared by P members; the matmuls and transcendental
    functions cost the same per member (so the edge shrinks as hidden grows, and with FGR).

    On CUDA (``bash benchmarks/gpu.sh`` on an H200, two runs: hidden 128, B=64, T=100, wall time, 5 rounds) a small
    RNN's step is kernel launches, which a population shares: the custom cells' populations of 16 ran 12.8-16.2x
    the runs one after another (32: 22-32x; one member: 0.87-1.05x), so they pay at any size. Against cuDNN's
    fused kernels the population's loop loses: 1 member 0.05-0.23x, 16 members 1.5-1.6x (lstm), 0.77-0.85x
    (gru), 2.8-3.3x (rnn);
    never paid for ``lstm``/``np``, ``gru`` and ``rnn`` (replicates come 3-5 at a time)."""
    if not supports_population(variant, switches):
        return False
    rnn = _meta_rnn(variant, switches)
    if torch.device(device).type == "cuda":
        return not (isinstance(rnn, ElmanRNN) or getattr(rnn, "native", False))
    if isinstance(rnn, LSTM):
        if rnn.native:
            return False
        return hidden_size <= (64 if rnn.full_gate_recurrence else 128)
    if isinstance(rnn, DepthGatedLSTM):
        return hidden_size <= 32
    if isinstance(rnn, ClockworkRNN):
        return hidden_size <= 128
    return hidden_size <= 64


AUTO_POPULATION = 16  # the most members per population where `population: auto` trains one
PER_MEMBER = frozenset({"lr", "grad_clip", "weight_decay"})  # hyperparameters members may differ in


def population_size(setting: str | int, kind: str, searched: set[str], member: Callable[[], PopulationSpec],
                    device: str | torch.device) -> int:
    """The most runs a worker trains as one population (1: one by one), for ``train.population`` ``setting``
    (off, auto, N): replicate runs (``kind`` "replicate", one configuration), or search trials where every
    ``searched`` hyperparameter is one a member may have of its own (``PER_MEMBER``: no shape changes).
    ``member()`` gives the members' configuration; it is built only where a population is allowed at all."""
    if setting == "off" or (kind == "search" and not searched <= PER_MEMBER):
        return 1
    spec = member()
    if not supports_population(spec.variant, spec.switches, spec.num_layers, spec.dropout):
        return 1
    if setting == "auto":
        return AUTO_POPULATION if population_pays(spec.variant, spec.switches, spec.hidden_size, device) else 1
    return int(setting)


def member_models(task: Task, spec: PopulationSpec, seeds: list[int]) -> list[SequenceModel]:
    """Each seed's initial model, exactly as a sequential run builds it (``torch.manual_seed(seed)`` first)."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(SequenceModel(task, spec.variant, spec.hidden_size, spec.num_layers, spec.dropout,
                                    spec.switches))
    return models


class PopulationModel(nn.Module):
    """P ``SequenceModel``s of one configuration with their parameters stacked: ``rnn.weight_hh_l0`` of shape
    (G*H, H) becomes the parameter ``rnn_weight_hh_l0`` of shape (P, G*H, H). ``forward`` maps inputs
    (P, B, T[, in]) to outputs (P, B, T, O); :meth:`member_model` gives member i back as a ``SequenceModel``."""

    def __init__(self, models: list[SequenceModel]):
        super().__init__()
        template = models[0]
        self.family = _family(template.rnn)
        if self.family is None:
            raise ValueError(f"no population form for {type(template.rnn).__name__}; see supports_population")
        self._template = [copy.deepcopy(template)]  # in a list: not a submodule, its parameters are not ours
        rows = {"lstm": "_loop_rows", "depth_gated": "_rows"}.get(self.family)  # the walks' gate layouts
        if rows:
            self.register_buffer("_rows", getattr(self.cell, rows).clone(), persistent=False)
        self.names = [name for name, _ in template.named_parameters()]
        for name in self.names:
            stacked = torch.stack([dict(m.named_parameters())[name].detach() for m in models])
            self.register_parameter(name.replace(".", "_"), nn.Parameter(stacked))
        self.has_embed = template.embed is not None
        self.fused = True  # LSTM family: hand-written BPTT (_LSTMRecurrence); False: autograd on the loop (_lstm)

    @property
    def cell(self) -> nn.Module:
        """The first member's variant: its sizes and switches, not its weights."""
        return self._template[0].rnn

    def w(self, name: str) -> torch.Tensor:
        """The stacked parameter named as in ``SequenceModel`` (``"rnn.weight_ih_l0"``)."""
        return getattr(self, name.replace(".", "_"))

    def rnn_w(self, name: str) -> torch.Tensor:
        """The stacked parameter named as in the variant (``"weight_ih_l0"``)."""
        return self.w("rnn." + name)

    @property
    def size(self) -> int:
        return self.w(self.names[0]).shape[0]

    def keep(self, members: list[int]) -> None:
        """Drop every member not listed (positions in the current population)."""
        index = torch.tensor(members, device=self.w(self.names[0]).device)
        for name in self.names:
            self.register_parameter(name.replace(".", "_"), nn.Parameter(self.w(name).detach()[index]))

    def member_model(self, i: int) -> SequenceModel:
        """Member i (position in the current population) as an ordinary ``SequenceModel``, weights copied."""
        model = copy.deepcopy(self._template[0]).to(self.w(self.names[0]).device)
        model.load_state_dict({name: self.w(name).detach()[i] for name in self.names}, strict=True)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P = x.shape[0]
        if self.has_embed:  # tokens (P, B, T): each member looks up its own table
            members = torch.arange(P, device=x.device).view(P, 1, 1)
            x = self.w("embed.weight")[members, x]
        x = x.transpose(1, 2)  # (P, T, B, in) inside: each member's steps, each step's batch contiguous
        if self.family == "depth_gated":
            x = self._depth_gated(x)
        else:
            for k in range(self.cell.num_layers):
                x = self._layer(k, x)  # (P, T, B, H)
        _, T, B, H = x.shape
        out = torch.baddbmm(self.w("head.bias").unsqueeze(1), x.reshape(P, T * B, H), _t(self.w("head.weight")))
        return out.view(P, T, B, -1).transpose(1, 2)

    def _depth_gated(self, x: torch.Tensor) -> torch.Tensor:
        """The depth-gated stack over x (P, T, B, in), returning (P, T, B, H): variants/depth_gated.py's walk
        with a member axis; each layer gets the cells of the layer below, the lowest the projection W_proj x."""
        P, T, B, n_in = x.shape
        lower = torch.bmm(x.reshape(P, T * B, n_in), _t(self.w("rnn.weight_proj"))).view(P, T, B, -1)
        h0 = lower.new_zeros(P, B, lower.shape[-1])
        for k in range(self.cell.num_layers):
            x, lower, _, _ = _DepthGatedRecurrence.apply(x, lower, h0, h0,
                                                         *layer_weights(self.cell, k, self.rnn_w, self._rows))
        return x

    def _layer(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Layer k over x (P, T, B, in), returning (P, T, B, H)."""
        P, T, B, _ = x.shape
        w_ih = self.w(f"rnn.weight_ih_l{k}")
        if self.family == "clockwork":  # (P, H, H), block upper-triangular
            w_hh = self.cell.recurrent_matrix(k, self.rnn_w)
        else:
            w_hh = self.w(f"rnn.weight_hh_l{k}")
        b_ih, b_hh = self.w(f"rnn.bias_ih_l{k}"), self.w(f"rnn.bias_hh_l{k}")
        H = w_hh.shape[-1]
        h = x.new_zeros(P, B, H)
        if self.family == "lstm":
            rows = self._rows
            w_ih, w_hh, b = w_ih[:, rows], w_hh[:, rows], (b_ih + b_hh)[:, rows]
        elif self.family == "gru":  # b_hh stays inside the reset gate's product (torch's convention)
            b = b_ih
        else:
            b = b_ih + b_hh
        if self.family == "lstm" and self.fused:
            cell = self.cell
            peep = self.w(f"rnn.weight_peephole_l{k}") if cell.peephole else None
            w_gg = self.w(f"rnn.weight_gg_l{k}") if cell.full_gate_recurrence else None
            # (P, 1+in+H, G*H): [1, x_t, h_{t-1}] times it is a step's pre-activations, bias included
            w = _t(torch.cat([b.unsqueeze(2), w_ih, w_hh], 2))
            return _LSTMRecurrence.apply(cell, x, w, peep, w_gg)
        xp = torch.baddbmm(b.unsqueeze(1), x.reshape(P, T * B, -1), _t(w_ih)).view(P, T, B, -1)
        if self.family == "clockwork":  # variants/clockwork.py's walk: at step t only the modules due update
            cell = self.cell
            plan = _schedule(cell.periods, cell.module_size, T, 0)
            return _ClockworkRecurrence.apply(plan, cell.module_size, xp, h, w_hh)[0]
        steps = xp.unbind(1)
        if self.family == "lstm":
            return self._lstm(k, steps, h, _t(w_hh))
        outs = []
        if self.family == "rnn":  # h = φ(W x + b_ih + U h + b_hh)
            act = torch.relu if self.cell.nonlinearity == "relu" else torch.tanh
            u = _t(w_hh)
            for xt in steps:
                h = act(torch.baddbmm(xt, h, u))
                outs.append(h)
        elif self.family == "gru":  # n = tanh(W_n x + b_in + r ⊙ (U_n h + b_hn))
            u, b_hh = _t(w_hh), b_hh.unsqueeze(1)
            for xt in steps:
                hp = torch.baddbmm(b_hh, h, u)
                rz = (xt[..., :2 * H] + hp[..., :2 * H]).sigmoid()
                n = torch.addcmul(xt[..., 2 * H:], rz[..., :H], hp[..., 2 * H:]).tanh()
                h = torch.lerp(n, h, rz[..., H:])  # (1 - z) n + z h
                outs.append(h)
        else:  # gru_cho: n = tanh(W_n x + U_n (r ⊙ h) + b), every bias outside the reset gate
            u_rz, u_n = _t(w_hh[:, :2 * H]), _t(w_hh[:, 2 * H:])
            for xt in steps:
                rz = torch.baddbmm(xt[..., :2 * H], h, u_rz).sigmoid()
                n = torch.baddbmm(xt[..., 2 * H:], rz[..., :H] * h, u_n).tanh()
                h = torch.lerp(n, h, rz[..., H:])
                outs.append(h)
        return torch.stack(outs, 1)

    def _lstm(self, k, steps, h, u):
        """The LSTM family's equations (variants/lstm.py's docstring), every switch, in the loop's gate layout;
        autograd on a plain loop: the slow twin of _LSTMRecurrence, which the tests compare it with."""
        cell = self.cell
        P, B, H = h.shape
        si, sf, sg, so = cell._slices()
        S, SH = len(cell.sigmoid_gates), sg.start
        K = (si is not None) + (sf is not None)  # i and f lead the layout
        c = torch.zeros_like(h)
        p_if = p_o = None
        if cell.peephole:
            peep = self.w(f"rnn.weight_peephole_l{k}")                     # (P, S, H), rows i, f, o present
            p_if = peep[:, :K].unsqueeze(1)                                 # (P, 1, K, H)
            p_o = peep[:, S - 1].unsqueeze(1) if so is not None else None   # (P, 1, H)
        if cell.full_gate_recurrence:
            r = _t(self.w(f"rnn.weight_gg_l{k}"))              # (P, S*H, S*H)
            a = h.new_zeros(P, B, SH)                                       # last step's sigmoid activations
        outs = []
        for xt in steps:
            z = torch.baddbmm(xt, h, u)
            z_sig, z_g = z[..., :SH], z[..., SH:]
            if cell.full_gate_recurrence:
                z_sig = torch.baddbmm(z_sig, a, r)
            s_if = i = f = None
            if K:
                z_if = z_sig[..., :K * H]
                if cell.peephole:
                    z_if = torch.addcmul(z_if.unflatten(-1, (K, H)), p_if, c.unsqueeze(2)).flatten(-2)
                s_if = z_if.sigmoid()
                i = s_if[..., si] if si is not None else None
                f = s_if[..., sf] if sf is not None else None
            g = z_g.tanh() if cell.input_activation else z_g
            if f is not None:
                c_new = f * c
            elif cell.coupled:  # f = 1 - i
                c_new = torch.addcmul(c, i, c, value=-1.0)
            else:
                c_new = c
            c = torch.addcmul(c_new, i, g) if i is not None else c_new + g
            y = c.tanh() if cell.output_activation else c
            o = None
            if so is not None:
                z_o = z_sig[..., so]
                if p_o is not None:
                    z_o = torch.addcmul(z_o, p_o, c)
                o = z_o.sigmoid()
                h = o * y
            else:
                h = y
            if cell.full_gate_recurrence:
                a = torch.cat([t for t in (s_if, o) if t is not None], -1)
            outs.append(h)
        return torch.stack(outs, 1)


def _t(w: torch.Tensor) -> torch.Tensor:
    """Stacked (P, m, n) weights transposed to (P, n, m) and made contiguous: CPU bmm copies a transposed
    operand at every call otherwise (measured), here once per forward."""
    return w.transpose(1, 2).contiguous()


class _LSTMRecurrence(torch.autograd.Function):
    """One LSTM-family layer of P stacked members over x (P, T, B, in), with hand-written backpropagation
    through time: the walk over time of ``variants/lstm.py`` (:func:`~variants.lstm.recurrence_forward`,
    :func:`~variants.lstm.recurrence_backward`, the equations and elementwise operations of a sequential run,
    but for the two CPU choices marked below) with a member axis. ``w`` (P, 1+in+H, G*H) stacks b^T
    (b = b_ih + b_hh), W_ih^T and W_hh^T, gate columns in the loop's layout [sigmoid gates, g]. Returns every
    step's h, (P, T, B, H). Choices, each measured on one CPU thread at P = 8-16, H = 32-64, B = 64, T = 100:

    * Each step's pre-activations are one ``bmm`` of [1, x_t, h_{t-1}] with ``w``: the constant 1, x_t and
      h_{t-1} sit side by side in one buffer ``xh`` (P, T+1, B, 1+in+H). Hoisting the input projection out of
      the loop (one bmm over all steps, then a recurrent ``baddbmm`` per step) ran the forward matmuls 1.4-2.4x
      slower: its (P, T, B, G*H) result, 26-105 MB, goes through memory three times, a step's block stays in
      cache. The weight gradient is one bmm, xh^T dZ, the bias's included (its row of ``w``).
    * The activations are time-major (T, P, B, G*H), so each step's matmul writes one contiguous block (a
      member-strided output ran 15-30% slower); cells, dZ and ``xh`` are member-major, so the weight gradients
      are batched matmuls over all steps without transposed copies.
    * Buffers are allocated per call: with :func:`keep_freed_memory` (``train_population`` sets it) they come
      back without page faults; a pool reusing them across steps measured no faster then.
    * (CPU choice) The peepholes' gradients are summed during the backward walk, on each step's data while it
      is in cache (3 small ops per step), not in three passes over the (P, T, B, H) buffers afterwards, which
      took 9% of the step at P = 16, H = 64 (memory-bound; 3% for one model). Only the summation order differs;
      on CUDA the three reductions after the walk are cheaper than 3 more kernel launches per step.
    * (CPU choice) On the CPU, tanh is computed as 2σ(2x) - 1 (``tanh_via_sigmoid``): torch's σ ran 3.6x
      faster per element than its tanh here, and the tanh's are the walk's dearest ops. Mathematically the same
      function; in float32 it departs from torch.tanh by ~1e-7 absolute, so after 30 Adam steps a member's
      parameters differ from its sequential run's by up to ~1e-5 relative instead of ~5e-6 (held-out losses:
      ~1e-7 either way). With the summed peephole gradients: 9-10% faster at P = 8-16, H = 64. Not on CUDA,
      where tanh is cheap.
    """

    @staticmethod
    def forward(ctx, cell, x, w, peep, w_gg):
        P, T, B, n_in = x.shape
        H = cell.hidden_size
        GH = w.shape[2]
        SH = cell._slices()[2].start
        xh = x.new_empty(P, T + 1, B, 1 + n_in + H)  # [1, x_t, h_{t-1}] at t; h_{-1} = 0; row T holds h_{T-1}
        xh[..., 0] = 1
        xh[:, :T, :, 1:1 + n_in] = x
        xh[:, T, :, 1:1 + n_in] = 0
        hs = xh[..., 1 + n_in:]
        hs[:, 0] = 0
        acts = x.new_empty(T, P, B, GH)             # time-major: each step's matmul writes one block
        cs = x.new_empty(P, T + 1, B, H)
        cs[:, 0] = 0
        ys = x.new_empty(P, T, B, H) if cell.output_activation else cs[:, 1:]
        a0 = x.new_zeros(P, B, SH) if w_gg is not None else None
        xh_t = xh.unbind(1)

        def project(t, out):                         # [1, x_t, h_{t-1}] w, into the step's activations
            torch.bmm(xh_t[t], w, out=out)

        recurrence_forward(cell, acts.unbind(0), cs.unbind(1), hs.unbind(1), ys.unbind(1), project, peep,
                           _t(w_gg) if w_gg is not None else None, a0, tanh_via_sigmoid=x.device.type == "cpu")
        ctx.cell, ctx.n_in = cell, n_in
        ctx.save_for_backward(xh, acts, cs, ys if cell.output_activation else None, w, peep, w_gg, a0)
        return hs[:, 1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        cell, n_in = ctx.cell, ctx.n_in
        xh, acts, cs, ys, w, peep, w_gg, a0 = ctx.saved_tensors
        if ys is None:
            ys = cs[:, 1:]
        T, P, B, GH = acts.shape
        H = cell.hidden_size
        SH = cell._slices()[2].start
        dZ = acts.new_empty(P, T, B, GH)            # gradients of the gate pre-activations, member-major
        dh, dc = acts.new_zeros(P, B, H), acts.new_zeros(P, B, H)
        da = acts.new_zeros(P, B, SH) if w_gg is not None else None
        acc = None  # CPU: the peepholes' gradients, summed over steps during the walk (then over the batch)
        if peep is not None and acts.device.type == "cpu":
            si, sf, _, so = cell._slices()
            acc = [acts.new_zeros(P, B, H) if sl is not None else None for sl in (si, sf, so)]
        recurrence_backward(cell, acts.unbind(0), cs.unbind(1), ys.unbind(1),
                            d_out.unbind(1) if d_out is not None else None, dZ.unbind(1), dh, dc, da,
                            _t(w[:, 1 + n_in:]), peep, w_gg, peep_grads=acc)
        flat = dZ.view(P, T * B, GH)
        d_w = torch.bmm(xh[:, :T].reshape(P, T * B, 1 + n_in + H).transpose(1, 2), flat)  # the bias's row too
        d_x = None
        if ctx.needs_input_grad[1]:
            d_x = torch.bmm(flat, w[:, 1:1 + n_in].transpose(1, 2)).view(P, T, B, n_in)
        d_peep, d_w_gg = recurrence_small_grads(cell, dZ, cs, peep is not None and acc is None,
                                                (acts[:-1, ..., :SH].transpose(0, 1), a0) if w_gg is not None else None)
        if acc is not None:
            d_peep = torch.stack([u.sum(1) for u in acc if u is not None], 1)
        return None, d_x, d_w, d_peep, d_w_gg


class PopulationOptimizer:
    """torch's Adam / SGD (momentum, Nesterov) / RMSprop update rules (torch/optim/*.py, single-tensor path)
    applied to stacked parameters with a learning rate and weight decay per member (tensors of shape (P,)).
    State is keyed by parameter name, so the population can drop members (:meth:`keep`) between steps."""

    def __init__(self, name: str, lr: torch.Tensor, weight_decay: torch.Tensor, momentum: float = 0.0,
                 betas=(0.9, 0.999), eps: float = 1e-8, alpha: float = 0.99):
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
        self.name, self.lr, self.weight_decay = name, lr, weight_decay
        self.momentum, self.betas, self.eps, self.alpha = momentum, betas, eps, alpha
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.t = 0
        self._decay = bool((weight_decay != 0).any())

    def keep(self, members: list[int]) -> None:
        index = torch.tensor(members, device=self.lr.device)
        self.lr, self.weight_decay = self.lr[index], self.weight_decay[index]
        self._decay = bool((self.weight_decay != 0).any())
        self.state = {n: {k: v[index] for k, v in s.items()} for n, s in self.state.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor]) -> None:
        self.t += 1
        for name, p in params.items():
            g = p.grad
            if g is None:
                continue
            per = (-1,) + (1,) * (p.dim() - 1)
            lr = self.lr.view(per)
            if self._decay:
                g = g + self.weight_decay.view(per) * p
            s = self.state.setdefault(name, {})
            if self.name == "adam":
                b1, b2 = self.betas
                if not s:
                    s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
                s["m"].lerp_(g, 1 - b1)
                s["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (s["v"].sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
                p.sub_((s["m"] / denom).mul_(lr / (1 - b1 ** self.t)))
            elif self.name in ("sgd", "nesterov"):
                if self.momentum:
                    if not s:
                        s["buf"] = g.clone()
                    else:
                        s["buf"].mul_(self.momentum).add_(g)
                    g = g + self.momentum * s["buf"] if self.name == "nesterov" else s["buf"]
                p.sub_(g * lr)
            else:  # rmsprop
                if not s:
                    s["sq"] = torch.zeros_like(p)
                s["sq"].mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
                p.sub_((g / s["sq"].sqrt().add_(self.eps)).mul_(lr))


def clip_grad_norm_per_member_(params: list[torch.Tensor], max_norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_`` for each member separately: member m's gradients, over all parameters, are scaled by
    min(1, max_norm[m] / (‖g_m‖ + 1e-6)). ``max_norm`` inf: no clipping. Returns the norms (P,)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)))
    return norms


def _stack_batches(batches: list[Batch]) -> torch.Tensor:
    """The members' inputs as one (P, B, T[, in]) tensor; shorter ones padded at the end (models are causal)."""
    T = max(b.x.shape[1] for b in batches)
    xs = []
    for b in batches:
        pad = T - b.x.shape[1]
        x = b.x
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 3 else (0, pad))
        xs.append(x)
    return torch.stack(xs)


def member_losses(task: Task, out: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
    """Each member's loss on its own batch, shape (P,)."""
    return torch.stack([task.loss(out[i, :, :b.x.shape[1]], b) for i, b in enumerate(batches)])


def train_population(task: Task, spec: PopulationSpec, members: list[Member], cfg: TrainConfig, eval_batch: Batch,
                     on_eval: Callable[[int, int, dict[str, float]], None] | None = None,
                     device: str | torch.device | None = None) -> list[MemberResult]:
    """Train every member as :func:`studies.training.train` would with its seed, all at once.

    ``cfg`` gives what members share (steps, batch size, eval_every, max_seconds, optimizer, momentum); its lr,
    grad_clip and weight_decay are ignored for each member's own. ``on_eval(member, step, metrics)`` (member: the
    index into ``members``) raising makes that member leave (pruned, say); the exception is kept as its result's
    ``error``. Results come in ``members`` order. ``device``: "cpu" (default), "cuda", "auto".
    """
    if not supports_population(spec.variant, spec.switches, spec.num_layers, spec.dropout):
        raise ValueError(f"variant {spec.variant!r} with switches {spec.switches} has no population form; "
                         "train its runs one by one (see supports_population)")
    torch.set_flush_denormal(True)  # subnormal floats can slow CPU recurrences ~10x
    full_float32()
    device = resolve_device(device or "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    pop = PopulationModel(member_models(task, spec, [m.seed for m in members])).to(device)
    eval_batch = batch_to(eval_batch, device)
    generators = [torch.Generator().manual_seed(m.seed) for m in members]
    opt = PopulationOptimizer(cfg.optimizer, torch.tensor([float(m.lr) for m in members], device=device),
                              torch.tensor([float(m.weight_decay) for m in members], device=device), cfg.momentum)
    clip = torch.tensor([float(m.grad_clip) if m.grad_clip else math.inf for m in members], device=device)
    any_clip = any(m.grad_clip for m in members)
    first_bad = torch.zeros(len(members), dtype=torch.long, device=device)  # first non-finite step; 0: none
    bad_loss = torch.zeros(len(members), device=device)
    alive = list(range(len(members)))  # the members still training, by index into ``members``
    results = [MemberResult(metrics={}, own_seconds=0.0) for _ in members]
    start = last = time.perf_counter()
    step = 0
    while step < cfg.steps and alive:
        pop.train()
        batches = [task.sample(cfg.batch_size, generators[j], device) for j in alive]
        losses = member_losses(task, pop(_stack_batches(batches)), batches)
        new = ~torch.isfinite(losses.detach()) & (first_bad == 0)
        first_bad = torch.where(new, step + 1, first_bad)
        bad_loss = torch.where(new, losses.detach(), bad_loss)
        pop.zero_grad(set_to_none=True)
        losses.sum().backward()
        params = {name: pop.w(name) for name in pop.names}
        if any_clip:
            clip_grad_norm_per_member_(list(params.values()), clip)
        opt.step(params)
        step += 1
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - start >= cfg.max_seconds
        if not (step % cfg.eval_every == 0 or step == cfg.steps or out_of_time):
            continue
        bad_steps, bad_values = first_bad.tolist(), bad_loss.tolist()
        metrics = _evaluate(task, pop, eval_batch)
        now = time.perf_counter()
        seconds, share, last = now - start, (now - last) / len(alive), now
        leaving = []
        for slot, j in enumerate(alive):
            r = results[j]
            r.steps, r.seconds = step, seconds
            r.own_seconds += share
            if bad_steps[slot]:
                r.error = Divergence(f"training loss became {bad_values[slot]} at step {bad_steps[slot]}")
                leaving.append(slot)
                continue
            r.metrics = metrics[slot]
            r.history.append((step, r.metrics))
            try:
                if on_eval is not None:
                    on_eval(j, step, r.metrics)
            except Exception as e:  # noqa: BLE001 - the member's own failure (e.g. pruned); the others go on
                r.error = e
                leaving.append(slot)
        if out_of_time or step == cfg.steps:
            leaving = list(range(len(alive)))
        for slot in leaving:
            results[alive[slot]].model = pop.member_model(slot)
        if leaving:
            kept = [s for s in range(len(alive)) if s not in leaving]
            alive = [alive[s] for s in kept]
            if alive:
                pop.keep(kept)
                opt.keep(kept)
                index = torch.tensor(kept, device=device)
                clip, first_bad, bad_loss = clip[index], first_bad[index], bad_loss[index]
    return results


_KEPT = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process (Linux with glibc; elsewhere a no-op, False).

    By default glibc serves blocks over 32 MB with a fresh mmap and trims the heap when a large top is freed, so
    a population's step buffers (tens to hundreds of MB: activations, the layer output, its gradient) come back
    as new pages at every training step, each page faulted in on first touch: 19,700 minor faults per step for
    P=16, H=64, B=64, T=100 (3,800 at P=8, H=32), about as long as the walk over time itself. With
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 1 GiB: none (measured with ``getrusage``; sequential runs of the
    same model went from 2,400 to 530 per step). Process-wide and not undone: the process keeps its peak memory
    (the population's working set, which every step needs again) instead of handing it back between steps."""
    global _KEPT
    if _KEPT:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        _KEPT = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
    return _KEPT


@torch.no_grad()
def _evaluate(task: Task, pop: PopulationModel, batch: Batch) -> list[dict[str, float]]:
    """Each member's held-out metrics, on the shared held-out batch."""
    pop.eval()
    out = pop(batch.x.expand(pop.size, *batch.x.shape))
    return [task.metrics(out[i], batch) for i in range(pop.size)]



# --- timing: the measurements population_pays is drawn from (benchmarks/population.py, `rnnbench bench --population`)

BENCH_FAMILIES = ("lstm", "peephole", "cifg", "nig", "nfg", "nog", "niaf", "noaf", "fgr", "gru", "gru_cho", "rnn",
                  "depth_gated", "clockwork")
# greff is peephole's equations under another name; cifg/nig/.../fgr are Greff et al.'s LSTM-family ablations.
# The default: one of each code path (the other ablations run peephole's loop).
DEFAULT_BENCH_FAMILIES = ("lstm", "peephole", "fgr", "gru", "gru_cho", "rnn", "depth_gated", "clockwork")


def benchmark_population(families: list[str] | None = None, hidden_sizes=(32, 64, 128), sizes=(1, 4, 8, 16, 32),
                         batch: int = 64, seq_len: int = 100, device: str = "cpu", threads: int = 1,
                         warmup: int = 1, repeats: int = 3, clock: str = "auto") -> list[dict]:
    """Per family and hidden size, one training step (forward, backward, clipping, Adam) of one model, and of
    populations of each size, on the adding task (B=batch, T=seq_len). Timed round-robin over the runners after
    ``warmup`` rounds: each of ``repeats`` rounds times one sequential step and one step of each population, so
    each round gives its own ratio. Rows: family, hidden, members, seq_ms and pop_ms (medians over rounds: one
    model's step, the population's step), speedup (the median over rounds of members * seq / pop: per-model
    throughput against the same runs one after another) and its range over rounds, speedup_lo, speedup_hi.

    ``clock``: "wall" (``perf_counter``), "cpu" (this process's CPU time, ``process_time``), or "auto": CPU time
    on the CPU with one thread, wall time otherwise. On a shared machine CPU time leaves out the time other
    processes hold the core (1 thread: CPU time is the step's own work); with several threads it would add the
    threads' times up, and CUDA work is not CPU time: wall time there."""
    from tasks import build_task

    torch.set_flush_denormal(True)
    full_float32()
    keep_freed_memory()  # for the sequential runs too: they are timed in this process, under the same malloc
    torch.set_num_threads(threads)
    device = resolve_device(device)
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and threads == 1 else "wall"
    now = {"cpu": time.process_time, "wall": time.perf_counter}[clock]
    task = build_task("adding", seq_len=seq_len)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for family in families or DEFAULT_BENCH_FAMILIES:
        for hidden in hidden_sizes:
            spec = PopulationSpec(family, {}, hidden_size=hidden)
            runners = {0: _sequential_step(task, spec, batch, device)}
            runners.update({p: population_step(task, spec, p, batch, device) for p in sizes})
            times = {k: [] for k in runners}
            for r in range(warmup + repeats):
                for k, run in runners.items():
                    sync()
                    t0 = now()
                    run()
                    sync()
                    if r >= warmup:
                        times[k].append(now() - t0)
            for p in sizes:
                ratios = sorted(p * s / q for s, q in zip(times[0], times[p]))
                rows.append(dict(family=family, hidden=hidden, members=p, seq_ms=median(times[0]) * 1e3,
                                 pop_ms=median(times[p]) * 1e3, speedup=median(ratios), speedup_lo=ratios[0],
                                 speedup_hi=ratios[-1], clock=clock))
    return rows


def _sequential_step(task, spec, batch, device):
    model = member_models(task, spec, [0])[0].to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = batch_to(task.sample(batch, torch.Generator().manual_seed(0)), device)

    def step():
        loss = task.loss(model(b.x), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def population_step(task, spec, size, batch, device):
    """One training step of a population of ``size`` members (Adam, clipping), as a closure; also what
    ``rnnbench plan`` times."""
    pop = PopulationModel(member_models(task, spec, list(range(size)))).to(device)
    opt = PopulationOptimizer("adam", torch.full((size,), 1e-3, device=device), torch.zeros(size, device=device))
    clip = torch.ones(size, device=device)
    batches = [batch_to(task.sample(batch, torch.Generator().manual_seed(i)), device) for i in range(size)]
    x = _stack_batches(batches)

    def step():
        losses = member_losses(task, pop(x), batches)
        pop.zero_grad(set_to_none=True)
        losses.sum().backward()
        params = {name: pop.w(name) for name in pop.names}
        clip_grad_norm_per_member_(list(params.values()), clip)
        opt.step(params)
    return step


def format_population_table(rows: list[dict]) -> str:
    """A markdown table of :func:`benchmark_population`'s rows."""
    clock = rows[0]["clock"] if rows else "wall"
    lines = [f"| family | hidden | members | one model ms/step ({clock}) | population ms/step | "
             "speed-up (models/s), median (range over rounds) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['hidden']} | {r['members']} | {r['seq_ms']:.1f} | {r['pop_ms']:.1f} | "
                     f"{r['speedup']:.2f}x ({r['speedup_lo']:.2f}-{r['speedup_hi']:.2f}) |")
    return "\n".join(lines)
