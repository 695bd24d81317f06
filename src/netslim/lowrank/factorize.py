"""Decompositions of one layer into a Sequential of smaller standard layers (ONNX-exportable;
never a layer that rebuilds the full kernel at run time).

* :func:`svd_linear` / :func:`svd_conv1x1` - truncated SVD, k middle units (Denton 2014; Xue 2013).
* :func:`spatial_conv` - k x k -> (k x 1, 1 x k) with D filters, solved optimally by the SVD of the
  reshaped kernel (Jaderberg et al. 2014, scheme 2; Tai et al. 2016, with optional BatchNorm between).
* :func:`cp_conv` - CP decomposition: 1x1, k x 1 depthwise, 1 x k depthwise, 1x1 (Lebedev et al. 2015).
* :func:`tucker2_conv` - Tucker-2 on the channel modes: 1x1, k x k core, 1x1 (Kim et al. 2016).

CP and Tucker use TensorLy (ALS / HOOI) on the PyTorch backend.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import NetslimError


def _check_plain_conv(conv: nn.Conv2d) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise NetslimError(f"expected a Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise NetslimError(f"grouped/depthwise convolutions (groups={conv.groups}) are not decomposed")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NetslimError("only zero, numeric padding is supported")


def _conv(in_c: int, out_c: int, kernel, stride=1, padding=0, dilation=1, groups=1, bias=False, like=None) -> nn.Conv2d:
    conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, dilation, groups, bias=bias)
    if like is not None:
        conv = conv.to(device=like.device, dtype=like.dtype)
    return conv


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``matrix ≈ A @ B``, A: m x rank, B: rank x n, singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(matrix.dtype), (root[:, None] * vh[:rank]).to(matrix.dtype)


def svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``Linear(n, m)`` -> ``Linear(n, rank, bias=False)``, ``Linear(rank, m)``."""
    a, b = truncated_svd(layer.weight, rank)
    first = nn.Linear(layer.in_features, rank, bias=False).to(layer.weight)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None).to(layer.weight)
    with torch.no_grad():
        first.weight.copy_(b)
        second.weight.copy_(a)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def svd_conv1x1(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """A 1x1 convolution as two 1x1 convolutions through ``rank`` channels (stride on the first)."""
    _check_plain_conv(conv)
    if conv.kernel_size != (1, 1):
        raise NetslimError("svd of a convolution needs a 1x1 kernel; use spatial, cp or tucker2")
    a, b = truncated_svd(conv.weight.flatten(1), rank)
    first = _conv(conv.in_channels, rank, 1, conv.stride, conv.padding, like=conv.weight)
    second = _conv(rank, conv.out_channels, 1, bias=conv.bias is not None, like=conv.weight)
    with torch.no_grad():
        first.weight.copy_(b[:, :, None, None])
        second.weight.copy_(a[:, :, None, None])
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return nn.Sequential(first, second)


def spatial_conv(conv: nn.Conv2d, rank: int, batchnorm: bool = False) -> nn.Sequential:
    """k x k conv C -> N as a k x 1 conv C -> D then a 1 x k conv D -> N, D = ``rank``.

    The kernel reshaped to a (C*k) x (N*k) matrix is split by truncated SVD, which is the
    optimal rank-D approximation (Tai et al. 2016, Thm. 1). With ``batchnorm`` a BatchNorm sits
    between the two (initialised to the identity in eval mode).
    """
    _check_plain_conv(conv)
    n, c, kh, kw = conv.weight.shape
    matrix = conv.weight.detach().permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    a, b = truncated_svd(matrix, rank)  # a: (C*kh, D), b: (D, N*kw)
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    vertical = _conv(c, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), like=conv.weight)
    horizontal = _conv(rank, n, (1, kw), (1, sw), (0, pw), (1, dw), bias=conv.bias is not None, like=conv.weight)
    with torch.no_grad():
        vertical.weight.copy_(a.t().reshape(rank, c, kh, 1))
        horizontal.weight.copy_(b.reshape(rank, n, kw).permute(1, 0, 2)[:, :, None, :])
        if conv.bias is not None:
            horizontal.bias.copy_(conv.bias)
    layers: list[nn.Module] = [vertical]
    if batchnorm:
        bn = nn.BatchNorm2d(rank).to(conv.weight)
        with torch.no_grad():
            bn.running_var.fill_(1.0 - bn.eps)  # exactly the identity in eval mode
        layers.append(bn)
    layers.append(horizontal)
    return nn.Sequential(*layers)


def _tensorly():
    import tensorly as tl

    tl.set_backend("pytorch")
    return tl


def balanced_factors(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CP factors with each rank-one component's scale shared equally by its factors (same product).

    ALS returns unit-norm columns and the scales apart; folding them into one factor leaves the four
    layers with norms orders of magnitude apart, which makes fine-tuning unstable (the instability of
    CP-decomposed layers that Lebedev et al. 2015 report). Equal norms give every layer the same scale.
    """
    norms = torch.stack([f.norm(dim=0) for f in factors]).clamp_min(1e-30)  # (modes, rank)
    share = (weights.abs() * norms.prod(0)) ** (1.0 / len(factors))
    balanced = [f * (share / n)[None, :] for f, n in zip(factors, norms)]
    balanced[0] = balanced[0] * torch.sign(weights)[None, :]
    return balanced


def cp_conv(conv: nn.Conv2d, rank: int, n_iter: int = 200, seed: int = 0) -> nn.Sequential:
    """CP decomposition of rank R (Lebedev et al. 2015): 1x1 C -> R, k x 1 and 1 x k depthwise, 1x1 R -> N.

    ALS runs in float32 (2.5x faster than float64 on a 512 x 512 x 3 x 3 kernel, and as accurate as
    the weights it fits); the factors are balanced (:func:`balanced_factors`)."""
    _check_plain_conv(conv)
    from tensorly.decomposition import parafac

    _tensorly()
    n, c, kh, kw = conv.weight.shape
    with warnings.catch_warnings():  # TensorLy warns when the SVD init asks for more vectors than a mode has
        warnings.simplefilter("ignore", UserWarning)
        cp = parafac(conv.weight.detach().float(), rank=rank, init="svd", n_iter_max=n_iter, random_state=seed)
    f_out, f_in, f_h, f_w = balanced_factors(cp.weights, cp.factors)
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    pointwise_in = _conv(c, rank, 1, like=conv.weight)
    depth_h = _conv(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, like=conv.weight)
    depth_w = _conv(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, like=conv.weight)
    pointwise_out = _conv(rank, n, 1, bias=conv.bias is not None, like=conv.weight)
    dtype = conv.weight.dtype
    with torch.no_grad():
        pointwise_in.weight.copy_(f_in.t()[:, :, None, None].to(dtype))
        depth_h.weight.copy_(f_h.t()[:, None, :, None].to(dtype))
        depth_w.weight.copy_(f_w.t()[:, None, None, :].to(dtype))
        pointwise_out.weight.copy_(f_out[:, :, None, None].to(dtype))
        if conv.bias is not None:
            pointwise_out.bias.copy_(conv.bias)
    return nn.Sequential(pointwise_in, depth_h, depth_w, pointwise_out)


def tucker2_conv(conv: nn.Conv2d, rank_in: int, rank_out: int, n_iter: int = 100, seed: int = 0) -> nn.Sequential:
    """Tucker-2 on the output and input channel modes (Kim et al. 2016): 1x1 C -> R_in, k x k core
    R_in -> R_out (carrying stride, padding, dilation), 1x1 R_out -> N."""
    _check_plain_conv(conv)
    from tensorly.decomposition import partial_tucker

    _tensorly()
    n, c, kh, kw = conv.weight.shape
    result = partial_tucker(conv.weight.detach().double(), rank=[rank_out, rank_in], modes=[0, 1],
                            n_iter_max=n_iter, init="svd", random_state=seed)
    core, factors = result[0] if isinstance(result[0], tuple) else result  # TensorLy >= 0.9 adds errors
    u_out, u_in = factors
    first = _conv(c, rank_in, 1, like=conv.weight)
    middle = _conv(rank_in, rank_out, (kh, kw), conv.stride, conv.padding, conv.dilation, like=conv.weight)
    last = _conv(rank_out, n, 1, bias=conv.bias is not None, like=conv.weight)
    dtype = conv.weight.dtype
    with torch.no_grad():
        first.weight.copy_(u_in.t()[:, :, None, None].to(dtype))
        middle.weight.copy_(core.to(dtype))
        last.weight.copy_(u_out[:, :, None, None].to(dtype))
        if conv.bias is not None:
            last.bias.copy_(conv.bias)
    return nn.Sequential(first, middle, last)
