"""0/1 weight masks as ``torch.nn.utils.parametrize`` parametrizations.

``module.weight`` becomes ``original * mask`` everywhere (forward, ``state_dict`` views,
optimizers see the original), so pruned weights stay exactly zero through fine-tuning,
and :func:`remove_masks_` bakes them in. Nothing patches ``forward``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import NetslimError


class MaskParametrization(nn.Module):
    """``weight -> weight * mask`` with the mask a (non-trainable) buffer saved in the state_dict."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.float32).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose ``weight`` carries a :class:`MaskParametrization`."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight") and any(
                isinstance(p, MaskParametrization) for p in m.parametrizations["weight"]):
            out[name] = m
    return out


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Attach ``masks[name]`` to ``model.get_submodule(name).weight`` (replacing an existing mask)."""
    for name, mask in masks.items():
        module = model.get_submodule(name)
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise NetslimError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(module.weight.shape)}")
        existing = _mask_of(module)
        if existing is not None:
            existing.mask.copy_(mask)
            continue
        with torch.no_grad():
            module.weight.mul_(mask.to(module.weight.dtype))  # zeros stay zero even without the mask
        parametrize.register_parametrization(module, "weight", MaskParametrization(mask.to(module.weight.device)))
    return model


def _mask_of(module: nn.Module) -> MaskParametrization | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, MaskParametrization):
            return p
    return None


def remove_masks_(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight and drop the parametrization."""
    for _, m in masked_modules(model).items():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def sparsity(model: nn.Module, kinds: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> float:
    """Fraction of zero weights over the weights of layers of ``kinds``."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, kinds):
            w = m.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)
