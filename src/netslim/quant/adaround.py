"""AdaRound: learned up-or-down rounding of a layer's weights.

Nagel, Amjad, van Baalen, Louizos & Blankevoort 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization" (ICML). Rounding to nearest minimizes each weight's own error, but the task loss sees the
layer's *output*: with correlated inputs (off-diagonal Hessian terms) a different up/down choice gives a
smaller output error. AdaRound relaxes the choice to a continuous ``h(V)`` in [0, 1] (a rectified sigmoid,
§4.1, after Louizos et al. 2018), optimizes the layer-wise reconstruction error (§4.2)

    ||act(W x) - act(W~ x)||_F^2 + lambda * sum_ij (1 - |2 h(V_ij) - 1|^beta),

    W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z),

and anneals ``beta`` from high to low so that ``h(V)`` ends at 0 or 1. The regularizer is off during
a warm-up, letting the reconstruction term move ``V`` freely first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NetslimError
from .qspec import QuantSpec

Layer = nn.Conv2d | nn.Linear
ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (paper §4.1)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``: reaches exactly 0 and 1."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in [0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def _along_axis(t: Tensor, weight: Tensor, spec: QuantSpec, what: str) -> Tensor:
    t = torch.as_tensor(t).detach().to(dtype=torch.float32, device=weight.device)
    if t.numel() == 1:
        return t.reshape(())
    if t.dim() != 1 or t.numel() != weight.shape[spec.axis]:
        raise NetslimError(f"{what} must be 0-d or 1-d with one entry per channel along axis {spec.axis} "
                           f"({weight.shape[spec.axis]}), got shape {tuple(t.shape)}")
    shape = [1] * weight.dim()
    shape[spec.axis] = -1
    return t.reshape(shape)


@dataclass
class AdaRounder:
    """One weight tensor's rounding state: ``floor(W/s)`` and the continuous variable ``V``."""

    w_floor: Tensor
    v: Tensor
    scale: Tensor  # broadcastable to the weight
    zero_point: Tensor  # float, broadcastable to the weight
    spec: QuantSpec

    @classmethod
    def round_to_nearest_start(cls, weight: Tensor, scale: Tensor, zero_point: Tensor,
                               spec: QuantSpec) -> AdaRounder:
        """``h(V)`` starts at the fractional part of ``W/s``, so the soft weight starts at ``W`` (clamped)."""
        w = weight.detach().float()  # scale may carry autograd history (e.g. from weight.abs().max())
        s = _along_axis(scale, w, spec, "scale")
        z = _along_axis(zero_point, w, spec, "zero_point")
        w_floor = torch.floor(w / s)
        rest = (w / s - w_floor).clamp(0.0, 1.0 - 1e-6)
        return cls(w_floor, inverse_rectified_sigmoid(rest), s, z, spec)

    def h(self) -> Tensor:
        return rectified_sigmoid(self.v)

    def _on_grid(self, up: Tensor) -> Tensor:
        q = torch.clamp(self.w_floor + up + self.zero_point, self.spec.qmin, self.spec.qmax)
        return (q - self.zero_point) * self.scale

    def soft_weight(self) -> Tensor:
        """``W~`` with the continuous ``h(V)``: differentiable in ``V``."""
        return self._on_grid(self.h())

    def hard_weight(self) -> Tensor:
        """``W~`` with ``h(V) >= 0.5`` rounded up, else down: exactly on the grid."""
        return self._on_grid((self.h() >= 0.5).float()).detach()

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: zero only when every ``h`` is 0 or 1 (paper eq. 24)."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


def layer_forward(layer: Layer) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x, W)``: the layer's function with weight ``W`` (its own bias, stride, padding, ...)."""
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, nn.Linear):
        return lambda x, w: F.linear(x, w, bias)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise NetslimError(f"AdaRound supports zero padding only, got padding_mode={layer.padding_mode!r}")
        kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return lambda x, w: F.conv2d(x, w, bias, **kw)
    raise NetslimError(f"AdaRound works on nn.Conv2d / nn.Linear, got {type(layer).__name__}")


def annealed_beta(it: int, iters: int, beta_range: tuple[float, float], warmup: float) -> float | None:
    """``None`` (no regularizer) during the first ``warmup`` fraction of the iterations, then ``beta``
    decaying linearly from ``beta_range[0]`` to ``beta_range[1]``."""
    start = warmup * iters
    if it < start:
        return None
    t = (it - start) / max(iters - start, 1.0)
    return beta_range[1] + (beta_range[0] - beta_range[1]) * max(0.0, 1.0 - t)


def reconstruction_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over output channels (dim 1), averaged over samples and positions."""
    return (out - target).pow(2).sum(1).mean() if out.dim() > 1 else (out - target).pow(2).mean()


def _check(inputs: Tensor, targets: Tensor, iters: int, batch_size: int, warmup: float) -> None:
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise NetslimError(f"inputs and targets need the same, non-zero number of samples; got "
                           f"{inputs.shape[0]} and {targets.shape[0]}")
    if iters < 0 or batch_size < 1 or not 0.0 <= warmup <= 1.0:
        raise NetslimError(f"need iters >= 0, batch_size >= 1 and 0 <= warmup <= 1; got {iters}, "
                           f"{batch_size}, {warmup}")


def learn_rounding(layer: Layer, inputs: Tensor, targets: Tensor, scale: Tensor, zero_point: Tensor,
                   spec: QuantSpec, iters: int = 1000, batch_size: int = 32, lr: float = 1e-2,
                   reg_weight: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                   activation: Callable[[Tensor], Tensor] | None = None, seed: int = 0) -> AdaRounder:
    """Optimize the rounding of ``layer.weight`` (see :func:`adaround_weight`); returns the final state,
    whose ``h()`` shows how binary the relaxation ended."""
    forward = layer_forward(layer)
    _check(inputs, targets, iters, batch_size, warmup)
    act = activation if activation is not None else (lambda t: t)
    rounder = AdaRounder.round_to_nearest_start(layer.weight, scale, zero_point, spec)
    rounder.v.requires_grad_(True)
    opt = torch.optim.Adam([rounder.v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    device = rounder.v.device
    with torch.enable_grad():
        for it in range(iters):
            idx = torch.randint(inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=gen)
            x, y = inputs[idx].to(device), targets[idx].to(device)
            loss = reconstruction_loss(act(forward(x, rounder.soft_weight())), y)
            beta = annealed_beta(it, iters, beta_range, warmup)
            if beta is not None:
                loss = loss + reg_weight * rounder.regularizer(beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    rounder.v.requires_grad_(False)
    return rounder


def adaround_weight(layer: Layer, inputs: Tensor, targets: Tensor, scale: Tensor, zero_point: Tensor,
                    spec: QuantSpec, iters: int = 1000, batch_size: int = 32, lr: float = 1e-2,
                    reg_weight: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                    activation: Callable[[Tensor], Tensor] | None = None, seed: int = 0) -> Tensor:
    """AdaRound (Nagel et al. 2020) for one layer: the dequantized weight with learned rounding.

    ``W~ = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)``; Adam (``lr``) on ``V`` minimizes the
    reconstruction error of ``act(layer(x; W~))`` against ``targets`` (the float layer's outputs, after
    ``activation`` if given, for the same samples; ``inputs`` may come from a partly quantized model) on
    random mini-batches, plus ``reg_weight * sum(1 - |2h(V) - 1|^beta)`` once ``warmup`` of the ``iters``
    have passed, with ``beta`` annealed linearly from ``beta_range[0]`` to ``beta_range[1]``.
    ``scale``/``zero_point`` are 0-d, or 1-d along ``spec.axis`` for per-channel grids. ``V`` starts with
    ``h(V)`` at the fractional part of ``W/s`` (the round-to-nearest start). Returns the hard-rounded weight
    (``h(V) >= 0.5`` rounds up), exactly on the grid. The layer is not modified.
    """
    rounder = learn_rounding(layer, inputs, targets, scale, zero_point, spec, iters, batch_size, lr,
                             reg_weight, beta_range, warmup, activation, seed)
    return rounder.hard_weight().to(layer.weight.dtype)
