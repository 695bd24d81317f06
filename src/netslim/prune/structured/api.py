"""``netslim.prune.structured``: one call from a trained model to a physically smaller one."""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ...errors import NetslimError, unknown_choice
from ...outputs import shape_mismatch
from ...surgery import bake_parametrizations_, safe_deepcopy
from .apply import remove_groups_
from .criteria import CRITERIA, group_scores
from .graph import DependencyGraph, trace
from .select import LayerGroup, layer_groups, select

log = logging.getLogger("netslim.prune.structured")

TARGET_METRICS = ("macs", "params", "latency")


def parse_target(target: str | dict | None) -> tuple[str, float] | None:
    """``"macs:2"`` or ``{"macs": 2}`` -> ("macs", 2.0): the model should get 2x smaller in that metric."""
    if target is None:
        return None
    if isinstance(target, str):
        metric, sep, value = target.partition(":")
        if not sep:
            raise NetslimError(f"target {target!r} must look like 'macs:2' (metrics: {', '.join(TARGET_METRICS)})")
        target = {metric: value}
    if not isinstance(target, dict) or len(target) != 1:
        raise NetslimError(f"target must name one metric, e.g. {{'macs': 2}}; got {target!r}")
    (metric, value), = target.items()
    if metric not in TARGET_METRICS:
        raise unknown_choice("target metric", metric, TARGET_METRICS)
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise NetslimError(f"target {metric}: {value!r} is not a number") from None
    if not factor > 1.0:
        raise NetslimError(f"target {metric} reduction must be > 1 (e.g. 2 for 2x fewer), got {factor}")
    return metric, factor


def _fix_excluded(model: nn.Module, graph: DependencyGraph, exclude: Iterable[str]) -> None:
    names = dict(model.named_modules())
    for pattern in exclude:
        if pattern not in names:
            valid = [n for n in names if n]
            shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
            raise NetslimError(f"exclude: no layer named {pattern!r}; layers: {shown}")
        inside = [s for s in graph.slices if s.module == pattern or s.module.startswith(pattern + ".")]
        producing = [s for s in inside if s.role == "out"] or inside  # keep what the layer outputs
        for s in producing:
            graph.uf.fix(s.labels[s.labels > 0])


def _warn_unprunable(graph: DependencyGraph) -> None:
    reasons = [r for r in graph.fixed_reasons if r != "model output"]
    if reasons:
        log.warning("channels kept unpruned (cannot be removed safely): %s", "; ".join(reasons))


def measure(model: nn.Module, example_input: torch.Tensor, metric: str) -> float:
    from ...profile import profile
    if metric == "latency":
        return profile(model, example_input, batch_sizes=(example_input.shape[0],), repeats=10, warmup=2
                       ).latency_ms[example_input.shape[0]]
    report = profile(model, example_input, latency=False)
    return float(report.macs if metric == "macs" else report.params)


def _prune_copy(model, graph, remove):
    pruned = safe_deepcopy(model)
    return remove_groups_(pruned, graph, remove)


def _ratio_for_target(model, example_input, graph, lgs, scores, metric, factor, scope, round_to, min_keep):
    dense = measure(model, example_input, metric)
    goal = dense / factor
    lo, hi, best = 0.0, 0.99, None
    for _ in range(12 if metric != "latency" else 8):
        mid = (lo + hi) / 2
        remove = select(lgs, scores, mid, scope, round_to, min_keep)
        value = measure(_prune_copy(model, graph, remove), example_input, metric)
        if value <= goal:
            best, hi = (mid, remove), mid
        else:
            lo = mid
    if best is None:
        raise NetslimError(f"cannot reach {factor:g}x fewer {metric} by removing channels "
                           f"(scope {scope!r}, min_keep {min_keep}); try scope 'global' or a smaller target")
    log.info("target %s %.2fx -> channel ratio %.3f", metric, factor, best[0])
    return best


def structured(model: nn.Module, example_input: torch.Tensor, ratio: float = 0.5, criterion: str = "l1", *,
               scope: str = "uniform", target: str | dict | None = None, round_to: int = 1,
               exclude: Iterable[str] = (), data=None, min_keep: float = 0.1, seed: int = 0,
               inplace: bool = False, graph: DependencyGraph | None = None) -> nn.Module:
    """Remove whole channels from ``model`` and return a physically smaller, dense model.

    ``ratio``: fraction of each layer's channels to remove (``scope="uniform"``), or of all
    channels ranked together (``scope="global"``, keeping at least ``min_keep`` of each layer).
    ``target``: instead of a ratio, a reduction such as ``"macs:2"``, ``"params:3"`` or
    ``"latency:1.5"`` (measured at ``example_input``'s batch size) reached by bisection.
    ``criterion``: one of :data:`CRITERIA` (``taylor`` needs ``data``). ``round_to``: kept channel
    counts become multiples of it. ``exclude``: layers whose output channels stay (their inputs may shrink).
    The output is unchanged in structure and shape - every tensor of a tuple, list or dict output (a
    segmentation model's ``{"out", "aux"}``) is checked; channels that cannot be removed safely are kept
    with a warning.
    """
    if criterion not in CRITERIA:
        raise unknown_choice("criterion", criterion, CRITERIA)
    parsed = parse_target(target)
    work = model if inplace else safe_deepcopy(model)
    bake_parametrizations_(work)
    graph = graph or trace(work, example_input)
    _fix_excluded(work, graph, exclude)
    _warn_unprunable(graph)
    lgs: list[LayerGroup] = layer_groups(graph)
    scores = group_scores(criterion, work, graph, data=data, seed=seed,
                          device=next(work.parameters()).device)
    if parsed is None:
        remove = select(lgs, scores, ratio, scope, round_to, min_keep)
    else:
        _, remove = _ratio_for_target(work, example_input, graph, lgs, scores, *parsed, scope, round_to, min_keep)
    with torch.no_grad():
        reference = work.eval()(example_input)
    remove_groups_(work, graph, remove)
    with torch.no_grad():
        try:
            got = work(example_input)
        except RuntimeError as exc:
            raise NetslimError(f"the pruned model does not run ({exc}); please report this model") from None
    mismatch = shape_mismatch(reference, got)
    if mismatch:
        raise NetslimError(f"pruning changed the model's outputs: {mismatch}; please report this model")
    return work
