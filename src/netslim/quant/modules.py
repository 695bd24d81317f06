"""The modules a quantized model is made of: a weight fake-quantizer (a parametrization) and an
activation quantizer that first observes ranges, then fake-quantizes.

Both follow the simulated-quantization scheme of Jacob et al. 2018: training and evaluation run in
float on values that lie exactly on the integer grid, so the model computes what an integer kernel
with the same scales computes. In ``export`` mode they emit ``fake_quantize_per_*_affine`` ops, which
the TorchScript ONNX exporter writes as QuantizeLinear/DequantizeLinear pairs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import NetslimError
from .calibrate import RangeCollector
from .qspec import QuantSpec, fake_quantize, qparams

MODES = ("float", "observe", "quantize", "export")


class WeightQuant(nn.Module):
    """Parametrization ``weight -> fake_quantize(weight)`` with fixed or learned (LSQ) scales."""

    def __init__(self, spec: QuantSpec, scale: Tensor, zero_point: Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(scale.detach().clone().float(), requires_grad=False)
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int32))
        self.mode = "quantize"

    def forward(self, w: Tensor) -> Tensor:
        if self.mode == "float":
            return w
        if self.mode == "export":
            return self._export(w)
        scale = _lsq_grad_scale(self.scale, w.numel() / max(self.scale.numel(), 1), self.spec.qmax)
        return fake_quantize(w, scale, self.zero_point, self.spec)

    def _export(self, w: Tensor) -> Tensor:
        """An 8-bit Q/DQ pair; the exporter first stores the weight already on this (narrower) grid,
        which the 8-bit pair with the same scale reproduces exactly for any width up to 8."""
        if self.spec.bits > 8:
            raise NetslimError(f"ONNX export supports weights of at most 8 bits, not {self.spec.bits}")
        if self.spec.per_channel:
            return torch.fake_quantize_per_channel_affine(w, self.scale.detach(), self.zero_point, self.spec.axis,
                                                          -128, 127)
        return torch.fake_quantize_per_tensor_affine(w, float(self.scale), int(self.zero_point), -128, 127)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, per_channel={self.spec.per_channel}"


class ActQuant(nn.Module):
    """Quantizer of one activation tensor.

    Modes: ``float`` (identity), ``observe`` (identity; feeds a :class:`RangeCollector`), ``quantize``
    (fake quantization with the calibrated scale and zero point), ``export`` (the same as ONNX Q/DQ).
    ``learn``: ``"lsq"`` makes the scale a trainable parameter (Esser et al. 2020, LSQ), ``"pact"`` trains
    the clipping level of a non-negative activation (Choi et al. 2018, PACT); ``None`` keeps it fixed.
    """

    def __init__(self, spec: QuantSpec | None = None, calibrator: str = "minmax", **calibrator_options) -> None:
        super().__init__()
        self.spec = spec or QuantSpec(8, symmetric=False)
        self.calibrator = calibrator
        self.calibrator_options = calibrator_options
        self.collector: RangeCollector | None = None
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.learn: str | None = None
        self.mode = "float"

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise NetslimError(f"unknown quantizer mode {mode!r}; valid modes: {', '.join(MODES)}")
        if mode == "observe" and self.collector is None:
            self.collector = RangeCollector(self.calibrator, self.spec, **self.calibrator_options)
        if mode in ("quantize", "export") and not bool(self.calibrated):
            raise NetslimError("an activation quantizer was never calibrated: run calibration data through "
                               "the model in 'observe' mode first")
        self.mode = mode

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        scale, zero_point = qparams(lo, hi, self.spec)
        self.scale.data = scale.reshape(())
        self.zero_point = zero_point.reshape(())
        self.calibrated.fill_(True)

    def finish_calibration(self) -> None:
        """Turn the observed statistics into a scale and zero point and drop the statistics."""
        if self.collector is None or self.collector.batches == 0:
            raise NetslimError("no calibration batches reached an activation quantizer: is the calibration "
                               "data empty, or is this branch of the model never executed?")
        lo, hi = self.collector.range()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise NetslimError("an activation range is not finite (NaN or inf in the model's activations): "
                               "is the model trained and its weights finite?")
        self.set_range(lo, hi)
        self.collector = None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "float" or not x.is_floating_point():
            return x
        if self.mode == "observe":
            self.collector.update(x.detach())
            return x
        if self.mode == "export":
            return self._export(x)
        scale = _lsq_grad_scale(self.scale, x[0].numel(), self.spec.qmax) if self.learn == "lsq" else self.scale
        if self.learn == "pact":
            return _pact(x, self.scale, self.zero_point, self.spec)
        return fake_quantize(x, scale, self.zero_point, self.spec)

    def _export(self, x: Tensor) -> Tensor:
        s, z = float(self.scale), int(self.zero_point)
        lo, hi = (self.spec.qmin - z) * s, (self.spec.qmax - z) * s
        if self.spec.bits < 8:  # the narrower grid is a clamp in front of an 8-bit Q/DQ with the same step
            x = torch.clamp(x, lo, hi)
        elif self.spec.bits > 8:
            raise NetslimError(f"ONNX export supports activations of at most 8 bits, not {self.spec.bits}")
        if self.spec.symmetric:
            return torch.fake_quantize_per_tensor_affine(x, s, 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.spec.symmetric else "asymmetric"
        return f"bits={self.spec.bits}, {kind}, calibrator={self.calibrator}, mode={self.mode}"


def weight_quantizers(model: nn.Module) -> dict[str, WeightQuant]:
    """The :class:`WeightQuant` of every layer whose weight is fake-quantized, by layer name."""
    return {name[: -len(".parametrizations.weight.0")]: m for name, m in model.named_modules()
            if isinstance(m, WeightQuant)}


def _lsq_grad_scale(scale: Tensor, numel: float, qmax: int) -> Tensor:
    """Scale the gradient reaching a learned step by 1/sqrt(N * Qp) (LSQ §2.2) without changing its value."""
    if not scale.requires_grad:
        return scale
    g = 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))
    return (scale - scale * g).detach() + scale * g


def _pact(x: Tensor, step: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """PACT: clip at a learned level alpha = step * (levels - 1), then quantize; d/d alpha flows from clipped
    values (Choi et al. 2018, eq. 3) and, through the step, from the rounding (as in LSQ)."""
    alpha = step * (spec.levels - 1)
    clipped = torch.minimum(torch.relu(x), alpha)
    return fake_quantize(clipped, step, torch.zeros_like(zero_point), spec)
