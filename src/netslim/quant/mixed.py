"""Mixed precision: per-layer weight bit widths chosen under a model-size budget from measured sensitivity.

HAQ (Wang et al. 2019) searches per-layer bit widths with a hardware-aware reinforcement-learning
agent; its premise is that layers differ widely in how much precision they need. Here the premise is
used directly: each layer's sensitivity at each candidate width is measured (only that layer
quantized, the output's KL divergence from the float model on held-out images), then a greedy pass
lowers, one step at a time, the width whose loss of fidelity per byte saved is smallest until the
weights fit the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetslimError
from .modules import WeightQuant, weight_quantizers
from .qspec import QuantSpec, qparams


@dataclass
class BitPlan:
    bits: dict[str, int]
    weight_bytes: int
    budget_bytes: int
    sensitivity: dict[str, dict[int, float]]

    def table(self) -> str:
        widths = sorted({b for s in self.sensitivity.values() for b in s})
        lines = ["| layer | " + " | ".join(f"KL @ {b} bits" for b in widths) + " | chosen |",
                 "|---|" + "---|" * (len(widths) + 1)]
        for name, s in self.sensitivity.items():
            lines.append(f"| {name} | " + " | ".join(f"{s[b]:.2e}" for b in widths) + f" | {self.bits[name]} |")
        return "\n".join(lines)


def _layers_and_quantizers(model: nn.Module) -> dict[str, tuple[nn.Module, WeightQuant]]:
    return {name: (model.get_submodule(name), q) for name, q in weight_quantizers(model).items()}


def _requantize(layer: nn.Module, quantizer: WeightQuant, bits: int) -> None:
    """Point ``quantizer`` at a ``bits``-wide min-max grid of the layer's float weight."""
    spec = QuantSpec(bits, symmetric=True, per_channel=quantizer.spec.per_channel, axis=quantizer.spec.axis)
    w = layer.parametrizations.weight.original.detach()
    if spec.per_channel:
        flat = w.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        lo, hi = w.min(), w.max()
    scale, zero_point = qparams(lo, hi, spec)
    quantizer.spec, quantizer.scale.data, quantizer.zero_point = spec, scale, zero_point


@torch.no_grad()
def _kl(model: nn.Module, images: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    total = 0.0
    for x, ref in zip(images, reference):
        total += F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(ref, 1), log_target=True,
                          reduction="batchmean").item()
    return total / len(images)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, images: list[torch.Tensor], widths: tuple[int, ...] = (2, 3, 4, 6, 8)
                      ) -> dict[str, dict[int, float]]:
    """KL divergence of the model's output from the float model's, with only one layer's weights quantized
    to each width in turn (activations as configured; the other weights float)."""
    from .ptq import set_mode

    quantizers = _layers_and_quantizers(model)
    set_mode(model, "quantize")
    saved = {n: (q.spec, q.scale.detach().clone(), q.zero_point.clone()) for n, (_, q) in quantizers.items()}
    for _, q in quantizers.values():
        q.mode = "float"
    reference = [model(x) for x in images]
    table = {}
    try:
        for name, (layer, q) in quantizers.items():
            q.mode = "quantize"
            table[name] = {}
            for bits in widths:
                _requantize(layer, q, bits)
                table[name][bits] = _kl(model, images, reference)
            q.mode = "float"
    finally:
        for name, (_, q) in quantizers.items():
            q.spec, q.scale.data, q.zero_point = saved[name]
            q.mode = "quantize"
    return table


def plan_bits(model: nn.Module, sensitivity: dict[str, dict[int, float]], budget_bytes: int) -> BitPlan:
    """Greedy: from the widest candidate everywhere, repeatedly take the step down (to the next narrower
    width of one layer) with the least added KL per byte saved, until the weights fit ``budget_bytes``."""
    sizes = {n: layer.parametrizations.weight.original.numel() for n, (layer, _) in _layers_and_quantizers(model).items()}
    widths = {n: sorted(s) for n, s in sensitivity.items()}
    bits = {n: w[-1] for n, w in widths.items()}

    def total() -> int:
        return sum((sizes[n] * b + 7) // 8 for n, b in bits.items())

    floor = sum((sizes[n] * w[0] + 7) // 8 for n, w in widths.items())
    if budget_bytes < floor:
        raise NetslimError(f"a weight budget of {budget_bytes:,} bytes is below the smallest plan "
                           f"({floor:,} bytes with every layer at its narrowest width)")
    while total() > budget_bytes:
        best, best_cost = None, float("inf")
        for n, b in bits.items():
            i = widths[n].index(b)
            if i == 0:
                continue
            lower = widths[n][i - 1]
            saved = sizes[n] * (b - lower) / 8
            cost = max(sensitivity[n][lower] - sensitivity[n][b], 0.0) / saved
            if cost < best_cost:
                best, best_cost = (n, lower), cost
        bits[best[0]] = best[1]
    return BitPlan(bits, total(), budget_bytes, sensitivity)
