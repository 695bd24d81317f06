"""Trained weight sharing (Deep Compression, Han et al. ICLR 2016 §3) and the hashing trick
(HashedNets, Chen et al. ICML 2015).

Each layer's non-zero weights are replaced by one of ``2**bits`` shared values (a codebook);
pruned weights keep a fixed, exact zero. The shared weight is a parametrization
``weight = [0, codebook][indices]``: the gradient of each centroid is the sum of the gradients
of the weights in its cluster (the paper's centroid fine-tuning, Fig. 3), computed by
autograd's index backward, and any training loop fine-tunes it.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import NetslimError, unknown_choice
from ..layers import select_layers
from ..surgery import bake_parametrizations_

INITS = ("linear", "density", "random")
SHAREABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class SharedWeight(nn.Module):
    """``weight -> cat([0], codebook)[indices]``; index 0 is the pruned, exact zero."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone().float())
        self.register_buffer("indices", indices.detach().clone().long())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.codebook.new_zeros(1), self.codebook])
        return table[self.indices].to(weight.dtype)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight  # the original is kept (and frozen); the codebook holds the values


def init_centroids(values: torch.Tensor, k: int, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial centroids (Han et al. §3.2): ``linear`` spaced over [min, max] (the paper's best),
    ``density`` at equally spaced quantiles of the CDF, ``random`` drawn from the weights."""
    if init == "linear":
        return torch.linspace(float(values.min()), float(values.max()), k)
    if init == "density":
        return torch.quantile(values.float(), torch.linspace(0, 1, k + 2)[1:-1])
    if init == "random":
        pick = torch.randperm(values.numel(), generator=generator)[:k]
        return values[pick].sort().values
    raise unknown_choice("k-means init", init, INITS)


def kmeans_1d(values: torch.Tensor, k: int, init: str = "linear", iters: int = 30,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on scalars: (centroids sorted ascending, assignment per value).

    In one dimension the nearest centroid is found exactly with a binary search over the
    midpoints between sorted centroids, so each iteration is O(n log k).
    """
    values = values.detach().float().flatten()
    if values.numel() == 0:
        raise NetslimError("k-means needs at least one value")
    k = max(1, min(k, values.numel()))
    g = torch.Generator().manual_seed(seed)
    centroids = init_centroids(values, k, init, g).float()
    assign = torch.zeros_like(values, dtype=torch.long)
    for _ in range(iters):
        centroids, _ = centroids.sort()
        mids = (centroids[1:] + centroids[:-1]) / 2
        new_assign = torch.bucketize(values, mids)
        sums = torch.zeros(k).index_add_(0, new_assign, values)
        counts = torch.zeros(k).index_add_(0, new_assign, torch.ones_like(values))
        empty = counts == 0
        centroids = torch.where(empty, centroids, sums / counts.clamp(min=1))
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    centroids, _ = centroids.sort()
    mids = (centroids[1:] + centroids[:-1]) / 2
    return centroids, torch.bucketize(values, mids)


def share_layer_(module: nn.Module, bits: int, init: str = "linear", iters: int = 30, seed: int = 0) -> nn.Module:
    """Replace ``module.weight`` by ``2**bits`` shared values of its non-zeros (zeros stay zero)."""
    if not 1 <= bits <= 16:
        raise NetslimError(f"weight-sharing bits must be in 1..16, got {bits}")
    bake_parametrizations_(module)
    w = module.weight.detach()
    if not torch.isfinite(w).all():
        raise NetslimError("weights contain NaN or infinity; cannot share them")
    nonzero = w != 0
    indices = torch.zeros_like(w, dtype=torch.long)
    k = 1 << bits
    codebook = torch.zeros(k)
    if nonzero.any():
        centroids, assign = kmeans_1d(w[nonzero], k, init, iters, seed)
        codebook[:centroids.numel()] = centroids
        indices[nonzero] = assign + 1
    module.weight.requires_grad_(False)
    parametrize.register_parametrization(module, "weight", SharedWeight(codebook, indices), unsafe=True)
    return module


def hash_layer_(module: nn.Module, bits: int, seed: int = 0) -> nn.Module:
    """HashedNets (Chen et al. 2015): a fixed hash of each weight's position picks its bucket;
    each bucket's value starts as the mean of its weights and is then trained. Zeros stay zero."""
    bake_parametrizations_(module)
    w = module.weight.detach()
    k = 1 << bits
    g = torch.Generator().manual_seed(seed + w.numel())
    bucket = torch.randint(0, k, w.shape, generator=g)  # the hash: a seeded pseudo-random function of position
    nonzero = w != 0
    sums = torch.zeros(k).index_add_(0, bucket[nonzero], w[nonzero].float())
    counts = torch.zeros(k).index_add_(0, bucket[nonzero], torch.ones(int(nonzero.sum())))
    codebook = sums / counts.clamp(min=1)
    indices = torch.where(nonzero, bucket + 1, torch.zeros_like(bucket))
    module.weight.requires_grad_(False)
    parametrize.register_parametrization(module, "weight", SharedWeight(codebook, indices), unsafe=True)
    return module


def shareable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Conv and linear layers not inside an ``exclude`` name (see :func:`netslim.layers.select_layers`)."""
    return select_layers(model, SHAREABLE, exclude=exclude)


def layer_bits(module: nn.Module, conv_bits: int, fc_bits: int) -> int:
    return fc_bits if isinstance(module, nn.Linear) else conv_bits


def share_weights_(model: nn.Module, conv_bits: int = 8, fc_bits: int = 5, method: str = "kmeans",
                   init: str = "linear", exclude: tuple[str, ...] = (), seed: int = 0) -> nn.Module:
    """Weight sharing of every conv / linear layer (the paper: 8 bits conv, 5 bits fc)."""
    for name, module in shareable_layers(model, exclude).items():
        bits = layer_bits(module, conv_bits, fc_bits)
        if method == "kmeans":
            share_layer_(module, bits, init, seed=seed)
        elif method == "hash":
            hash_layer_(module, bits, seed=seed)
        else:
            raise unknown_choice("weight-sharing method", method, ("kmeans", "hash"))
    return model


def restore_shared_(model: nn.Module, conv_bits: int, fc_bits: int, exclude: tuple[str, ...] = ()) -> nn.Module:
    """Rebuild the parametrization structure (values come from a state_dict loaded afterwards)."""
    for _, module in shareable_layers(model, exclude).items():
        bake_parametrizations_(module)
        k = 1 << layer_bits(module, conv_bits, fc_bits)
        module.weight.requires_grad_(False)
        parametrize.register_parametrization(
            module, "weight", SharedWeight(torch.zeros(k), torch.zeros_like(module.weight, dtype=torch.long)),
            unsafe=True)
    return model
