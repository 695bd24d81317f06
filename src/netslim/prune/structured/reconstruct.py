"""Channel pruning by feature-map reconstruction, without fine-tuning.

He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017: for a
layer ``W`` reading channels ``c`` of input ``X``, pick the channels to keep by LASSO on
per-channel coefficients ``beta`` (min ||Y - sum_c beta_c X_c W_c^T||^2 + lambda |beta|_1, lambda
raised until only the wanted number is non-zero), then refit ``W`` on the kept channels by least
squares so the layer reproduces the *original* model's output ``Y``. Layers are done in order, each
seeing the inputs of the already-pruned model, so errors do not accumulate.

Only channels read by a single dense convolution or linear layer can be reconstructed this way
(as in the paper, which prunes the first layer of each residual block and leaves the residual
streams); other channel groups are kept.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ...data import image_batch
from ...deprecation import renamed_argument
from ...errors import NetslimError
from ...surgery import bake_parametrizations_, safe_deepcopy
from ...targets import Target, bisect, measure, parse_target
from .api import TARGET_METRICS
from .apply import remove_groups_
from .graph import DependencyGraph, trace
from .select import LayerGroup, layer_groups
from .soft import zero_groups_

log = logging.getLogger("netslim.prune.structured")


def _single_consumer(graph: DependencyGraph, lg: LayerGroup, modules: dict[str, nn.Module]) -> str | None:
    groups = graph.groups()
    consumers = {graph.slices[si].module for r in lg.roots for si, _ in groups[r] if graph.slices[si].role == "in"}
    if len(consumers) != 1:
        return None
    name = next(iter(consumers))
    m = modules[name]
    if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
        return name
    return None


def _patches(layer: nn.Module, x: torch.Tensor, positions: int, gen: torch.Generator) -> torch.Tensor:
    """(samples, in_channels, kernel elements): input patches at random output positions."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # N, C*k*k, L
    n, _, length = cols.shape
    idx = torch.randint(0, length, (n, min(positions, length)), generator=gen)
    picked = torch.gather(cols, 2, idx.unsqueeze(1).expand(-1, cols.shape[1], -1))
    return picked.permute(0, 2, 1).reshape(-1, layer.in_channels, cols.shape[1] // layer.in_channels)


def _layer_inputs(model: nn.Module, name: str, images: torch.Tensor, positions: int, seed: int) -> torch.Tensor:
    layer = model.get_submodule(name)
    got = []
    gen = torch.Generator().manual_seed(seed)
    handle = layer.register_forward_pre_hook(lambda m, inp: got.append(_patches(m, inp[0].detach(), positions, gen)))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
    return torch.cat(got)


def _lasso_keep(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, keep: int, iters: int = 300) -> torch.Tensor:
    """Channels kept by the LASSO of He 2017 (proximal gradient, lambda bisected to ``keep`` non-zeros)."""
    channels = x.shape[1]
    gram = torch.zeros(channels, channels, dtype=torch.float64)
    target = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, x.shape[0], 64):  # Z[s, o, c]: channel c's share of output o at sample s
        z = torch.einsum("sck,ock->soc", x[start:start + 64], w).reshape(-1, channels).double()
        gram += z.T @ z
        target += z.T @ y[start:start + 64].reshape(-1).double()
    step = 1.0 / float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))

    def solve(lam: float) -> torch.Tensor:
        beta = torch.ones(channels, dtype=torch.float64)
        for _ in range(iters):
            beta = beta - step * (gram @ beta - target)
            beta = torch.sign(beta) * torch.clamp(beta.abs() - step * lam, min=0)
        return beta

    def nonzeros(lam: float):
        beta = solve(lam)
        return int((beta != 0).sum()), beta

    hi = float(target.abs().max()) * 2 + 1e-12  # every beta is zero at this lambda
    found = bisect(nonzeros, 0.0, hi, keep, increasing=False, steps=30, exact=True)
    beta = found.result if found is not None else solve(hi)
    order = torch.argsort(beta.abs(), descending=True)
    return torch.sort(order[:keep]).values


def _refit(x: torch.Tensor, y: torch.Tensor, in_channels: int, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares weights (out, channels*k) mapping kept-channel patches to the original outputs."""
    a = x.reshape(x.shape[0], -1).double()
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, a.T @ y.double()).T.float()


def _reconstruct_layer(model, original, graph, lg, consumer, images, keep, positions, seed) -> set[int]:
    """Choose the kept groups of ``lg`` and refit ``consumer``; zero the dropped groups. Returns them."""
    layer = model.get_submodule(consumer)
    x_now = _layer_inputs(model, consumer, images, positions, seed)
    x_orig = _layer_inputs(original, consumer, images, positions, seed)
    w = original.get_submodule(consumer).weight.detach().reshape(layer.weight.shape[0], layer.weight.shape[1], -1)
    y = torch.einsum("sck,ock->so", x_orig, w)
    slice_of = next(s for s in graph.slices if s.module == consumer and s.role == "in")
    roots = graph.roots(slice_of.labels).tolist()
    kept_channels = _lasso_keep(x_now, w, y, keep)
    kept_roots = {roots[c] for c in kept_channels.tolist()}
    dropped = set(lg.roots) - kept_roots
    kept_channels = torch.tensor([c for c, r in enumerate(roots) if r in kept_roots])
    new_w = _refit(x_now[:, kept_channels], y, len(kept_channels))
    with torch.no_grad():
        full = torch.zeros_like(w)
        full[:, kept_channels] = new_w.reshape(w.shape[0], len(kept_channels), -1)
        layer.weight.copy_(full.reshape(layer.weight.shape))
    zero_groups_(model, graph, dropped)
    return dropped


def reconstruct_prune(model: nn.Module, example_input: torch.Tensor, calib_data=None, ratio: float = 0.5,
                      target: str | dict | None = None, positions: int = 10, seed: int = 0, *,
                      calib_images: int = 256, images: torch.Tensor | None = None) -> nn.Module:
    """Prune the channels read by single layers with LASSO selection and least-squares refit (He 2017);
    returns a new model.

    ``calib_data``: a batch of a few hundred training images (no labels needed), or a Dataset / DataLoader
    to take ``calib_images`` of (:func:`netslim.data.image_batch`, seeded by ``seed``). ``target`` (e.g.
    ``"macs:2"``) picks the ratio of the reconstructable layers by bisection on the formula MACs.
    ``images=`` is the deprecated name of ``calib_data``.
    """
    calib_data = renamed_argument(calib_data, images, "images", "calib_data", "reconstruct_prune")
    if calib_data is None:
        raise NetslimError("reconstruct_prune needs calib_data: a few hundred images")
    images = calib_data if isinstance(calib_data, torch.Tensor) else image_batch(calib_data, calib_images, seed)
    work = bake_parametrizations_(safe_deepcopy(model)).eval()
    original = safe_deepcopy(work)
    graph = trace(work, example_input)
    modules = dict(work.named_modules())
    plan = [(lg, c) for lg in layer_groups(graph) if (c := _single_consumer(graph, lg, modules)) is not None]
    if not plan:
        raise NetslimError("no channel group is read by a single dense layer: nothing to reconstruct")
    parsed = parse_target(target, TARGET_METRICS)
    if parsed is not None:
        ratio = _ratio_meeting(work, example_input, graph, plan, parsed)
    order = {name: i for i, name in enumerate(modules)}
    dropped: set[int] = set()
    for lg, consumer in sorted(plan, key=lambda p: order[p[1]]):
        keep = max(1, round(len(lg.roots) * (1 - ratio)))
        if keep < len(lg.roots):
            dropped |= _reconstruct_layer(work, original, graph, lg, consumer, images, keep, positions, seed)
    log.info("reconstruction: %d channel groups removed from %d layers (ratio %.3f)", len(dropped), len(plan), ratio)
    return remove_groups_(work, graph, dropped)


def _ratio_meeting(model, example_input, graph, plan, target: Target) -> float:
    """The smallest ratio of the reconstructable groups whose removal meets ``target``."""
    def value(ratio: float) -> float:
        remove = set()
        for lg, _ in plan:
            keep = max(1, round(len(lg.roots) * (1 - ratio)))
            remove |= set(lg.roots[: len(lg.roots) - keep])
        return measure(remove_groups_(safe_deepcopy(model), graph, remove), example_input, target.metric,
                       warmup=2, repeats=10)

    goal = target.goal(measure(model, example_input, target.metric, warmup=2, repeats=10))
    found = bisect(value, 0.0, 0.99, goal, increasing=False, steps=12)
    if found is None:
        raise NetslimError(f"reconstruction cannot reach {target.factor:g}x fewer {target.metric}: only channels "
                           "read by a single layer are pruned; choose a smaller target")
    return found.knob
