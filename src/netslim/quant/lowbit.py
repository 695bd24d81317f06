"""Extremely low-bit weights: binary, ternary and powers of two, trained with :func:`netslim.train.fit`.

* :class:`BinaryWeight` - BinaryConnect (Courbariaux et al. 2015, "BinaryConnect: Training Deep Neural
  Networks with binary weights during propagations") with XNOR-Net's per-channel scale (Rastegari et al.
  2016, "XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks").
* :class:`TernaryWeight` - Ternary Weight Networks (Li & Liu 2016, "Ternary Weight Networks").
* :class:`INQ` / :func:`inq_train` - Incremental Network Quantization (Zhou et al. ICLR 2017,
  "Incremental Network Quantization: Towards Lossless CNNs with Low-Precision Weights").

Binary and ternary weights are parametrizations: the float weight is kept and trained, the forward
pass sees its low-bit image, and the gradient goes straight through (Bengio et al. 2013).
:func:`bake_lowbit_` leaves the low-bit values as plain weights.
"""
from __future__ import annotations

from pathlib import Path

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from ..errors import NetslimError, unknown_choice
from ..layers import select_layers
from ..surgery import bake_parametrizations_
from ..train import TrainConfig, TrainHook, fit

LOWBIT_METHODS = ("binary", "ternary", "inq")
PARAMETRIZED_METHODS = ("binary", "ternary")
LOWBIT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
TWN_DELTA = 0.7  # Li & Liu 2016, eq. 10: delta ~= 0.7 * E|w|


def _channel_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (output channels), kept for broadcasting."""
    return x.mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x.mean().reshape(())


def _channel_sum(x: Tensor) -> Tensor:
    return x.sum(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x.sum().reshape(())


class BinaryWeight(nn.Module):
    """``w_b = alpha * sign(w)`` with ``alpha = mean |w|`` per output channel (XNOR-Net's scaling, Rastegari
    et al. 2016, eq. 4) and ``sign(0) = +1`` (BinaryConnect, Courbariaux et al. 2015, eq. 1).

    Backward: the gradient reaching ``w_b`` is passed to ``w`` unchanged where ``|w| <= 1`` and cancelled
    where ``|w| > 1`` (the hardtanh straight-through estimator; BinaryConnect also clips ``w`` to [-1, 1])."""

    def forward(self, weight: Tensor) -> Tensor:
        w = weight.detach()
        alpha = _channel_mean(w.abs())
        binary = torch.where(w >= 0, alpha, -alpha)
        keep = (w.abs() <= 1).to(weight.dtype)
        return binary + (weight - w) * keep


class TernaryWeight(nn.Module):
    """Ternary weight networks (Li & Liu 2016): per output channel, ``delta = 0.7 * mean |w|``; weights with
    ``|w| > delta`` become ``sign(w) * alpha`` with ``alpha`` the mean of those ``|w|``, the rest 0.
    The gradient goes straight through to the float weight."""

    def forward(self, weight: Tensor) -> Tensor:
        w = weight.detach()
        magnitude = w.abs()
        delta = TWN_DELTA * _channel_mean(magnitude)
        big = (magnitude > delta).to(w.dtype)
        alpha = _channel_sum(magnitude * big) / _channel_sum(big).clamp_min(1)
        ternary = torch.sign(w) * alpha * big
        return ternary + (weight - w)


def lowbit_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Conv and linear layers not inside an ``exclude`` name (see :func:`netslim.layers.select_layers`)."""
    return select_layers(model, LOWBIT_LAYERS, exclude=exclude)


def first_last_layers(model: nn.Module) -> tuple[str, ...]:
    """The first conv and the last linear (falling back to the first / last layer), kept in float by the papers."""
    layers = list(lowbit_layers(model).items())
    if not layers:
        return ()
    convs = [n for n, m in layers if not isinstance(m, nn.Linear)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    return tuple(dict.fromkeys([convs[0] if convs else layers[0][0], linears[-1] if linears else layers[-1][0]]))


def lowbit_weights_(model: nn.Module, method: str, exclude: tuple[str, ...] = (),
                    first_last_float: bool = True) -> nn.Module:
    """Register :class:`BinaryWeight` or :class:`TernaryWeight` on every Conv/Linear weight except ``exclude``
    (a name covers its submodules) and, when ``first_last_float``, the first conv and the last linear (as in
    XNOR-Net and TWN). Returns ``model``; :func:`lowbit_layer_names` names the parametrized layers."""
    if method == "inq":
        raise NetslimError("INQ is a training procedure, not a parametrization; use netslim.quant.lowbit.inq_train")
    if method not in PARAMETRIZED_METHODS:
        raise unknown_choice("low-bit method", method, LOWBIT_METHODS)
    skip = tuple(exclude) + (first_last_layers(model) if first_last_float else ())
    for module in lowbit_layers(model, skip).values():
        quantizer = BinaryWeight() if method == "binary" else TernaryWeight()
        parametrize.register_parametrization(module, "weight", quantizer)
    return model


def lowbit_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers whose weight carries a :class:`BinaryWeight` or :class:`TernaryWeight`."""
    return [name for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, (BinaryWeight, TernaryWeight)) for p in m.parametrizations.weight)]


def bake_lowbit_(model: nn.Module) -> nn.Module:
    """Replace every binary / ternary parametrized weight by its low-bit value (a plain parameter).
    Other parametrizations of the same weight (e.g. a pruning mask before it) are baked with it."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, (BinaryWeight, TernaryWeight)) for p in module.parametrizations.weight):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def inq_exponents(weight: Tensor, bits: int) -> tuple[int, int]:
    """``(n1, n2)`` of Zhou et al. 2017, eq. 2-3: ``n1 = floor(log2(4/3 * max|w|))``, ``n2 = n1 + 1 - 2^(bits-2)``."""
    top = max(float(weight.detach().abs().max()), torch.finfo(torch.float32).tiny)
    n1 = math.floor(math.log2(4.0 * top / 3.0))
    return n1, n1 + 1 - 2 ** (bits - 2)


def snap_pow2(weight: Tensor, n1: int, n2: int) -> Tensor:
    """Nearest value in ``{0, ±2^n2, ..., ±2^n1}`` (Zhou et al. 2017, eq. 4; ties go to the larger level)."""
    levels = torch.tensor([0.0] + [2.0 ** n for n in range(n2, n1 + 1)], dtype=torch.float32, device=weight.device)
    mids = (levels[1:] + levels[:-1]) / 2
    index = torch.bucketize(weight.detach().abs().float(), mids, right=True)
    return (torch.sign(weight.detach()) * levels[index]).to(weight.dtype)


class INQ(TrainHook):
    """Incremental network quantization (Zhou et al. 2017). Each call of :meth:`advance` starts the next
    accumulated portion (default 50 %, 75 %, 87.5 %, 100 % of each layer's weights): the largest-|w| weights
    not yet quantized are snapped to ``{0, ±2^n2 ... ±2^n1}`` and frozen, the others keep training.

    Frozen weights are written back after every optimizer step, so momentum and weight decay cannot move
    them. Used in a single :func:`fit`, the first portion starts in ``on_train_start`` and, when
    ``epochs_per_portion`` is set, the next one every ``epochs_per_portion`` epochs."""

    def __init__(self, bits: int = 5, portions: Sequence[float] = (0.5, 0.75, 0.875, 1.0),
                 epochs_per_portion: int | None = None, exclude: tuple[str, ...] = ()) -> None:
        if not 2 <= bits <= 16:
            raise NetslimError(f"INQ bits must be in 2..16, got {bits}")
        if not portions or any(not 0 < b <= 1 for b in portions) or list(portions) != sorted(portions) \
                or portions[-1] != 1.0:
            raise NetslimError(f"INQ portions must increase within (0, 1] and end at 1.0, got {list(portions)}")
        if epochs_per_portion is not None and epochs_per_portion < 1:
            raise NetslimError(f"epochs_per_portion must be >= 1, got {epochs_per_portion}")
        self.bits, self.portions, self.exclude = bits, tuple(portions), tuple(exclude)
        self.epochs_per_portion = epochs_per_portion
        self.step = 0  # portions applied so far
        self._epochs = 0
        self.layers: dict[str, nn.Module] = {}
        self.exponents: dict[str, tuple[int, int]] = {}
        self.masks: dict[str, Tensor] = {}
        self.values: dict[str, Tensor] = {}

    @property
    def done(self) -> bool:
        return self.step >= len(self.portions)

    def _setup(self, model: nn.Module) -> None:
        self.layers = lowbit_layers(model, self.exclude)
        for name, module in self.layers.items():
            bake_parametrizations_(module)
            w = module.weight.detach()
            self.exponents[name] = inq_exponents(w, self.bits)
            self.masks[name] = torch.zeros_like(w, dtype=torch.bool)
            self.values[name] = torch.zeros_like(w)

    def advance(self, model: nn.Module) -> float:
        """Quantize and freeze the next portion; returns the fraction of weights now frozen."""
        if self.done:
            raise NetslimError("INQ has already quantized every portion")
        if self.step == 0:
            self._setup(model)
        portion = self.portions[self.step]
        for name, module in self.layers.items():
            self._freeze_layer(name, module.weight, portion)
        self.step += 1
        return self.frozen_fraction()

    @torch.no_grad()
    def _freeze_layer(self, name: str, weight: Tensor, portion: float) -> None:
        mask = self.masks[name] = self.masks[name].to(weight.device)
        target = weight.numel() if portion >= 1.0 else round(portion * weight.numel())
        count = target - int(mask.sum())
        if count > 0:
            score = weight.abs().flatten().masked_fill(mask.flatten(), -1.0)
            chosen = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            chosen[score.topk(count).indices] = True
            mask |= chosen.view_as(mask)
        n1, n2 = self.exponents[name]
        self.values[name] = torch.where(mask, snap_pow2(weight, n1, n2), weight)
        weight.copy_(self.values[name])

    @torch.no_grad()
    def restore(self, model: nn.Module | None = None) -> None:
        """Write the frozen power-of-two values back into the weights."""
        for name, module in self.layers.items():
            w = module.weight
            mask, values = self.masks[name].to(w.device), self.values[name].to(w.device, w.dtype)
            w.copy_(torch.where(mask, values, w))

    def frozen_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.step == 0:
            self.advance(model)

    def after_step(self, model: nn.Module) -> None:
        self.restore(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self._epochs += 1
        if self.epochs_per_portion and self._epochs % self.epochs_per_portion == 0 and not self.done:
            self.advance(model)


def inq_train(model: nn.Module, train_data: Dataset | DataLoader, config: TrainConfig, bits: int = 5,
              portions: Sequence[float] = (0.5, 0.75, 0.875, 1.0), exclude: tuple[str, ...] = (),
              hooks: Sequence[TrainHook] = (), device: str | torch.device | None = None,
              progress: bool = False, checkpoint_dir: str | Path | None = None) -> nn.Module:
    """INQ (Zhou et al. 2017) of every conv / linear weight: for each portion, quantize and freeze it, then
    re-train the rest with one :func:`fit` of ``config.epochs`` epochs (skipped once nothing is left to train).
    At the end every such weight is 0 or ±2^n with n in [n2, n1]. With ``checkpoint_dir``, each portion's
    training writes ``inqN.ckpt`` there per epoch and a restarted call resumes it (freezing is deterministic
    given the weights, so the portions already trained are replayed from their checkpoints without training)."""
    inq = INQ(bits, portions, exclude=exclude)
    while not inq.done:
        inq.advance(model)
        if inq.frozen_fraction() < 1.0 and config.epochs > 0:
            ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"inq{inq.step}.ckpt"
            fit(model, train_data, config, hooks=[inq, *hooks], device=device, progress=progress,
                checkpoint_path=ckpt)
    return model


__all__ = ["LOWBIT_METHODS", "BinaryWeight", "TernaryWeight", "lowbit_weights_", "lowbit_layer_names", "bake_lowbit_",
           "INQ", "inq_train", "inq_exponents", "snap_pow2"]
