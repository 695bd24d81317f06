"""Saving and loading a pruned model without pickled code.

The file (``torch.save`` of plain containers, loaded with ``weights_only=True``) holds the name of
the architecture it came from (a zoo name such as ``resnet56`` or ``torchvision:resnet18``), every
tensor's shape, every convolution's ``groups``, and the ``state_dict``. Loading builds the
architecture, shrinks its layers to the recorded shapes (bounds-checked: a layer may only shrink),
and loads the weights strictly.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import NetslimError
from ...io import save_torch
from .apply import set_tensor, sync_attributes

FORMAT = "netslim-pruned-v1"


def structure_of(model: nn.Module) -> dict:
    """Shapes of all parameters and buffers, and the ``groups`` of every convolution."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    groups = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    return {"shapes": shapes, "groups": groups}


def apply_structure_(model: nn.Module, structure: dict) -> nn.Module:
    """Shrink ``model``'s layers to ``structure`` (from :func:`structure_of`); the new tensors are zeros (finite,
    so replayed later stages such as quantization can run on them) until a state_dict is loaded."""
    if not isinstance(structure, dict) or not isinstance(structure.get("shapes"), dict) \
            or not isinstance(structure.get("groups", {}), dict):
        raise NetslimError("pruned-model structure must hold a 'shapes' mapping and a 'groups' mapping")
    modules = dict(model.named_modules())
    current = model.state_dict()
    touched = set()
    if len(structure["shapes"]) > 1 << 16 or len(structure.get("groups", {})) > 1 << 16:
        raise NetslimError("pruned-model structure records too many tensors")
    for key, shape in structure["shapes"].items():
        if key not in current:
            raise NetslimError(f"pruned-model structure names {key!r}, which this architecture does not have")
        old = current[key]
        if not (isinstance(shape, list) and len(shape) == old.dim()
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= o for s, o in zip(shape, old.shape))):
            raise NetslimError(f"bad shape for {key}: {shape!r} (original {list(old.shape)}; a layer can only shrink)")
        if list(old.shape) != shape:
            mname, _, pname = key.rpartition(".")
            set_tensor(modules[mname], pname, torch.zeros(shape, dtype=old.dtype, device=old.device))
            touched.add(mname)
    for mname, groups in structure.get("groups", {}).items():
        module = modules.get(mname)
        if not isinstance(module, nn.modules.conv._ConvNd) or not isinstance(groups, int) \
                or isinstance(groups, bool) or groups < 1 or module.weight.shape[0] % groups:
            raise NetslimError(f"bad groups for {mname}: {groups!r}")
        if groups != module.groups:
            module.groups = groups
            touched.add(mname)
    for mname in touched:
        sync_attributes(modules[mname])
    return model


def save_pruned(model: nn.Module, path: str | Path, arch: str, num_classes: int | None = None) -> Path:
    """Write ``model`` (pruned from architecture ``arch``) so :func:`load_pruned` can rebuild it.

    The ``netslim-pruned-v1`` format only holds layers that shrank; :func:`netslim.save` writes the
    general ``netslim-model-v1`` (low-rank factors too), which :func:`load_pruned` reads as well."""
    from ...saving import digest

    payload = {"format": FORMAT, "arch": arch, "num_classes": num_classes,
               "structure": structure_of(model), "state_dict": model.state_dict()}
    payload["sha256"] = digest(payload)
    return save_torch(payload, path)


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned` or :func:`netslim.save` (no code is unpickled)."""
    from ...saving import load

    return load(path)
