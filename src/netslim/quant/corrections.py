"""Corrections applied to a calibrated quantized model: bias correction (empirical or data-free, Nagel
et al. 2019 §4.2) and AdaRound learned rounding (Nagel et al. 2020), layer by layer.

They work on the model :func:`netslim.quant.ptq.prepare` builds, whose ``float`` mode is the folded
float model; the float reference is therefore the same module with its quantizers switched off.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..train import default_device
from .adaround import adaround_weight
from .equalize import bias_correction_, expected_relu_output
from .graph import QUANT_LAYERS
from .modules import ActQuant, WeightQuant

log = logging.getLogger("netslim.quant")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QUANT_LAYERS) and hasattr(m, "parametrizations")
            and isinstance(m.parametrizations.weight[0], WeightQuant)}


def _mode(model: nn.Module, mode: str) -> None:
    from .ptq import set_mode
    set_mode(model, mode)


def _ensure_bias(layer: nn.Module) -> Tensor:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.out_channels if hasattr(layer, "out_channels")
                                              else layer.out_features, device=layer.weight.device))
    return layer.bias


def _images(batches: Iterable, limit: int | None, device) -> Iterable[Tensor]:
    device = torch.device(device) if device is not None else default_device()
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        yield (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)


def _weight_error_output(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer``'s output change caused by its weight quantization alone, on input ``x``: (W_q - W) x."""
    error = layer.weight - layer.parametrizations.weight.original
    if isinstance(layer, nn.Linear):
        return F.linear(x, error)
    return layer._conv_forward(x, error, None)


@torch.no_grad()
def empirical_bias_correction_(model: nn.Module, calib_data: Iterable, limit: int | None = None,
                               device: str | torch.device | None = None) -> nn.Module:
    """Empirical bias correction (Nagel et al. 2019 §4.2 with E[x] measured): subtract from each layer's
    bias the per-channel mean of ``(W_q - W) x`` over the calibration images, ``x`` being the layer's
    input in the quantized model. Each layer removes only the shift its own weights cause; correcting
    every layer by its whole output shift at once would count an upstream layer's shift again in every
    layer after it (and diverge when repeated). ``device``: where the images go (default
    :func:`netslim.train.default_device`). Returns ``model``."""
    layers = quantized_layers(model)
    images = list(_images(calib_data, limit, device))
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def fn(layer, inputs, _out):
            shift = _weight_error_output(layer, inputs[0])
            axis = shift.dim() - 1 if isinstance(layer, nn.Linear) else 1
            dims = [d for d in range(shift.dim()) if d != axis]
            sums[name] = sums.get(name, 0) + shift.double().sum(dim=dims)
            counts[name] = counts.get(name, 0) + shift.numel() // shift.shape[axis]
        return fn

    _mode(model, "quantize")
    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(hook(name)))
    try:
        for x in images:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for name, layer in layers.items():
        if name in sums:
            _ensure_bias(layer).sub_((sums[name] / counts[name]).float())
    return model


@torch.no_grad()
def data_free_bias_correction_(model: nn.Module, bn_stats: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """Data-free bias correction: the expected input of each layer fed (through a ReLU) by a layer with a
    folded BatchNorm is the clipped-normal mean of that BatchNorm's N(beta, gamma^2); the bias absorbs
    E[(W_q - W) x]. Returns ``model``."""
    if not isinstance(model, fx.GraphModule):
        return model
    modules = dict(model.named_modules())
    for node in model.graph.nodes:
        if node.op != "call_module" or node.target not in quantized_layers(model):
            continue
        expected = _expected_input(node.args[0], modules, bn_stats)
        if expected is None:
            continue
        layer = modules[node.target]
        error = layer.weight - layer.parametrizations.weight.original
        _ensure_bias(layer)
        bias_correction_(layer, error, expected.to(error.device))
        log.debug("data-free bias correction of %s", node.target)
    return model


def _expected_input(node, modules, bn_stats) -> Tensor | None:
    relu = False
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(modules[node.target], (ActQuant, nn.Dropout, nn.Identity)):
            node = node.args[0]
        elif (node.op == "call_module" and isinstance(modules[node.target], nn.ReLU)) or \
                (node.op == "call_function" and node.target in (F.relu, torch.relu)):
            if relu:
                return None
            relu, node = True, node.args[0]
        elif node.op == "call_module" and node.target in bn_stats:
            beta, gamma = bn_stats[node.target]
            return expected_relu_output(beta, gamma) if relu else beta.clone()
        else:
            return None
    return None


def _activation_after(model: nn.Module, layer_name: str) -> Callable[[Tensor], Tensor] | None:
    if not isinstance(model, fx.GraphModule):
        return None
    modules = dict(model.named_modules())
    for node in model.graph.nodes:
        if node.op == "call_module" and node.target == layer_name and len(node.users) == 1:
            user = next(iter(node.users))
            kind = modules.get(user.target) if user.op == "call_module" else user.target
            if isinstance(kind, nn.ReLU) or kind in (F.relu, torch.relu):
                return F.relu
            if isinstance(kind, nn.ReLU6) or kind is F.relu6:
                return F.relu6
    return None


@torch.no_grad()
def _capture(model: nn.Module, layer: nn.Module, images: list[Tensor], what: str) -> Tensor:
    out = []

    def hook(_m, inputs, output):
        out.append((inputs[0] if what == "input" else output).detach())

    handle = layer.register_forward_hook(hook)
    try:
        for x in images:
            model(x)
    finally:
        handle.remove()
    return torch.cat(out)


def _float_copy(layer: nn.Module) -> nn.Module:
    weight = layer.parametrizations.weight.original.detach()
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        plain = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, layer.groups, bias=layer.bias is not None)
    plain.weight.data = weight.clone()
    if layer.bias is not None:
        plain.bias.data = layer.bias.detach().clone()
    return plain.to(weight.device)


def adaround_model_(model: nn.Module, calib_data: Iterable, samples: int = 256, iters: int = 1000,
                    device: str | torch.device | None = None, progress: bool = False) -> nn.Module:
    """AdaRound every quantized layer in order: inputs from the quantized model (earlier layers already
    rounded), targets from the float model, the rounding of the layer's weights learned to match them.
    Returns ``model``."""
    images, total = [], 0
    for x in _images(calib_data, None, device):
        images.append(x[: samples - total])
        total += len(images[-1])
        if total >= samples:
            break
    for name, layer in quantized_layers(model).items():
        quantizer = layer.parametrizations.weight[0]
        act = _activation_after(model, name)
        _mode(model, "float")
        targets = _capture(model, layer, images, "output")
        targets = act(targets) if act else targets
        _mode(model, "quantize")
        inputs = _capture(model, layer, images, "input")
        rounded = adaround_weight(_float_copy(layer), inputs, targets, quantizer.scale.detach(),
                                  quantizer.zero_point, quantizer.spec, iters=iters, activation=act)
        layer.parametrizations.weight.original.data.copy_(rounded)
    _mode(model, "quantize")
    return model
