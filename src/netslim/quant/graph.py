"""Turn a float model into a quantizable one: fold BatchNorm, fake-quantize weights, place activation
quantizers where an integer runtime needs them.

The model is traced with ``torch.fx.symbolic_trace`` (a graph of modules and functions, which is what
placing quantizers needs: "after this add", "before this linear"). Activation quantizers go on the
model input and on the output of every op that computes new values (a conv or linear together with
the ReLU that follows it, an add, a concat, an average pool, any float op); ops that only move values
(max pool, flatten, reshape, dropout, ReLU of quantized values) keep the grid of their input. This is
the placement that lets ONNX Runtime fuse DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv.

A model fx cannot trace falls back to per-layer placement (a quantizer in front of each conv/linear);
it simulates the same arithmetic but leaves more of the model in float at run time, and says so.
"""
from __future__ import annotations

import copy
import logging
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..layers import covers
from ..surgery import replace_module_

log = logging.getLogger("netslim.quant")

QUANT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, F.relu, F.relu6, torch.relu, "relu", "relu_", F.hardtanh)
PASSTHROUGH_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Identity,
                       nn.Unflatten, nn.ChannelShuffle)
PASSTHROUGH_FUNCTIONS = (torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                         torch.unsqueeze, torch.chunk, torch.split, F.max_pool2d, F.max_pool1d, F.dropout,
                         F.adaptive_max_pool2d, operator.getitem, getattr, torch.channel_shuffle)
PASSTHROUGH_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                       "chunk", "split", "size", "dim", "expand", "__getitem__")
WEIGHTED_UNSUPPORTED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.ConvTranspose2d, nn.Conv3d,
                        nn.Embedding, nn.PReLU, nn.MultiheadAttention)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Copy of ``model`` (eval mode, fx-traced) with every BatchNorm that directly follows a conv or linear
    layer folded into it. Also returns, per folded layer, the BatchNorm's (beta, gamma): the mean and std
    of that layer's pre-activation output, which data-free bias correction uses (Nagel et al. 2019 §4.2)."""
    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    stats = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            fused = fuse_conv_bn_eval(layer, bn)
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        stats[prev.target] = (bn.bias.detach().clone(), bn.weight.detach().abs().clone())
        replace_module_(gm, prev.target, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, stats


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.ReLU, nn.ReLU6))
    if node.op == "call_function":
        return node.target in ACTIVATIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in PASSTHROUGH_METHODS


def _is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def insert_activation_quantizers(gm: fx.GraphModule, example_input: torch.Tensor, make_quantizer,
                                 quantize_output: bool = True) -> list[str]:
    """Insert ``make_quantizer(node_name)`` modules after the model input and every value-computing op
    (after the ReLU that follows it, if any). Returns the names of the inserted quantizer modules."""
    ShapeProp(gm).propagate(example_input)
    modules = dict(gm.named_modules())
    outputs = {a for n in gm.graph.nodes if n.op == "output" for a in _flatten_args(n.args)}
    names = []
    for node in list(gm.graph.nodes):
        if node.op in ("output", "get_attr") or not _is_float_tensor(node):
            continue
        if node.op != "placeholder" and (is_passthrough(node, modules) or _is_activation(node, modules)):
            continue
        end = node
        while len(end.users) == 1 and _is_activation(next(iter(end.users)), modules):
            end = next(iter(end.users))
        if end in outputs and not quantize_output:
            continue
        name = f"act_quant_{len(names)}"
        gm.add_submodule(name, make_quantizer(end.name))
        with gm.graph.inserting_after(end):
            q = gm.graph.call_module(name, (end,))
        end.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        names.append(name)
    gm.graph.lint()
    gm.recompile()
    return names


def _flatten_args(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out.extend(_flatten_args(a))
        elif isinstance(a, dict):
            out.extend(_flatten_args(list(a.values())))
        else:
            out.append(a)
    return out


def quantizable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Conv/linear layers to quantize (not inside an ``exclude`` name), in model order. ``model`` is the
    folded copy :func:`netslim.quant.prepare` makes (a folded BatchNorm is gone from it), so the names are
    checked against the user's model there, not here."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS) and not covers(exclude, n)}


def warn_unsupported(model: nn.Module) -> list[str]:
    """Layers with weights that stay in float (a BatchNorm not after a conv, LayerNorm, ConvTranspose...)."""
    found = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
             if isinstance(m, WEIGHTED_UNSUPPORTED) and not parametrize.is_parametrized(m)]
    if found:
        warnings.warn(f"left in float (layer type not quantized): {', '.join(found)}", stacklevel=3)
    return found


def per_layer_fallback(model: nn.Module, make_quantizer, exclude: tuple[str, ...] = ()) -> list[str]:
    """For models fx cannot trace: a quantizer in front of each conv/linear layer (a forward pre-hook
    would patch forward; a Sequential keeps the model an ordinary module)."""
    names = []
    for name, layer in quantizable_layers(model, exclude).items():
        replace_module_(model, name, nn.Sequential(make_quantizer(name), layer))
        names.append(f"{name}.0")
    return names
