"""Uniform affine quantization: the grid a tensor is rounded to, and fake quantization on it.

A value x on a ``bits``-bit grid with step ``scale`` and integer ``zero_point`` is stored as
``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and read back as ``(q - zero_point) * scale``
(Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference"). Symmetric grids have ``zero_point = 0`` and a signed range; asymmetric ones an unsigned
range and a zero point chosen so that 0.0 is exactly representable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NetslimError


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits`` 2..16; ``symmetric``: signed grid with zero point 0 (weights), else unsigned with a zero
    point (activations); ``per_channel``: one scale per slice along ``axis`` (weights: output channels);
    ``narrow``: the symmetric range drops its most negative level (-127..127 at 8 bits), so that
    ``-x`` is representable whenever ``x`` is.
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0
    narrow: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise NetslimError(f"bit width must be an integer in 2..16, got {self.bits!r}")

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


def qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point covering ``[lo, hi]`` (tensors: one entry per channel, or 0-d).

    The range is first widened to contain 0 so that zero (padding, ReLU outputs, pruned weights)
    is exact. Symmetric: ``scale = max(|lo|, |hi|) / qmax``; asymmetric: ``scale = (hi - lo) / (levels - 1)``.
    """
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    tiny = torch.finfo(torch.float32).tiny * 2 ** 20
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(tiny)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (spec.levels - 1)).clamp_min(tiny)
        zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` whose gradient is the identity (the straight-through estimator, Bengio et al. 2013)."""
    return x + (torch.round(x) - x).detach()


def _broadcast(t: Tensor, x: Tensor, spec: QuantSpec) -> Tensor:
    if t.dim() == 0 or not spec.per_channel:
        return t.reshape(()) if t.numel() == 1 else t
    shape = [1] * x.dim()
    shape[spec.axis] = -1
    return t.reshape(shape)


def quantize_to_int(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """The integer codes ``q`` of ``x`` (as an integer tensor of the narrowest fitting type)."""
    s, z = _broadcast(scale, x, spec), _broadcast(zero_point, x, spec)
    q = torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax)
    dtype = torch.int8 if spec.bits <= 8 and spec.symmetric else torch.uint8 if spec.bits <= 8 else torch.int32
    return q.to(dtype)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    s, z = _broadcast(scale, q, spec), _broadcast(zero_point, q, spec)
    return (q.float() - z) * s


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize and dequantize in float. Gradients: straight-through for ``x`` inside the range, zero
    outside it (clipped values); and with respect to ``scale`` as in LSQ (Esser et al. 2020), so a
    learnable scale trains through this same function."""
    s, z = _broadcast(scale, x, spec), _broadcast(zero_point, x, spec).to(x.dtype)
    q = torch.clamp(round_ste(x / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


def quantization_mse(x: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Tensor:
    """Mean squared error of fake-quantizing ``x`` on the grid covering ``[lo, hi]``."""
    scale, zp = qparams(lo, hi, spec)
    return (fake_quantize(x, scale, zp, spec) - x).pow(2).mean()
