"""Separable blocks initialised from a trained k x k convolution, in closed form.

**Depthwise-separable** (depthwise k x k, then pointwise 1x1; MobileNet, Howard et al. 2017), with a
rank: Network Decoupling (Guo et al. 2018, Sec. 3) writes any kernel as a sum of depthwise-separable
terms, ``W[o, i] = sum_r P_r[o, i] D_r[i]``, by the SVD of each *input* channel's (C_out x k^2) matrix
``W[:, i]``; keeping ``rank`` terms gives one depthwise conv with channel multiplier ``rank`` (C_in*rank
channels, ``D``) and one 1x1 conv (``P``). A kernel that is exactly ``P[o, i] D[i]`` is reproduced
exactly at rank 1.

**Blueprint-separable BSConv-U** (pointwise 1x1, then depthwise k x k; Haase & Amthor 2020, Sec. 3):
each filter is a blueprint times per-channel weights, ``W[o, i] = w[o, i] B[o]``; with a rank, ``W[o, i]
= sum_r w_r[o, i] B_r[o]``, by the SVD of each *output* filter's (C_in x k^2) matrix ``W[o]``. Built as
a 1x1 conv to C_out*rank channels and a grouped k x k conv (C_out groups of ``rank`` channels; rank 1 is
the paper's depthwise conv).

Rank (the width knob) runs from 1 to k^2; MACs scale as about ``rank / k^2`` of the layer's.
"""
from __future__ import annotations

import torch
from torch import nn

from .cost import Cost, bias, positions, spatial


def _factors(mats: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched truncated SVD of (B, m, n) matrices: (B, m, rank) and (B, rank, n), the singular values split
    evenly between the two (zero-padded when ``rank`` exceeds min(m, n))."""
    u, s, vh = torch.linalg.svd(mats.double(), full_matrices=False)
    keep = min(rank, s.shape[-1])
    root = s[:, :keep].sqrt()
    left = torch.zeros(mats.shape[0], mats.shape[1], rank, dtype=torch.float64)
    right = torch.zeros(mats.shape[0], rank, mats.shape[2], dtype=torch.float64)
    left[:, :, :keep] = u[:, :, :keep] * root[:, None, :]
    right[:, :keep] = vh[:, :keep] * root[:, :, None]
    return left, right


def _conv(conv: nn.Conv2d, cin: int, cout: int, kernel, groups: int, spatial_part: bool, has_bias: bool) -> nn.Conv2d:
    """A conv with the layer's stride / padding / dilation (``spatial_part``) or a plain 1x1 one."""
    if spatial_part:
        return nn.Conv2d(cin, cout, kernel, conv.stride, conv.padding, conv.dilation, groups, has_bias,
                         conv.padding_mode)
    return nn.Conv2d(cin, cout, 1, bias=has_bias)


def depthwise_separable(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Depthwise (C_in -> C_in*rank, groups C_in) then pointwise (-> C_out, the layer's bias)."""
    w = conv.weight.detach()
    o, c, kh, kw = w.shape
    left, right = _factors(w.permute(1, 0, 2, 3).reshape(c, o, kh * kw), rank)  # per input channel
    dw = _conv(conv, c, c * rank, (kh, kw), c, True, False)
    pw = _conv(conv, c * rank, o, 1, 1, False, conv.bias is not None)
    with torch.no_grad():
        dw.weight.copy_(right.reshape(c * rank, 1, kh, kw))                       # channel i*rank + r: D_r[i]
        pw.weight.copy_(left.permute(1, 0, 2).reshape(o, c * rank, 1, 1))        # P_r[o, i]
        if conv.bias is not None:
            pw.bias.copy_(conv.bias.detach())
    return nn.Sequential(dw, pw).to(w.device, w.dtype)


def bsconv_u(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Pointwise (C_in -> C_out*rank) then grouped k x k (C_out groups of rank channels, the layer's bias)."""
    w = conv.weight.detach()
    o, c, kh, kw = w.shape
    left, right = _factors(w.reshape(o, c, kh * kw), rank)  # per output filter: (o, c, r), (o, r, k^2)
    pw = _conv(conv, c, o * rank, 1, 1, False, False)
    bp = _conv(conv, o * rank, o, (kh, kw), o, True, conv.bias is not None)
    with torch.no_grad():
        pw.weight.copy_(left.permute(0, 2, 1).reshape(o * rank, c, 1, 1))  # channel o*rank + r: w_r[o, :]
        bp.weight.copy_(right.reshape(o, rank, kh, kw))                     # blueprints B_r[o]
        if conv.bias is not None:
            bp.bias.copy_(conv.bias.detach())
    return nn.Sequential(pw, bp).to(w.device, w.dtype)


def separable_cost(conv: nn.Conv2d, rank: int, in_hw, out_hw) -> Cost:
    c, o, k2 = conv.in_channels, conv.out_channels, spatial(conv)
    params = c * rank * k2 + c * rank * o
    return Cost(params + bias(conv), params * positions(out_hw))


def bsconv_cost(conv: nn.Conv2d, rank: int, in_hw, out_hw) -> Cost:
    c, o, k2 = conv.in_channels, conv.out_channels, spatial(conv)
    return Cost(c * o * rank + o * rank * k2 + bias(conv),
                c * o * rank * positions(in_hw) + o * rank * k2 * positions(out_hw))


def separable_heads(block: nn.Sequential) -> list:
    return [(block[-1], None)]


__all__ = ["depthwise_separable", "bsconv_u", "separable_cost", "bsconv_cost"]
