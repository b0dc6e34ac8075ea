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

The recurrence is a plain loop over time in autograd (one ``baddbmm`` and a few elementwise ops per step);
equations as in the variants' docstrings: ``variants/lstm.py`` (every LSTM-family switch: Hochreiter &
Schmidhuber 1997, Gers et al. 2000, Greff et al. 2017), ``variants/gru.py`` (Cho et al. 2014, both reset
conventions), ``variants/elman.py`` (Elman 1990; tanh or relu). Other variants (depth_gated, clockwork) are not
supported: :func:`supports_population` says so and callers run them one after another.

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
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from studies.training import Divergence, SequenceModel, TrainConfig, TrainResult, batch_to, resolve_device
from tasks import Batch, Task
from variants import build_variant
from variants.elman import ElmanRNN
from variants.gru import GRU
from variants.lstm import LSTM, _sigmoid_backward, _tanh_backward

__all__ = ["PopulationSpec", "Member", "MemberResult", "PopulationModel", "PopulationOptimizer",
           "train_population", "member_models", "supports_population", "population_pays"]


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
    stopped: bool = False                # on_eval returned False
    model: SequenceModel | None = None   # the member's weights when it left or finished (e.g. for gradient_by_lag)


def _family(rnn: nn.Module) -> str | None:
    if isinstance(rnn, LSTM):
        return "lstm"
    if isinstance(rnn, GRU):
        return "gru_cho" if not rnn.reset_after else "gru"
    if isinstance(rnn, ElmanRNN):
        return "rnn"
    return None


def supports_population(variant: str, switches: dict[str, Any] | None = None, num_layers: int = 1,
                        dropout: float = 0.0) -> bool:
    """Whether :func:`train_population` can train this configuration; if not, run the members one by one.

    Supported: the LSTM family (every switch), GRU (both conventions), Elman RNN. Not with dropout between
    layers: sequential runs draw their dropout masks from the global RNG, which a population cannot replay."""
    if num_layers > 1 and dropout > 0:
        return False
    try:
        with torch.device("meta"):
            rnn = build_variant(variant, 1, 4, num_layers, 0.0, **(switches or {}))
    except (ValueError, TypeError):
        return False
    return _family(rnn) is not None


def population_pays(variant: str, switches: dict[str, Any] | None, hidden_size: int,
                    device: str | torch.device) -> bool:
    """Whether training replicates as one population beats running them one after another.

    Drawn from ``python benchmarks/population.py`` (adding task, B=64, T=100, one CPU thread, Adam + clipping;
    per-model throughput of populations of 8-16 against sequential runs, on a shared 2-core machine, so ±30%):
    at hidden 32-64 a population trained 1.4-2x (custom LSTM loops), 1.5-2.9x (nn.GRU, gru_cho) and 1.4-7x
    (nn.RNN) as many models per second; at hidden 128 about 1x; the fused nn.LSTM kernel (``lstm``/``np``) was
    always faster alone (0.4-0.8x). On CUDA a small RNN's step is kernel launches, which a population shares:
    taken to pay always (``benchmarks/gpu.sh`` measures it)."""
    if not supports_population(variant, switches):
        return False
    if torch.device(device).type == "cuda":
        return True
    with torch.device("meta"):
        rnn = build_variant(variant, 1, 4, **(switches or {}))
    native_lstm = isinstance(rnn, LSTM) and rnn.native
    return not native_lstm and hidden_size <= 64


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
        if self.family == "lstm":  # the loop's gate layout [sigmoid gates, g], as in variants/lstm.py
            self.register_buffer("_rows", self.cell._loop_rows.clone(), persistent=False)
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
        for k in range(self.cell.num_layers):
            x = self._layer(k, x)  # (P, T, B, H)
        _, T, B, H = x.shape
        out = torch.baddbmm(self.w("head.bias").unsqueeze(1), x.reshape(P, T * B, H), _t(self.w("head.weight")))
        return out.view(P, T, B, -1).transpose(1, 2)

    def _layer(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Layer k over x (P, T, B, in), returning (P, T, B, H)."""
        P, T, B, _ = x.shape
        w_ih, w_hh = self.w(f"rnn.weight_ih_l{k}"), self.w(f"rnn.weight_hh_l{k}")
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
        xp = torch.baddbmm(b.unsqueeze(1), x.reshape(P, T * B, -1), _t(w_ih)).view(P, T, B, -1)
        if self.family == "lstm" and self.fused:
            cell = self.cell
            peep = self.w(f"rnn.weight_peephole_l{k}") if cell.peephole else None
            w_gg = self.w(f"rnn.weight_gg_l{k}") if cell.full_gate_recurrence else None
            a0 = h.new_zeros(P, B, len(cell.sigmoid_gates) * H) if w_gg is not None else None
            return _LSTMRecurrence.apply(cell, xp, h, h, a0, w_hh, peep, w_gg)
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
    """variants/lstm.py's ``_Recurrence`` with a member axis: one LSTM-family layer over precomputed input
    projections xp (P, T, B, G*H) in the loop's gate layout [sigmoid gates, g], weights (P, ...); every step
    one ``baddbmm`` for all P members. Same equations and order of operations as the sequential twin: forward in
    place in preallocated buffers; backward walks time in reverse computing the pre-activation gradients dZ and
    the state gradients, then each weight gradient is one batched matmul over all steps. Layout: the
    activations are time-major (T, P, B, G*H), so each step's matmul writes one contiguous block; states and
    dZ are member-major (P, T, B, .), so the weight gradients need no transposed copies. Returns every step's
    h, (P, T, B, H)."""

    @staticmethod
    def forward(ctx, cell, xp, h0, c0, a0, w_hh, peep, w_gg):
        P, T, B, GH = xp.shape
        H = cell.hidden_size
        si, sf, sg, so = cell._slices()
        SH, S = sg.start, len(cell.sigmoid_gates)
        K = (si is not None) + (sf is not None)      # i and f, the gates before the cell update
        KH = K * H
        p_if = peep[:, :K].unsqueeze(1) if peep is not None else None                     # (P, 1, K, H)
        p_o = peep[:, S - 1].unsqueeze(1) if peep is not None and so is not None else None  # (P, 1, H)
        acts = xp.new_empty(T, P, B, GH)
        cs, hs = xp.new_empty(P, T + 1, B, H), xp.new_empty(P, T + 1, B, H)
        cs[:, 0], hs[:, 0] = c0, h0
        ys = xp.new_empty(P, T, B, H) if cell.output_activation else cs[:, 1:]
        w_hh_t = _t(w_hh)
        w_gg_t = _t(w_gg) if w_gg is not None else None
        for t in range(T):
            a, c_prev, c, y = acts[t], cs[:, t], cs[:, t + 1], ys[:, t]
            torch.baddbmm(xp[:, t], hs[:, t], w_hh_t, out=a)
            if w_gg is not None:
                a[..., :SH].baddbmm_(acts[t - 1, ..., :SH] if t else a0, w_gg_t)
            if KH:
                z_if = a[..., :KH]
                if p_if is not None:
                    z_if.view(P, B, K, H).addcmul_(p_if, c_prev.unsqueeze(2))
                z_if.sigmoid_()
            i = a[..., si] if si is not None else None
            f = a[..., sf] if sf is not None else None
            g = a[..., sg]
            if cell.input_activation:
                g.tanh_()
            if f is not None:
                torch.mul(f, c_prev, out=c)
            elif cell.coupled:
                torch.addcmul(c_prev, i, c_prev, value=-1.0, out=c)
            else:
                c.copy_(c_prev)
            if i is not None:
                c.addcmul_(i, g)
            else:
                c.add_(g)
            if cell.output_activation:
                torch.tanh(c, out=y)
            if so is not None:
                o = a[..., so]
                if p_o is not None:
                    o.addcmul_(p_o, c)
                o.sigmoid_()
                torch.mul(o, y, out=hs[:, t + 1])
            else:
                hs[:, t + 1].copy_(y)
        ctx.cell = cell
        ctx.save_for_backward(acts, cs, hs, ys if cell.output_activation else None, w_hh, peep, w_gg, a0)
        return hs[:, 1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        cell = ctx.cell
        acts, cs, hs, ys, w_hh, peep, w_gg, a0 = ctx.saved_tensors
        if ys is None:
            ys = cs[:, 1:]
        T, P, B, GH = acts.shape
        H = cell.hidden_size
        si, sf, sg, so = cell._slices()
        SH, S = sg.start, len(cell.sigmoid_gates)
        K = (si is not None) + (sf is not None)
        KH = K * H
        p_i = peep[:, 0].unsqueeze(1) if peep is not None and si is not None else None
        p_f = peep[:, K - 1].unsqueeze(1) if peep is not None and sf is not None else None
        p_o = peep[:, S - 1].unsqueeze(1) if peep is not None and so is not None else None
        dZ = hs.new_empty(P, T, B, GH)
        dh, dc = hs.new_zeros(P, B, H), hs.new_zeros(P, B, H)
        da = hs.new_zeros(P, B, SH) if w_gg is not None else None
        for t in reversed(range(T)):
            dh.add_(d_out[:, t])
            a, dz, c_prev, y = acts[t], dZ[:, t], cs[:, t], ys[:, t]
            i = a[..., si] if si is not None else None
            f = a[..., sf] if sf is not None else None
            g = a[..., sg]
            if so is not None:
                o, dzo = a[..., so], dz[..., so]
                torch.mul(dh, y, out=dzo)
                if da is not None:
                    dzo.add_(da[..., so])
                _sigmoid_backward(dzo, o, out=dzo)
                dy = dh * o
            else:
                dy = dh
            if cell.output_activation:
                dc.add_(_tanh_backward(dy, y, out=dy if so is not None else None))
            else:
                dc.add_(dy)
            if p_o is not None:
                dc.addcmul_(dzo, p_o)
            dzg = dz[..., sg]
            if i is not None:
                torch.mul(dc, i, out=dzg)
            else:
                dzg.copy_(dc)
            if cell.input_activation:
                _tanh_backward(dzg, g, out=dzg)
            if i is not None:
                dzi = dz[..., si]
                torch.mul(dc, g, out=dzi)
                if cell.coupled:
                    dzi.addcmul_(dc, c_prev, value=-1.0)
            if f is not None:
                dzf = dz[..., sf]
                torch.mul(dc, c_prev, out=dzf)
            if KH:
                dz_if = dz[..., :KH]
                if da is not None:
                    dz_if.add_(da[..., :KH])
                _sigmoid_backward(dz_if, a[..., :KH], out=dz_if)
            if f is not None:
                dc.mul_(f)                            # now dc is d loss / d c_{t-1}
            elif cell.coupled:
                dc.mul_(1.0 - i)
            if p_i is not None:
                dc.addcmul_(dzi, p_i)
            if p_f is not None:
                dc.addcmul_(dzf, p_f)
            torch.bmm(dz, w_hh, out=dh)               # d loss / d h_{t-1}, before adding d_out[t-1]
            if da is not None:
                torch.bmm(dz[..., :SH], w_gg, out=da)
        flat = dZ.view(P, T * B, GH)
        d_w_hh = torch.bmm(hs[:, :-1].reshape(P, T * B, H).transpose(1, 2), flat).transpose(1, 2)
        d_peep = d_w_gg = None
        if peep is not None:
            rows = []
            for gate, sl in (("i", si), ("f", sf), ("o", so)):
                if sl is not None:
                    cell_seen = cs[:, 1:] if gate == "o" else cs[:, :-1]  # o peeks at c_t, i and f at c_{t-1}
                    rows.append((dZ[..., sl] * cell_seen).sum((1, 2)))
            d_peep = torch.stack(rows, 1)
        if w_gg is not None:  # step t's gates hear step t-1's activations; step 0's hear a0
            d_w_gg_t = torch.bmm(a0.transpose(1, 2), dZ[:, 0, :, :SH])
            if T > 1:
                prev = acts[:-1, ..., :SH].transpose(0, 1).reshape(P, -1, SH)
                d_w_gg_t.baddbmm_(prev.transpose(1, 2), dZ[:, 1:, :, :SH].reshape(P, -1, SH))
            d_w_gg = d_w_gg_t.transpose(1, 2)
        return None, dZ, dh, dc, da, d_w_hh, d_peep, d_w_gg


class PopulationOptimizer:
    """torch's Adam / SGD (momentum, Nesterov) / RMSprop update rules (torch/optim/*.py, single-tensor path)
    applied to stacked parameters with a learning rate and weight decay per member (tensors of shape (P,)).
    State is keyed by parameter name, so the population can drop members (:meth:`keep`) between steps."""

    def __init__(self, name: str, lr: torch.Tensor, weight_decay: torch.Tensor, momentum: float = 0.9,
                 betas=(0.9, 0.999), eps: float = 1e-8, alpha: float = 0.99):
        if name not in ("adam", "sgd", "nesterov", "rmsprop"):
            raise ValueError(f"optimizer {name!r}; known: adam, sgd, nesterov, rmsprop")
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
                     on_eval: Callable[[int, int, dict[str, float]], bool | None] | None = None,
                     device: str | torch.device | None = None) -> list[MemberResult]:
    """Train every member as :func:`studies.training.train` would with its seed, all at once.

    ``cfg`` gives what members share (steps, batch size, eval_every, max_seconds, optimizer, momentum); its lr,
    grad_clip and weight_decay are ignored for each member's own. ``on_eval(member, step, metrics)`` (member: the
    index into ``members``) returning False, or raising, makes that member leave; the exception is kept as its
    result's ``error``. Results come in ``members`` order. ``device``: "cpu" (default), "cuda", "auto".
    """
    if not supports_population(spec.variant, spec.switches, spec.num_layers, spec.dropout):
        raise ValueError(f"variant {spec.variant!r} with switches {spec.switches} has no population form; "
                         "train its runs one by one (see supports_population)")
    torch.set_flush_denormal(True)  # subnormal floats can slow CPU recurrences ~10x
    device = resolve_device(device or "cpu")
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
    results = [MemberResult(metrics={}) for _ in members]
    start = time.perf_counter()
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
        seconds = time.perf_counter() - start
        bad_steps, bad_values = first_bad.tolist(), bad_loss.tolist()
        metrics = _evaluate(task, pop, eval_batch)
        leaving = []
        for slot, j in enumerate(alive):
            r = results[j]
            r.steps, r.seconds = step, seconds
            if bad_steps[slot]:
                r.error = Divergence(f"training loss became {bad_values[slot]} at step {bad_steps[slot]}")
                leaving.append(slot)
                continue
            r.metrics = metrics[slot]
            r.history.append((step, r.metrics))
            try:
                go_on = on_eval(j, step, r.metrics) if on_eval is not None else True
            except Exception as e:  # noqa: BLE001 - the member's own failure (e.g. pruned); the others go on
                r.error, go_on = e, False
            if go_on is False:
                r.stopped = r.error is None
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


@torch.no_grad()
def _evaluate(task: Task, pop: PopulationModel, batch: Batch) -> list[dict[str, float]]:
    """Each member's held-out metrics, on the shared held-out batch."""
    pop.eval()
    out = pop(batch.x.expand(pop.size, *batch.x.shape))
    return [task.metrics(out[i], batch) for i in range(pop.size)]



# --- timing: the measurements population_pays is drawn from (benchmarks/population.py, `rnnbench bench --population`)

BENCH_FAMILIES = {"lstm": ("lstm", {}), "peephole": ("peephole", {}), "gru": ("gru", {}),
                  "gru_cho": ("gru_cho", {}), "rnn": ("rnn", {})}


def benchmark_population(families: list[str] | None = None, hidden_sizes=(32, 64, 128), sizes=(1, 4, 8, 16, 32),
                         batch: int = 64, seq_len: int = 100, device: str = "cpu", threads: int = 1,
                         warmup: int = 1, repeats: int = 3) -> list[dict]:
    """Per family and hidden size, one training step (forward, backward, clipping, Adam) of one model, and of
    populations of each size, on the adding task (B=batch, T=seq_len). Timed round-robin over the runners after
    warm-up, median of ``repeats``. Rows: family, hidden, members, seq_ms (one model's step, sequential),
    pop_ms (the population's step), speedup = members * seq_ms / pop_ms (per-model throughput against the same
    runs one after another)."""
    from tasks import build_task

    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    device = resolve_device(device)
    task = build_task("adding", seq_len=seq_len)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for family in families or list(BENCH_FAMILIES):
        variant, switches = BENCH_FAMILIES[family]
        for hidden in hidden_sizes:
            spec = PopulationSpec(variant, switches, hidden_size=hidden)
            runners = {0: _sequential_step(task, spec, batch, device)}
            runners.update({p: _population_step(task, spec, p, batch, device) for p in sizes})
            times = {k: [] for k in runners}
            for r in range(warmup + repeats):
                for k, run in runners.items():
                    sync()
                    t0 = time.perf_counter()
                    run()
                    sync()
                    if r >= warmup:
                        times[k].append(time.perf_counter() - t0)
            seq = sorted(times[0])[len(times[0]) // 2] * 1e3
            for p in sizes:
                pop = sorted(times[p])[len(times[p]) // 2] * 1e3
                rows.append(dict(family=family, hidden=hidden, members=p, seq_ms=seq, pop_ms=pop,
                                 speedup=p * seq / pop))
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


def _population_step(task, spec, size, batch, device):
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
    lines = ["| family | hidden | members | one model ms/step | population ms/step | speed-up (models/s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['hidden']} | {r['members']} | {r['seq_ms']:.1f} | {r['pop_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)
