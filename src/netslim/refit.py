"""Data-aware refit of replaced layers, shared by every family that swaps a layer for a cheaper block:
asymmetric reconstruction (Zhang, Zou, He & Sun 2016, "Accelerating Very Deep Convolutional Networks
for Classification and Detection", Sec. 3.3).

A replacement initialised from the layer's *weights* is the best fit of the weights; what matters is
the layer's *outputs* on real data, and in a deep network each replaced layer also receives the errors
of the ones before it. So, layer by layer in forward order, the *heads* of every replaced block (its
last linear convolutions or linear layers) are refit by linear least squares: their inputs come from
the *replaced* model, their targets are the *original* layer's outputs on the original model's inputs.
Earlier errors are thereby compensated, not accumulated.

A head is ``(module, mix)``: the block's output (without biases) is ``sum(head_output @ mix)`` over its
heads, ``mix`` a (head channels x layer channels) matrix (``None``: the identity), such as a channel
selection (branches concatenated) or ``[I, -I]`` (a channel and its negation). Grouped convolutions are
solved group by group. Low-rank factorization (the last factor) and compact filters use it.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

log = logging.getLogger("netslim.refit")

Head = tuple[nn.Module, "torch.Tensor | None"]
REFIT_MODES = ("sequential", "one_pass")  # refit_heads_(sequential=True / False)


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once the wanted input is captured."""


def working_copies(model: nn.Module, device: torch.device, *, inplace: bool,
                   keep_reference: bool) -> tuple[nn.Module, nn.Module | None]:
    """The model to transform on ``device`` (``model`` itself when ``inplace``, else a copy) and, when a refit
    will follow (``keep_reference``), the untouched original it refits towards (a copy unless ``model`` stays
    unchanged and already lives on ``device``)."""
    import copy

    reference = None
    if keep_reference:
        param = next(model.parameters(), None)
        on_device = param is not None and param.device == device
        reference = copy.deepcopy(model) if inplace or not on_device else model
    work = (model if inplace else copy.deepcopy(model)).to(device)
    return work, reference


def _forward_until_captured(model: nn.Module, images: torch.Tensor, handle) -> None:
    try:
        with torch.no_grad():
            model.eval()(images)
    except _Captured:
        pass
    finally:
        handle.remove()


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, features, positions): what ``layer`` multiplies by its weight at each output position."""
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2) if x.dim() > 2 else x[:, :, None]
    return F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)


def _outputs(y: torch.Tensor) -> torch.Tensor:
    """(N, channels, positions) of a layer's output."""
    if y.dim() == 2:
        return y[:, :, None]
    if y.dim() == 4:
        return y.flatten(2)
    return y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 2)


def _pick(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows (samples, features) of ``t`` (N, features, positions) at positions ``idx`` (N, P)."""
    return torch.gather(t, 2, idx[:, None, :].expand(-1, t.shape[1], -1)).permute(0, 2, 1).reshape(-1, t.shape[1])


def original_target(original: nn.Module, name: str, images: torch.Tensor, positions: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled output positions (N, P) of the original layer ``name`` and its outputs there, bias removed;
    the forward stops at that layer, so memory holds one layer's targets at a time."""
    got = []

    def fn(module, _inp, out):
        y = _outputs(out.detach())
        if getattr(module, "bias", None) is not None:
            y = y - module.bias.detach()[None, :, None]
        idx = torch.randint(0, y.shape[2], (y.shape[0], min(positions, y.shape[2])), generator=gen).to(y.device)
        got.append((idx, _pick(y, idx).double()))
        raise _Captured

    _forward_until_captured(original, images, original.get_submodule(name).register_forward_hook(fn))
    return got[0]


def original_targets(original: nn.Module, names: list[str], images: torch.Tensor, positions: int,
                     gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`original_target` of every layer in ``names`` from one forward pass of ``original`` (positions
    drawn in forward order); only the sampled positions are kept, so memory stays small."""
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(module, _inp, out):
            if name in got:  # a module called twice (shared weights) keeps its first call, as original_target
                return
            y = _outputs(out.detach())
            if getattr(module, "bias", None) is not None:
                y = y - module.bias.detach()[None, :, None]
            idx = torch.randint(0, y.shape[2], (y.shape[0], min(positions, y.shape[2])), generator=gen).to(y.device)
            got[name] = (idx, _pick(y, idx).double())
        return fn

    handles = [original.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            original.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return got


def current_inputs(model: nn.Module, head: nn.Module, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Inputs of ``head`` in ``model`` at the sampled output positions; the forward stops there."""
    got = []

    def fn(module, inp):
        got.append(_pick(_columns(module, inp[0].detach()), idx).double())
        raise _Captured

    _forward_until_captured(model, images, head.register_forward_pre_hook(fn))
    return got[0]


def _not_reached(name: str) -> Exception:
    from .errors import NetslimError

    return NetslimError(f"refit: layer {name!r} is not reached by the forward pass of the original model")


def least_squares(a: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """W (outputs, features) minimising ``||a W^T - y||^2 + ridge * mean(diag(a^T a)) ||W||^2``; ``a`` (S, f)
    and ``y`` (S, o), or batched over groups: (G, S, f) and (G, S, o) -> (G, o, f)."""
    gram = a.transpose(-1, -2) @ a
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    gram = gram + ridge * scale[..., None, None] * eye
    return torch.linalg.solve(gram, a.transpose(-1, -2) @ y).transpose(-1, -2)


def _groups(head: nn.Module) -> int:
    return head.groups if isinstance(head, nn.Conv2d) else 1


def _grouped(a: torch.Tensor, groups: int) -> torch.Tensor:
    """(S, G*f) -> (G, S, f)."""
    return a.reshape(a.shape[0], groups, -1).permute(1, 0, 2)


def _apply(a: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """Head outputs (S, O) from features (S, F) and weights (O, F/G), group by group."""
    out = _grouped(a, groups) @ w.reshape(groups, -1, w.shape[-1]).transpose(-1, -2)  # (G, S, O/G)
    return out.permute(1, 0, 2).reshape(a.shape[0], -1)


def all_current_inputs(model: nn.Module, heads: list[tuple[str, nn.Module, torch.Tensor]],
                       images: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Inputs of every ``(layer, head, idx)`` at its sampled positions, from one forward pass of ``model``."""
    got: dict[tuple[str, int], torch.Tensor] = {}

    def hook(key, idx):
        def fn(module, inp):
            if key not in got:
                got[key] = _pick(_columns(module, inp[0].detach()), idx).double()
        return fn

    handles = [head.register_forward_pre_hook(hook((name, i), idx)) for i, (name, head, idx) in enumerate(heads)]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return got


def _solve_layer(heads: list[tuple[nn.Module, torch.Tensor | None, torch.Tensor]], y: torch.Tensor, ridge: float):
    """New weights of one layer's heads (``(head, mix, inputs)``) and its relative error before / after."""
    old, new, solved = 0.0, 0.0, []
    for head, mix, a in heads:
        mix = torch.eye(y.shape[1], dtype=y.dtype) if mix is None else mix.to(y.device, y.dtype)
        g = _groups(head)
        w_old = head.weight.detach().reshape(head.weight.shape[0], -1).double()
        target = y @ torch.linalg.pinv(mix)  # what this head's outputs should be
        w_new = least_squares(_grouped(a, g), _grouped(target, g), ridge).reshape(w_old.shape)
        old = old + _apply(a, w_old, g) @ mix
        new = new + _apply(a, w_new, g) @ mix
        solved.append((head, w_new))
    norm = y.norm().clamp_min(1e-12)
    return solved, float((old - y).norm() / norm), float((new - y).norm() / norm)


def _keep_if_better(solved, before: float, after: float) -> None:
    if after < before:
        with torch.no_grad():
            for head, w_new in solved:
                head.weight.copy_(w_new.reshape(head.weight.shape).to(head.weight.dtype))


def refit_heads_(model: nn.Module, original: nn.Module, images: torch.Tensor, layers: Iterable[str],
                 heads_of: Callable[[nn.Module], list[Head]], positions: int = 16, ridge: float = 1e-4,
                 seed: int = 0, progress: bool = False, sequential: bool = True) -> dict[str, tuple[float, float]]:
    """Refit the heads (``heads_of(block)``) of each replaced layer in ``layers`` (forward order) to the
    original layer's outputs on ``images``; a layer's new weights are kept only when they lower its error.

    ``sequential`` (default): layer by layer, each one's inputs taken after the layers before it were refit
    (Zhang et al.'s asymmetric reconstruction; one partial forward pass per head). ``sequential=False``: every
    layer's inputs from one forward pass of the replaced model before any refit, all layers solved at once -
    far faster on deep models (two passes in all instead of one per layer) and what a search that refits
    every candidate uses; earlier layers' errors are compensated as they were before their own refit.
    Returns ``{layer: (relative output error before, after)}`` on the sampled positions."""
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, tuple[float, float]] = {}
    layers = list(layers)
    targets = original_targets(original, layers, images, positions, gen)  # one pass over the original model
    for name in layers:
        if name not in targets:
            raise _not_reached(name)
    if not sequential:
        heads = [(name, head, targets[name][0]) for name in layers for head, _ in heads_of(model.get_submodule(name))]
        inputs = all_current_inputs(model, heads, images)
        flat = iter(range(len(heads)))
        for name in layers:
            parts = [(head, mix, inputs[(name, next(flat))]) for head, mix in heads_of(model.get_submodule(name))]
            solved, before, after = _solve_layer(parts, targets[name][1], ridge)
            _keep_if_better(solved, before, after)
            errors[name] = (before, min(before, after))
        return errors
    for name in tqdm(layers, desc="refit", disable=not progress, leave=False):
        idx, y = targets[name]
        parts = [(head, mix, current_inputs(model, head, images, idx)) for head, mix in heads_of(model.get_submodule(name))]
        solved, before, after = _solve_layer(parts, y, ridge)
        _keep_if_better(solved, before, after)
        errors[name] = (before, min(before, after))
        log.info("refit %s: relative output error %.4f -> %.4f", name, before, min(before, after))
    return errors


__all__ = ["REFIT_MODES", "Head", "refit_heads_", "least_squares", "original_target", "original_targets", "current_inputs"]
