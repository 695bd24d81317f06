"""Data-free quantization: cross-layer equalization, high-bias absorption and bias correction.

Nagel, van Baalen, Blankevoort & Welling 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction" (ICCV). Everything here works on FLOAT models whose BatchNorms are already folded into
the preceding conv: an unfolded BatchNorm between two layers breaks their chain (it is not skipped).

* §4.1 cross-layer equalization: for ``y = W2 f(W1 x + b1) + b2`` with a positive-homogeneous ``f``
  (ReLU, or nothing), ``f(S^-1 z) = S^-1 f(z)`` for a positive diagonal ``S``, so scaling output channel
  ``i`` of ``W1`` (and ``b1``) by ``1/s_i`` and input channel ``i`` of ``W2`` by ``s_i`` keeps the function;
  ``s_i = sqrt(r1_i r2_i) / r2_i`` makes both channel ranges ``sqrt(r1_i r2_i)``.
* §4.1.1 absorbing high biases into the next layer.
* §4.2 bias correction: the quantized layer's expected output error ``E[eps x] = eps E[x]`` is
  subtracted from its bias, with ``E[x]`` from the previous layer's (clipped-)normal pre-activations.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NetslimError
from ..surgery import replace_module_

Layer = nn.Conv2d | nn.Linear
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


def is_depthwise(m: nn.Module) -> bool:
    """A Conv2d with ``groups == in_channels == out_channels``: one filter per channel."""
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels


@dataclass(frozen=True)
class _Chain:
    layers: tuple[str, ...]
    relu6: tuple[str, ...]  # names of the nn.ReLU6 modules between its layers


def _compatible(first: nn.Module, second: nn.Module) -> bool:
    """``second`` reads ``first``'s output channels as its own input channels."""
    if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
        return first.out_features == second.in_features
    if isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d):
        return first.out_channels == second.in_channels and (second.groups == 1 or is_depthwise(second))
    return False  # conv -> linear needs a flatten (or pooling) in between; never a chain


def _next_layer(node: torch.fx.Node, modules: dict[str, nn.Module], calls: Counter,
                through_relu6: bool) -> tuple[torch.fx.Node | None, list[str]]:
    """The layer node that alone consumes ``node``'s output through ReLUs/Identities (and ReLU6s)."""
    relu6, cur = [], node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if not nxt.args or nxt.args[0] is not cur:
            break
        if nxt.op == "call_module":
            m = modules[nxt.target]
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return (nxt, relu6) if calls[nxt.target] == 1 and len(nxt.args) == 1 else (None, [])
            if isinstance(m, nn.ReLU6) and through_relu6 and calls[nxt.target] == 1:
                relu6.append(nxt.target)
            elif not isinstance(m, (nn.ReLU, nn.Identity)):
                break
        elif not ((nxt.op == "call_function" and nxt.target in _RELU_FUNCTIONS)
                  or (nxt.op == "call_method" and nxt.target in ("relu", "relu_"))):
            break
        cur = nxt
    return None, []


def _find_chains(model: nn.Module, through_relu6: bool) -> list[_Chain]:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001  (fx raises many kinds of errors on untraceable code)
        warnings.warn(f"cross-layer equalization: torch.fx cannot trace {type(model).__name__} ({exc}); "
                      "no layer chains found", stacklevel=3)
        return []
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    chains = []
    for node in graph.nodes:
        if (node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear))
                or calls[node.target] != 1):
            continue
        second, relu6 = _next_layer(node, modules, calls, through_relu6)
        if second is None or not _compatible(modules[node.target], modules[second.target]):
            continue
        names = [node.target, second.target]
        if is_depthwise(modules[second.target]):
            third, more = _next_layer(second, modules, calls, through_relu6)
            if third is not None and _compatible(modules[second.target], modules[third.target]):
                names.append(third.target)
                relu6 = relu6 + more
        chains.append(_Chain(tuple(names), tuple(relu6)))
    middles = {c.layers[1] for c in chains if len(c.layers) == 3}
    return [c for c in chains if c.layers[0] not in middles]


def equalization_pairs(model: nn.Module, *, through_relu6: bool = False) -> list[tuple[str, ...]]:
    """Chains of layer names for cross-layer equalization (Nagel et al. 2019 §4.1).

    A chain is a Conv2d/Linear, optionally a depthwise conv, then a Conv2d/Linear, joined only by ReLUs
    (modules or functions), ``nn.Identity`` or nothing, where each intermediate output feeds only the next
    node of the chain. Both ends have the same type (a flatten or pooling between a conv and a linear
    breaks the chain); the second layer is a plain (groups=1) or depthwise conv. ``through_relu6`` also
    lets ``nn.ReLU6`` modules join a chain (it is not positive-homogeneous: see :func:`cross_layer_equalize_`).
    Found with ``torch.fx.symbolic_trace``; a model fx cannot trace gives ``[]`` and a warning.
    """
    return [c.layers for c in _find_chains(model, through_relu6)]


def _out_ranges(m: Layer) -> Tensor:
    return m.weight.detach().abs().flatten(1).amax(1)


def _in_ranges(m: Layer) -> Tensor:
    w = m.weight.detach().abs()
    return w.flatten(1).amax(1) if is_depthwise(m) else w.transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def equalize_pair_(first: Layer, second: Layer) -> Tensor:
    """One equalization step (§4.1): divide output channel ``i`` of ``first`` (and its bias) by ``s_i``,
    multiply input channel ``i`` of ``second`` by ``s_i = sqrt(r1_i r2_i) / r2_i``; ranges are per-channel
    max |w|. Channels with a zero range keep ``s_i = 1``. Returns ``s``."""
    r1, r2 = _out_ranges(first), _in_ranges(second)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2)), torch.ones_like(r1))
    first.weight.div_(s.view(-1, *[1] * (first.weight.dim() - 1)))
    if first.bias is not None:
        first.bias.div_(s)
    if is_depthwise(second):
        second.weight.mul_(s.view(-1, 1, 1, 1))
    else:
        second.weight.mul_(s.view(1, -1, *[1] * (second.weight.dim() - 2)))
    return s


def cross_layer_equalize_(model: nn.Module, iterations: int = 20,
                          relu6_to_relu: bool = False) -> list[tuple[str, ...]]:
    """Cross-layer equalization in place (Nagel et al. 2019 §4.1); returns the equalized chains.

    Each chain of :func:`equalization_pairs` is equalized pair by pair (a ``1x1 -> depthwise -> 1x1``
    chain as its two pairs), all chains in turn, ``iterations`` times: a pair settles in one step, and
    chains of three or chains sharing a layer converge over the iterations. The float function is kept.
    BatchNorms must be folded first. ReLU6 is not positive-homogeneous, so by default chains through a
    ReLU6 are left alone; ``relu6_to_relu=True`` equalizes them too and replaces the ReLU6 modules on
    those chains by ReLU, as the paper did for MobileNetV2 -- this changes the function wherever a
    pre-activation exceeded 6 (before and after equalization alike).
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise NetslimError(f"iterations must be a positive integer, got {iterations!r}")
    chains = _find_chains(model, through_relu6=relu6_to_relu)
    for chain in chains:
        for name in chain.relu6:
            replace_module_(model, name, nn.ReLU(inplace=model.get_submodule(name).inplace))
    modules = dict(model.named_modules())
    for _ in range(iterations):
        for chain in chains:
            for a, b in zip(chain.layers, chain.layers[1:]):
                equalize_pair_(modules[a], modules[b])
    return [c.layers for c in chains]


def expected_clipped_output(mean: Tensor, std: Tensor, lo: float = 0.0, hi: float = math.inf) -> Tensor:
    """``E[clamp(z, lo, hi)]`` for ``z ~ N(mean, std^2)`` per channel: the clipped-normal mean of §4.2
    (``lo=0, hi=6`` for ReLU6). ``std == 0`` gives ``clamp(mean, lo, hi)``."""
    mean = torch.as_tensor(mean, dtype=torch.float32)
    std = torch.as_tensor(std, dtype=torch.float32).to(mean.device).clamp_min(0)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    a, b = (lo - mean) / safe, (hi - mean) / safe
    cdf = lambda t: 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))  # noqa: E731
    pdf = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)  # noqa: E731
    cdf_a = cdf(a) if math.isfinite(lo) else torch.zeros_like(mean)
    cdf_b = cdf(b) if math.isfinite(hi) else torch.ones_like(mean)
    out = mean * (cdf_b - cdf_a)  # the mass inside [lo, hi], then the clipped tails and truncation terms
    out = out + (lo * cdf_a + safe * pdf(a) if math.isfinite(lo) else 0.0)
    out = out + (hi * (1.0 - cdf_b) - safe * pdf(b) if math.isfinite(hi) else 0.0)
    return torch.where(std > 0, out, mean.clamp(lo, hi))


def expected_relu_output(mean: Tensor, std: Tensor) -> Tensor:
    """``E[ReLU(z)] = mean * Phi(mean/std) + std * phi(mean/std)`` for ``z ~ N(mean, std^2)`` per channel
    (the clipped-normal expectation of Nagel et al. 2019 §4.2, where mean/std are a folded BatchNorm's
    shift and scale)."""
    return expected_clipped_output(mean, std, 0.0, math.inf)


def _channel_contraction(layer: Layer, weight: Tensor, v: Tensor) -> Tensor:
    """``sum_{c, k} weight[o, c, k] * v[c]`` per output channel ``o``: the layer applied to a constant
    per-channel input without padding (kernel positions summed; groups/depthwise respected)."""
    if isinstance(layer, nn.Linear):
        return weight @ v
    g, out = layer.groups, weight.shape[0]
    w = weight.flatten(2).sum(2).reshape(g, out // g, -1)
    return torch.einsum("goc,gc->go", w, v.reshape(g, -1)).reshape(out)


def _check_layer(layer: nn.Module, what: str) -> None:
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise NetslimError(f"{what} works on nn.Conv2d / nn.Linear, got {type(layer).__name__}")


@torch.no_grad()
def _add_to_bias_(layer: Layer, delta: Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(delta.to(layer.weight.dtype).clone())
    else:
        layer.bias.add_(delta.to(layer.bias.dtype))


@torch.no_grad()
def bias_correction_(layer: Layer, weight_error: Tensor, expected_input: Tensor) -> None:
    """Empirical/analytic bias correction (Nagel et al. 2019 §4.2), in place: ``b -= eps E[x]``.

    ``weight_error = W_quantized - W`` (shaped like ``layer.weight``); ``expected_input`` is ``E[x]`` per
    input channel (e.g. :func:`expected_relu_output` of the previous layer's pre-activation statistics).
    For a conv the error is summed over kernel positions (padding is ignored, so border outputs keep a
    small bias). A layer without a bias gets one.
    """
    _check_layer(layer, "bias correction")
    if tuple(weight_error.shape) != tuple(layer.weight.shape):
        raise NetslimError(f"weight_error has shape {tuple(weight_error.shape)}, the layer's weight "
                           f"{tuple(layer.weight.shape)}")
    ex = torch.as_tensor(expected_input, dtype=weight_error.dtype, device=weight_error.device).flatten()
    n_in = layer.weight.shape[1] * (1 if isinstance(layer, nn.Linear) else layer.groups)
    if ex.numel() != n_in:
        raise NetslimError(f"expected_input has {ex.numel()} entries, the layer {n_in} input channels")
    _add_to_bias_(layer, -_channel_contraction(layer, weight_error, ex))


@torch.no_grad()
def absorb_high_biases_(first: Layer, second: Layer, mean: Tensor, std: Tensor, n_sigma: float = 3.0) -> Tensor:
    """High-bias absorption (Nagel et al. 2019 §4.1.1), in place, for ``first -> ReLU -> second``.

    ``mean``/``std`` are the per-channel statistics of ``first``'s pre-activations (a folded BatchNorm's
    shift and scale). ``c = max(0, mean - n_sigma * std)`` is taken from ``first``'s bias and ``second``'s
    bias gains ``W2 c``: exact whenever the pre-activation stays above ``c`` (for nearly all inputs at
    3 sigma) and ignoring padding. Returns ``c``.
    """
    _check_layer(first, "bias absorption")
    _check_layer(second, "bias absorption")
    if first.bias is None or not _compatible(first, second):
        raise NetslimError("bias absorption needs a first layer with a bias feeding a compatible second layer")
    c = (torch.as_tensor(mean, dtype=torch.float32) - n_sigma * torch.as_tensor(std, dtype=torch.float32))
    c = c.clamp_min(0).to(first.bias).flatten()
    if c.numel() != first.bias.numel():
        raise NetslimError(f"mean/std have {c.numel()} entries, the first layer {first.bias.numel()} outputs")
    first.bias.sub_(c)
    _add_to_bias_(second, _channel_contraction(second, second.weight.detach(), c))
    return c
