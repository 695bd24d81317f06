"""Magnitude pruning: remove the weights of smallest |w| (Han et al., "Learning both Weights and
Connections", NeurIPS 2015; step 1 of Deep Compression, Han et al. ICLR 2016)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NetslimError
from ..layers import select_layers, unknown_layer
from ..targets import bisect, check_scope
from .masks import apply_masks_

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Conv and linear layers not inside an ``exclude`` name (see :func:`netslim.layers.select_layers`)."""
    return select_layers(model, PRUNABLE, exclude=exclude)


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "global",
                    exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """0/1 masks keeping the largest-magnitude weights.

    ``scope="global"`` ranks all prunable weights together (one threshold), ``"uniform"`` prunes
    each layer to ``sparsity`` on its own (``"layer"``: the deprecated word for it). ``exclude``: layers
    left alone (a name covers its submodules).
    """
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise NetslimError(f"sparsity must be in [0, 1), got {sparsity!r}")
    scope = check_scope(scope)
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


def threshold_masks(model: nn.Module, quality: float, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Han et al. 2015's rule: prune |w| below ``quality`` x the standard deviation of the layer's weights."""
    if quality < 0:
        raise NetslimError(f"threshold_std must be >= 0, got {quality}")
    masks = {}
    for n, m in prunable_layers(model, exclude).items():
        w = m.weight.detach()
        nonzero = w[w != 0]
        std = nonzero.std() if nonzero.numel() > 1 else w.std()
        masks[n] = (w.abs() > quality * std).float()
    return masks


def planned_masks(model: nn.Module, plan: dict[str, float]) -> dict[str, torch.Tensor]:
    """Magnitude masks with a sparsity of its own for each layer named in ``plan``."""
    layers = dict(model.named_modules())
    masks = {}
    for n, s in plan.items():
        if n not in layers:
            raise unknown_layer(model, n, "layer_sparsity")
        if not 0 <= s < 1:
            raise NetslimError(f"sparsity of {n} must be in [0, 1), got {s}")
        w = layers[n].weight.detach()
        k = int(s * w.numel())
        thr = w.abs().flatten().kthvalue(k).values if k > 0 else w.new_tensor(-1.0)
        masks[n] = (w.abs() > thr).float()
    return masks


def contribution_scores(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, float]:
    """Per-layer contribution: sum |W| + |b| of the layer, per weight (a layer-ranking criterion)."""
    scores = {}
    for n, m in prunable_layers(model, exclude).items():
        total = m.weight.detach().abs().sum()
        if getattr(m, "bias", None) is not None:
            total = total + m.bias.detach().abs().sum()
        scores[n] = float(total) / m.weight.numel()
    return scores


def contribution_plan(model: nn.Module, target: float, exclude: tuple[str, ...] = (),
                      max_sparsity: float = 0.99) -> dict[str, float]:
    """Per-layer sparsities that reach ``target`` overall, pruning layers of lower contribution
    per weight harder (sparsity proportional to 1 / score, scaled by bisection)."""
    scores = contribution_scores(model, exclude)
    sizes = {n: m.weight.numel() for n, m in prunable_layers(model, exclude).items()}
    total = sum(sizes.values())
    inv = {n: 1.0 / max(s, 1e-12) for n, s in scores.items()}

    def reached(c: float) -> float:
        return sum(min(max_sparsity, c * inv[n]) * sizes[n] for n in sizes) / total

    found = bisect(reached, 0.0, 1e6, target, increasing=True, at_most=False, steps=100)
    c = found.knob if found is not None else 1e6  # unreachable: every layer at max_sparsity
    return {n: min(max_sparsity, c * inv[n]) for n in sizes}
