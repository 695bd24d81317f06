"""The two small modules compact blocks need beyond PyTorch's own: a concatenation of parallel
branches (the fire module's expand, Iandola et al. 2016) and a concatenation of a tensor with its
negation (CReLU's transferred filters, Shang et al. 2016). Both end with a fixed channel
permutation (a buffer), so a block's output channels keep the order of the layer it replaced.
Both are allowlisted in :mod:`netslim.saving` (rebuilt from their channel count, no code)."""
from __future__ import annotations

import torch
from torch import nn


class Concat(nn.Sequential):
    """``cat([branch(x) for branch in self], dim=1)[:, index]``: parallel branches on one input.

    ``channels``: the total number of output channels (the size of the ``index`` permutation)."""

    def __init__(self, channels: int, *branches: nn.Module) -> None:
        super().__init__(*branches)
        self.channels = int(channels)
        self.register_buffer("index", torch.arange(self.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat([branch(x) for branch in self], dim=1).index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class NegConcat(nn.Module):
    """``cat([x, -x], dim=1)[:, index]``: each input channel and its negation (CReLU's pairs);
    ``channels`` output channels (twice the input's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = int(channels)
        self.register_buffer("index", torch.arange(self.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat([x, -x], dim=1).index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


__all__ = ["Concat", "NegConcat"]
