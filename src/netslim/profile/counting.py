"""Per-layer parameter, MAC and activation counts, taken with forward hooks on one example input.

MACs follow the convention of ``torch.utils.flop_counter.FlopCounterMode`` (which counts
2 FLOPs per multiply-accumulate): convolutions and matrix products only; BatchNorm,
activations and pooling are not counted. Work that is not done by a hooked layer (a
``torch.matmul`` in a ``forward``) is reported on an ``(other ops)`` row, counted by
``FlopCounterMode`` itself, so totals are complete for any model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..outputs import as_args, output_nbytes, output_shapes

COUNTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear, nn.Bilinear)


@dataclass
class LayerStats:
    """One row of a profile: a leaf module with parameters or MACs.

    ``output_shape``: the shape of the layer's output tensor, or, for a layer that returns several
    tensors (a tuple, list or dict), the tuple of their shapes in flattened order
    (:mod:`netslim.outputs`). ``output_bytes``: bytes of all of them.
    """

    name: str
    kind: str
    params: int
    nonzero_params: int
    macs: int
    effective_macs: int
    output_shape: tuple = field(default_factory=tuple)
    activation_bytes: int = 0
    output_bytes: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output_shape"] = _as_lists(self.output_shape)
        return d


def _as_lists(shape: tuple) -> list:
    return [_as_lists(s) if isinstance(s, tuple) else s for s in shape]


def _numel(t) -> int:
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def layer_output_shape(output) -> tuple:
    """A tensor's shape; the shapes of every tensor of a tuple, list or dict output, in flattened order."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    return tuple(output_shapes(output))


def layer_macs(module: nn.Module, inputs: tuple, output) -> int:
    """Dense multiply-accumulates of one call of a conv or linear layer."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        w = module.weight
        return _numel(output) * (w.shape[1]) * math.prod(w.shape[2:])
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        w = module.weight  # (in, out/groups, k...)
        return _numel(inputs[0]) * w.shape[1] * math.prod(w.shape[2:])
    if isinstance(module, nn.Linear):
        return _numel(output) * module.in_features
    if isinstance(module, nn.Bilinear):
        return _numel(output) * module.in1_features * module.in2_features
    return 0


def _weight_density(module: nn.Module) -> tuple[int, int]:
    """(non-zero, total) weight entries; MACs of zero weights are skipped in effective MACs."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() == 0:
        return 1, 1
    return int(torch.count_nonzero(w.detach())), w.numel()


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's effective parameters (parametrized ones evaluated), not its children's."""
    tensors = [p for _, p in module.named_parameters(recurse=False)]
    if hasattr(module, "parametrizations"):
        tensors += [getattr(module, name) for name in module.parametrizations.keys()]
    return tensors


def _is_leaf_for_stats(module: nn.Module) -> bool:
    children = [c for n, c in module.named_children() if n != "parametrizations"]
    return not children


def count_layers(model: nn.Module, example_input) -> tuple[list[LayerStats], int]:
    """Run ``model`` once on ``example_input`` (a tensor, a tuple of positional inputs or a list of images:
    :func:`netslim.outputs.as_args`); return per-layer stats and the MACs of unhooked ops."""
    rows: dict[str, LayerStats] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output) -> None:
            macs = layer_macs(module, inputs, output)
            w_nonzero, w_total = _weight_density(module) if macs else (1, 1)
            tensors = _own_tensors(module)
            row = rows.get(name)
            if row is None:
                params = sum(_numel(t) for t in tensors)
                nonzero = sum(int(torch.count_nonzero(t.detach())) for t in tensors)
                row = rows[name] = LayerStats(name, type(module).__name__, params, nonzero, 0, 0,
                                              layer_output_shape(output), 0, output_nbytes(output))
            row.macs += macs
            row.effective_macs += macs * w_nonzero // w_total
            row.activation_bytes = max(row.activation_bytes, output_nbytes(inputs) + output_nbytes(output))
        return fn

    for name, module in model.named_modules():
        if name.endswith("parametrizations") or ".parametrizations." in name:
            continue
        if _is_leaf_for_stats(module):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(*as_args(example_input))
    finally:
        for h in handles:
            h.remove()
    hooked = sum(r.macs for r in rows.values())
    other = max(0, counter.get_total_flops() // 2 - hooked)
    # modules with parameters that the forward pass did not reach, and parameters owned by containers
    for name, module in model.named_modules():
        if name in rows or name.endswith("parametrizations") or ".parametrizations." in name:
            continue
        own = _own_tensors(module)
        if own:
            n = sum(t.numel() for t in own)
            nz = sum(int(torch.count_nonzero(t.detach())) for t in own)
            rows[name or "(model)"] = LayerStats(name or "(model)", type(module).__name__, n, nz, 0, 0)
    ordered = [r for r in rows.values() if r.params or r.macs or r.activation_bytes]
    return ordered, int(other)
