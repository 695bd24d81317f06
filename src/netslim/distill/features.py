"""Features of named layers through forward hooks, and the adapters that make two models' features comparable.

* :class:`FeatureTap` keeps the latest output (or input) of named submodules of a model while it
  runs, through ``register_forward_hook`` / ``register_forward_pre_hook``: the model itself is
  never wrapped or changed, so ``state_dict``, DDP and export see the plain model.
* :func:`make_adapter` maps student features to the teacher's width (1x1 conv + BatchNorm for
  feature maps, a linear layer for vectors, as FitNets' regressor, Romero et al. 2015, §2.2).
* :func:`match_spatial` average-pools two feature maps to the smaller one's height and width.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import NetslimError
from ..layers import layer_names, unknown_layer


def get_layer(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """``model.get_submodule(name)``; an unknown name is a :class:`NetslimError` listing the valid ones."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    raise unknown_layer(model, name, where=f" in the {role} ({type(model).__name__})")


def last_linear_name(model: nn.Module, role: str = "model") -> str:
    """Name of the last ``nn.Linear`` of ``model``: its input is the default embedding (the penultimate features)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise NetslimError(f"the {role} ({type(model).__name__}) has no nn.Linear classifier to take the embedding "
                           "from; name its embedding layer explicitly (embedding=(teacher_layer, student_layer))")
    return names[-1]


class FeatureTap:
    """Record the outputs of ``layers`` (and the inputs of ``inputs_of``) of ``model`` on every forward.

    ``tap.features[name]`` is the tensor of the latest call (with its autograd graph when the
    forward ran with gradients); a layer called several times per forward keeps its last call.
    Use as a context manager, or call :meth:`remove` to take the hooks off.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] = (), inputs_of: Sequence[str] = (),
                 role: str = "model") -> None:
        self.features: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(layers):
            self._handles.append(get_layer(model, name, role).register_forward_hook(self._keep_output(name)))
        for name in dict.fromkeys(inputs_of):
            self._handles.append(get_layer(model, name, role).register_forward_pre_hook(self._keep_input(name)))

    def _keep_output(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise NetslimError(f"layer {name!r} returns {type(output).__name__}, not a tensor; choose a layer "
                                   "whose output is a single feature tensor")
            self.features[name] = output
        return hook

    def _keep_input(self, name: str):
        def hook(module: nn.Module, args) -> None:
            self.inputs[name] = args[0]
        return hook

    def clear(self) -> None:
        self.features.clear()
        self.inputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def make_adapter(student_channels: int, teacher_channels: int, spatial: bool, always: bool = False) -> nn.Module:
    """A learned map from the student's width to the teacher's: 1x1 conv + BatchNorm for feature maps
    (``spatial``), a linear layer for vectors; ``nn.Identity`` when the widths agree (unless ``always``)."""
    if student_channels == teacher_channels and not always:
        return nn.Identity()
    if spatial:
        return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                             nn.BatchNorm2d(teacher_channels))
    return nn.Linear(student_channels, teacher_channels)


def is_feature_map(x: torch.Tensor) -> bool:
    return x.dim() == 4


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool feature maps ``a`` and ``b`` (N, C, H, W) to the smaller height and width of the two."""
    if not (is_feature_map(a) and is_feature_map(b)) or a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    pool = nn.functional.adaptive_avg_pool2d
    return (a if a.shape[-2:] == size else pool(a, size)), (b if b.shape[-2:] == size else pool(b, size))


def as_embedding(x: torch.Tensor) -> torch.Tensor:
    """A (N, D) vector per sample: feature maps are globally average-pooled, other shapes flattened."""
    if is_feature_map(x):
        x = x.mean(dim=(2, 3))
    return x.flatten(1)


__all__ = ["FeatureTap", "get_layer", "layer_names", "last_linear_name", "make_adapter", "match_spatial",
           "as_embedding", "is_feature_map"]
