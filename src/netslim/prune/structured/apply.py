"""Physically removing channel groups: every coupled slice shrinks and layer attributes follow."""
from __future__ import annotations

import torch
from torch import nn

from .graph import ConvRule, DependencyGraph

_NORMS = (nn.modules.batchnorm._NormBase,)


def keep_indices(graph: DependencyGraph, remove: set[int]) -> dict[tuple[str, str, int], torch.Tensor]:
    """(module, param, dim) -> indices that stay when the groups ``remove`` (root labels) go."""
    keep: dict[tuple[str, str, int], torch.Tensor] = {}
    for s in graph.slices:
        mask = torch.tensor([r not in remove for r in graph.roots(s.labels).tolist()], dtype=torch.bool)
        key = (s.module, s.param, s.dim)
        keep[key] = mask if key not in keep else keep[key] & mask
    return {k: m.nonzero().squeeze(1) for k, m in keep.items()}


def remove_groups_(model: nn.Module, graph: DependencyGraph, remove: set[int]) -> nn.Module:
    """Delete the channel groups ``remove`` from ``model`` in place and fix every layer's attributes."""
    modules = dict(model.named_modules())
    touched = set()
    for (mname, pname, dim), idx in keep_indices(graph, remove).items():
        module = modules[mname]
        old = getattr(module, pname)
        if idx.numel() == old.shape[dim]:
            continue
        set_tensor(module, pname, old.detach().index_select(dim, idx.to(old.device)).clone())
        touched.add(mname)
    for mname in touched:
        sync_attributes(modules[mname], graph.conv_rules.get(mname))
    return model


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)


def sync_attributes(module: nn.Module, rule: ConvRule | None = None) -> None:
    """Make a layer's size attributes (``in_channels``, ``num_features``, ...) match its tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        kind = rule.kind if rule is not None else ("dense" if module.groups == 1 else "grouped")
        module.out_channels = w.shape[0]
        if kind == "depthwise":
            module.groups = w.shape[0] // (rule.multiplier if rule else 1)
            module.in_channels = module.groups
        else:
            module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _NORMS):
        ref = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
