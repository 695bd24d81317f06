"""Parameter and MAC counts of a k x k convolution and of the blocks that replace it, by formula
(biases included where the layer has one; a test checks each against the built block)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


def spatial(conv: nn.Conv2d) -> int:
    return conv.kernel_size[0] * conv.kernel_size[1]


def positions(hw: tuple[int, int]) -> int:
    return int(hw[0]) * int(hw[1])


def dense_cost(conv: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Cost:
    """The layer itself: ``O * C/g * k^2`` weights (+ O biases), as many MACs per output position."""
    weights = conv.out_channels * (conv.in_channels // conv.groups) * spatial(conv)
    return Cost(weights + (conv.out_channels if conv.bias is not None else 0), weights * positions(out_hw))


def bias(conv: nn.Conv2d) -> int:
    return conv.out_channels if conv.bias is not None else 0


__all__ = ["Cost", "dense_cost"]
