"""Fire-module replacement of a trained k x k convolution (SqueezeNet, Iandola et al. 2016, Sec. 3.2):
a 1x1 *squeeze* to ``s`` channels, then an *expand* of parallel 1x1 and k x k convolutions whose outputs
are concatenated (the layer's C_out channels, ``expand1x1`` of them from the 1x1 branch).

Initialisation (closed form): the kernel's input-channel unfolding ``W_(C_in)`` (C_in x C_out k^2) is
split by its truncated SVD, ``W_(C_in) ~ U_s (S_s V_s^T)``: the squeeze is ``U_s^T`` and the expand the
rest, a Tucker-1 factorization. The output channels whose filters hold the largest share of their
energy in the centre tap go to the 1x1 branch (their centre taps kept). The squeeze stays linear (no
ReLU), so the block is a factorization of the layer; the data-aware refit then solves both expand
branches by least squares on real inputs. The squeeze runs at the input's resolution, the expand at the
layer's stride.
"""
from __future__ import annotations

import torch
from torch import nn

from .cost import Cost, bias, positions, spatial
from .modules import Concat


def centred(conv: nn.Conv2d) -> bool:
    """Whether the kernel's centre tap lines up with a 1x1 conv of the same stride (odd kernel, 'same'
    padding): only then may part of the expand be 1x1."""
    kh, kw = conv.kernel_size
    pad = conv.padding
    return (not isinstance(pad, str) and kh % 2 == 1 and kw % 2 == 1 and conv.padding_mode == "zeros"
            and pad[0] == conv.dilation[0] * (kh - 1) // 2 and pad[1] == conv.dilation[1] * (kw - 1) // 2)


def split(conv: nn.Conv2d, fraction: float) -> int:
    """How many output channels the 1x1 expand gets (0 when the kernel is not centred)."""
    return min(conv.out_channels - 1, round(fraction * conv.out_channels)) if centred(conv) else 0


def fire(conv: nn.Conv2d, squeeze: int, expand1x1: float = 0.5) -> nn.Sequential:
    """Squeeze (C_in -> ``squeeze``) then Concat(1x1 -> e1, k x k -> C_out - e1), channels in the layer's order."""
    w = conv.weight.detach()
    o, c, kh, kw = w.shape
    u, s, vh = torch.linalg.svd(w.double().permute(1, 0, 2, 3).reshape(c, o * kh * kw), full_matrices=False)
    keep = min(squeeze, s.shape[0])
    sq = torch.zeros(squeeze, c, dtype=torch.float64)
    ex = torch.zeros(squeeze, o * kh * kw, dtype=torch.float64)
    sq[:keep] = u[:, :keep].T
    ex[:keep] = s[:keep, None] * vh[:keep]
    ex = ex.reshape(squeeze, o, kh, kw).permute(1, 0, 2, 3)  # (o, squeeze, kh, kw)
    e1 = split(conv, expand1x1)
    centre = (w[:, :, kh // 2, kw // 2].double().pow(2).sum(1) / w.double().pow(2).flatten(1).sum(1).clamp_min(1e-30))
    order = torch.argsort(centre, descending=True)
    ones, threes = order[:e1].sort().values, order[e1:].sort().values
    has_bias = conv.bias is not None
    squeeze_conv = nn.Conv2d(c, squeeze, 1, bias=False)
    branches = []
    if e1:
        branches.append(nn.Conv2d(squeeze, e1, 1, conv.stride, bias=has_bias))
    branches.append(nn.Conv2d(squeeze, o - e1, (kh, kw), conv.stride, conv.padding, conv.dilation, 1, has_bias,
                              conv.padding_mode))
    expand = Concat(o, *branches)
    with torch.no_grad():
        squeeze_conv.weight.copy_(sq[:, :, None, None])
        if e1:
            branches[0].weight.copy_(ex[ones][:, :, kh // 2: kh // 2 + 1, kw // 2: kw // 2 + 1])
        branches[-1].weight.copy_(ex[threes])
        if has_bias:
            if e1:
                branches[0].bias.copy_(conv.bias.detach()[ones])
            branches[-1].bias.copy_(conv.bias.detach()[threes])
        placed = torch.cat([ones, threes])
        index = torch.empty(o, dtype=torch.long)
        index[placed] = torch.arange(o)
        expand.index.copy_(index)
    return nn.Sequential(squeeze_conv, expand).to(w.device, w.dtype)


def fire_cost(conv: nn.Conv2d, squeeze: int, in_hw, out_hw, expand1x1: float = 0.5) -> Cost:
    c, o, k2 = conv.in_channels, conv.out_channels, spatial(conv)
    e1 = split(conv, expand1x1)
    expand = squeeze * e1 + squeeze * (o - e1) * k2
    return Cost(c * squeeze + expand + bias(conv), c * squeeze * positions(in_hw) + expand * positions(out_hw))


def fire_heads(block: nn.Sequential) -> list:
    """Each expand branch with the selection of the layer's channels it produces."""
    expand = block[-1]
    heads, start = [], 0
    where = torch.argsort(expand.index)  # concatenated position -> ... inverse: position p holds channel where[p]
    for branch in expand:
        n = branch.out_channels
        mix = torch.zeros(n, expand.channels, dtype=torch.float64)
        mix[torch.arange(n), where[start:start + n].cpu()] = 1.0
        heads.append((branch, mix))
        start += n
    return heads


__all__ = ["fire", "fire_cost", "centred"]
