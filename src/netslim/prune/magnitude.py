"""Magnitude pruning: remove the weights of smallest |w| (Han et al., "Learning both Weights and
Connections", NeurIPS 2015; step 1 of Deep Compression, Han et al. ICLR 2016)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NetslimError
from .masks import apply_masks_

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SCOPES = ("global", "layer")


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in exclude}
    unknown = set(exclude) - {n for n, _ in model.named_modules()}
    if unknown:
        raise NetslimError(f"exclude names unknown layers: {', '.join(sorted(unknown))}")
    return layers


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "global",
                    exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """0/1 masks keeping the largest-magnitude weights.

    ``scope="global"`` ranks all prunable weights together (one threshold), ``"layer"`` prunes
    each layer to ``sparsity`` on its own.
    """
    if not 0.0 <= sparsity < 1.0:
        raise NetslimError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise NetslimError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    layers = prunable_layers(model, exclude)
    weights = {n: m.weight.detach() for n, m in layers.items()}
    if scope == "global":
        scores = torch.cat([w.abs().flatten() for w in weights.values()])
        k = int(sparsity * scores.numel())
        threshold = scores.kthvalue(k).values if k > 0 else scores.new_tensor(-1.0)
        return {n: (w.abs() > threshold).float() for n, w in weights.items()}
    masks = {}
    for n, w in weights.items():
        k = int(sparsity * w.numel())
        thr = w.abs().flatten().kthvalue(k).values if k > 0 else w.new_tensor(-1.0)
        masks[n] = (w.abs() > thr).float()
    return masks


def magnitude_prune_(model: nn.Module, sparsity: float, scope: str = "global",
                     exclude: tuple[str, ...] = ()) -> nn.Module:
    """Prune ``model`` in place to ``sparsity`` with masks that keep pruned weights at zero."""
    return apply_masks_(model, magnitude_masks(model, sparsity, scope, exclude))
