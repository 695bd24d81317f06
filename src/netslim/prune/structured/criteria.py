"""Importance of channel groups: which coupled channels matter least.

Every criterion returns ``{group root label: score}``; low scores are pruned first. Scores taken
from several layers of a group are first divided by their layer's mean, so that a group spanning
a residual stream compares fairly with a group inside one block (global ranking needs this).

* ``l1`` / ``l2``: norms of the filters producing the channel (Li et al., "Pruning Filters for
  Efficient ConvNets", ICLR 2017).
* ``slimming``: |gamma| of the channel's BatchNorm (Liu et al., "Learning Efficient Convolutional
  Networks through Network Slimming", ICCV 2017); train with :class:`SlimmingRegularizer` first.
* ``fpgm``: distance of each filter to the others - filters near the geometric median are the
  most replaceable (He et al., "Filter Pruning via Geometric Median", CVPR 2019).
* ``taylor``: (sum over the group of weight x gradient)^2, averaged over batches (Molchanov et al.,
  "Importance Estimation for Neural Network Pruning", CVPR 2019); needs data.
* ``random``: the control every pruning paper needs.
* ``contribution``: the layer contribution score of the seeds - what a channel receives (mean |W|
  of its producing filter) times what it sends on (mean |W| of the consumers' input slices).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import NetslimError
from ...outputs import flatten_outputs
from ...train import TrainHook
from .graph import DependencyGraph

log = logging.getLogger("netslim.prune.structured")

Scores = dict[int, float]
CRITERIA: dict[str, Callable[..., Scores]] = {}


def criterion(name: str):
    def wrap(fn):
        CRITERIA[name] = fn
        return fn
    return wrap


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The tensor as one row per index along ``dim``."""
    return t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1)


def _per_position(model: nn.Module, graph: DependencyGraph, roles: set[str], fn, params: set[str] | None = None):
    """Yield (slice, per-position values normalized by their mean) for slices of the given roles."""
    modules = dict(model.named_modules())
    for s in graph.slices:
        if s.role not in roles or (params is not None and s.param not in params):
            continue
        t = getattr(modules[s.module], s.param)
        if t is None or t.dim() == 0:
            continue
        values = fn(_rows(t, s.dim))
        mean = values.mean()
        yield s, values / mean if mean > 0 else values


def _group_mean(graph: DependencyGraph, pairs) -> Scores:
    total: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    for s, values in pairs:
        for r, v in zip(graph.roots(s.labels).tolist(), values.tolist()):
            total[r] += v
            count[r] += 1
    return {r: total[r] / count[r] for r in total}


def _complete(graph: DependencyGraph, scores: Scores, fallback: Scores) -> Scores:
    groups = graph.groups()
    return {r: scores.get(r, fallback.get(r, 0.0)) for r in groups}


@criterion("l1")
def l1_scores(model: nn.Module, graph: DependencyGraph, **_) -> Scores:
    scores = _group_mean(graph, _per_position(model, graph, {"out"}, lambda rows: rows.abs().sum(1), {"weight"}))
    fallback = _group_mean(graph, _per_position(model, graph, {"in", "norm", "other"}, lambda rows: rows.abs().sum(1)))
    return _complete(graph, scores, fallback)


@criterion("l2")
def l2_scores(model: nn.Module, graph: DependencyGraph, **_) -> Scores:
    scores = _group_mean(graph, _per_position(model, graph, {"out"}, lambda rows: rows.norm(dim=1), {"weight"}))
    fallback = _group_mean(graph, _per_position(model, graph, {"in", "norm", "other"}, lambda rows: rows.norm(dim=1)))
    return _complete(graph, scores, fallback)


@criterion("fpgm")
def fpgm_scores(model: nn.Module, graph: DependencyGraph, **_) -> Scores:
    def distance_to_others(rows: torch.Tensor) -> torch.Tensor:
        return torch.cdist(rows, rows).sum(1)
    scores = _group_mean(graph, _per_position(model, graph, {"out"}, distance_to_others, {"weight"}))
    return _complete(graph, scores, l2_scores(model, graph))


@criterion("slimming")
def slimming_scores(model: nn.Module, graph: DependencyGraph, **_) -> Scores:
    modules = dict(model.named_modules())
    bn_slices = [s for s in graph.slices if s.role == "norm" and s.param == "weight"
                 and isinstance(modules[s.module], nn.modules.batchnorm._BatchNorm)]
    pairs = []
    for s in bn_slices:
        values = getattr(modules[s.module], "weight").detach().abs().float()
        pairs.append((s, values / values.mean() if values.mean() > 0 else values))
    scores = _group_mean(graph, pairs)
    missing = [r for r in graph.groups() if r not in scores]
    if missing:
        log.warning("slimming: %d channel groups have no BatchNorm; they are ranked by L1 norm instead", len(missing))
    return _complete(graph, scores, l1_scores(model, graph))


@criterion("random")
def random_scores(model: nn.Module, graph: DependencyGraph, seed: int = 0, **_) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    roots = sorted(graph.groups())
    return dict(zip(roots, torch.rand(len(roots), generator=gen).tolist()))


@criterion("contribution")
def contribution_scores(model: nn.Module, graph: DependencyGraph, **_) -> Scores:
    received = _group_mean(graph, _per_position(model, graph, {"out"}, lambda rows: rows.abs().mean(1), {"weight"}))
    sent = _group_mean(graph, _per_position(model, graph, {"in"}, lambda rows: rows.abs().mean(1), {"weight"}))
    return {r: received.get(r, 1.0) * sent.get(r, 1.0) for r in graph.groups()}


@criterion("taylor")
def taylor_scores(model: nn.Module, graph: DependencyGraph, calib_data: Iterable | None = None,
                  calib_batches: int = 8, device: str | torch.device | None = None, **_) -> Scores:
    if calib_data is None:
        raise NetslimError("criterion 'taylor' needs data: pass calib_data=<a DataLoader of (inputs, targets)>")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    modules = dict(model.named_modules())
    totals: dict[int, float] = defaultdict(float)
    was_training = model.training
    model.to(device).eval()
    seen = 0
    for inputs, targets in calib_data:
        if seen >= calib_batches:
            break
        model.zero_grad(set_to_none=True)
        logits = flatten_outputs(model(inputs.to(device)))[0]  # a segmentation model's "out": per-pixel classes
        F.cross_entropy(logits, targets.to(device)).backward()
        per_group: dict[int, float] = defaultdict(float)
        for s in graph.slices:
            t = getattr(modules[s.module], s.param)
            if not isinstance(t, nn.Parameter) or t.grad is None:
                continue
            contrib = _rows(t * t.grad, s.dim).sum(1)
            for r, v in zip(graph.roots(s.labels).tolist(), contrib.tolist()):
                per_group[r] += v
        for r, v in per_group.items():
            totals[r] += v * v
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if seen == 0:
        raise NetslimError("criterion 'taylor': the data gave no batches")
    return {r: totals.get(r, 0.0) / seen for r in graph.groups()}


def group_scores(name: str, model: nn.Module, graph: DependencyGraph, **kwargs) -> Scores:
    """Scores of every prunable group by criterion ``name`` (see :data:`CRITERIA`)."""
    if name not in CRITERIA:
        from ...errors import unknown_choice
        raise unknown_choice("criterion", name, CRITERIA)
    return CRITERIA[name](model, graph, **kwargs)


class SlimmingRegularizer(TrainHook):
    """L1 penalty ``lam * sum |gamma|`` on BatchNorm scales, the sparsity training of Network Slimming (Liu 2017)."""

    def __init__(self, lam: float = 1e-4) -> None:
        self.lam = lam

    def loss(self, model, inputs, targets, outputs, loss):
        penalty = sum(m.weight.abs().sum() for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None)
        return loss + self.lam * penalty
