"""Model surgery shared by every technique family: baking parametrizations in, copying safely."""
from __future__ import annotations

import copy

import torch

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


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where submodule ``name`` was (``"features.3"``, ``"layer1.0.conv1"``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def io_shapes(model: nn.Module, example_input, kinds: tuple[type, ...]) -> dict[str, tuple[tuple, tuple]]:
    """Input and output shapes of every module of ``kinds`` on one forward pass."""

    shapes: dict[str, tuple[tuple, tuple]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            def hook(m, inputs, output, name=name):
                shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
            handles.append(module.register_forward_hook(hook))
    forward_once(model, example_input, handles)
    return shapes


def forward_once(model: nn.Module, inputs, handles) -> None:
    """One forward pass of ``model`` on ``inputs`` in eval mode without gradients (a tuple or list of
    positional inputs is not unpacked: pass what ``model`` takes), for the hooks in ``handles`` to observe;
    the hooks are removed and the model's training mode restored afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
