"""Model surgery shared by every technique family: baking parametrizations in, copying safely."""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize


def bake_parametrizations_(model: nn.Module) -> nn.Module:
    """Replace every parametrized tensor (masks, shared weights, fake-quant) by its current value."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works for parametrized modules.

    deepcopy shares the dynamically made ``Parametrized<Cls>`` class between original and copy,
    and removing a parametrization deletes the property from that class, breaking the
    original: each parametrized module of the copy gets a class of its own.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            cls = module.__class__
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return clone
