"""Keep a factorization only where it is faster on the target: the decomposed layer's factors, each timed alone
on its input shape by the latency lookup table (:mod:`netslim.search.cost`), against the original layer.

Fewer MACs do not make a layer faster by themselves: two thin convolutions pay two kernel launches, two
passes over memory and, in onnxruntime, layout reorders when a rank is not a multiple of the kernel's channel
block. AIMET's and TensorLy's factorizations are applied whenever they cut MACs (AIMET #809: "SVD reduced the
MACs, not the latency"); here a layer whose factors together are not faster than the layer itself on the
target is left dense, and the report says so with both times.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerTiming:
    """The original layer's and its factors' summed lookup-table latency (ms) on the target."""

    dense_ms: float
    factored_ms: float

    @property
    def faster(self) -> bool:
        return self.factored_ms < self.dense_ms


def factor_timings(original: nn.Module, decomposed: nn.Module, names: list[str], example_input: torch.Tensor,
                   table) -> dict[str, LayerTiming]:
    """For each decomposed layer in ``names``: its latency in ``original`` and the sum of its factors' latencies
    in ``decomposed`` (the factors are the conv/linear layers under that name), from ``table``."""
    before = {name: (module, shape, q) for name, module, shape, q in table.units(original, example_input[:1])}
    after = table.units(decomposed, example_input[:1])
    timings = {}
    for name in names:
        if name not in before:
            continue
        module, shape, q = before[name]
        parts = [table.unit_ms(m, s, qq) for n, m, s, qq in after if n.startswith(name + ".")]
        if parts:
            timings[name] = LayerTiming(table.unit_ms(module, shape, q), sum(parts))
    table.save()
    return timings


__all__ = ["LayerTiming", "factor_timings"]
