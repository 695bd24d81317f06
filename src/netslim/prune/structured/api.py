"""``netslim.prune.structured``: one call from a trained model to a physically smaller one."""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ...deprecation import renamed_argument
from ...errors import NetslimError, unknown_choice
from ...layers import check_layer_names, covers
from ...outputs import shape_mismatch
from ...surgery import bake_parametrizations_, safe_deepcopy
from ...targets import METRICS, Target, bisect, check_scope, measure, parse_target
from .apply import remove_groups_
from .criteria import CRITERIA, group_scores
from .graph import DependencyGraph, trace
from .rounding import STEPS, RoundingTrial, choose_step, rounded_removal
from .select import LayerGroup, layer_groups, select

log = logging.getLogger("netslim.prune.structured")

TARGET_METRICS = METRICS  # macs, params, size (stored bytes), latency (measured at example_input's batch size)


def _fix_excluded(model: nn.Module, graph: DependencyGraph, exclude: Iterable[str]) -> None:
    for pattern in check_layer_names(model, exclude, "exclude"):
        inside = [s for s in graph.slices if covers((pattern,), s.module)]
        producing = [s for s in inside if s.role == "out"] or inside  # keep what the layer outputs
        for s in producing:
            graph.uf.fix(s.labels[s.labels > 0])


def _warn_unprunable(graph: DependencyGraph) -> None:
    reasons = [r for r in graph.fixed_reasons if r != "model output"]
    if reasons:
        log.warning("channels kept unpruned (cannot be removed safely): %s", "; ".join(reasons))


def _prune_copy(model, graph, remove):
    pruned = safe_deepcopy(model)
    return remove_groups_(pruned, graph, remove)


def ratio_for_target(model, example_input, graph, lgs, scores, target: Target, scope, round_to, min_keep):
    """The smallest channel ratio (and the groups it removes) whose pruned copy meets ``target``."""
    steps = 8 if target.metric == "latency" else 12

    def value(ratio: float):
        remove = select(lgs, scores, ratio, scope, round_to, min_keep)
        return measure(_prune_copy(model, graph, remove), example_input, target.metric, warmup=2, repeats=10), remove

    goal = target.goal(measure(model, example_input, target.metric, warmup=2, repeats=10))
    found = bisect(value, 0.0, 0.99, goal, increasing=False, steps=steps)
    if found is None:
        raise NetslimError(f"cannot reach {target.factor:g}x fewer {target.metric} by removing channels "
                           f"(scope {scope!r}, min_keep {min_keep}); try scope 'global' or a smaller target")
    log.info("target %s -> channel ratio %.3f", target, found.knob)
    return found.knob, found.result


def _check_round_to(round_to: int | str) -> bool:
    """True for ``"measured"``; an int >= 1 passes; anything else is one clear error."""
    if round_to == "measured":
        return True
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise NetslimError(f"round_to must be an integer >= 1 or 'measured', got {round_to!r}")
    return False


def _round_measured(model, example_input, graph, lgs, scores, scope, min_keep, ratio, ratios, target,
                    latency_device, rounding) -> set[int]:
    """The groups to remove under the rounding step that runs fastest on ``latency_device`` (:mod:`.rounding`):
    the unrounded selection for ``target`` (or ``ratio``), then each step's rounding of it (moved back within a
    MAC target), each model pruned and timed whole; ``rounding`` gets the trials."""
    from ...search.cost import Device, measure_ms, parse_device

    if latency_device is None:
        latency_device = Device("torch-cpu", 1, int(example_input.shape[0]))
    device = latency_device if isinstance(latency_device, Device) else parse_device(str(latency_device))
    if target is None:
        knob, plain = ratio, select(lgs, scores, ratio, scope, 1, min_keep, ratios)
    else:
        knob, plain = ratio_for_target(model, example_input, graph, lgs, scores, target, scope, 1, min_keep)
    goal = None
    if target is not None and target.metric == "macs":
        goal = int(target.goal(measure(model, example_input, "macs")))

    def macs_of(remove: set[int]) -> int:
        return int(measure(_prune_copy(model, graph, remove), example_input, "macs"))

    trials, removals = [], {}
    for m in STEPS:
        remove = plain if m == 1 else rounded_removal(lgs, scores, plain, m, macs_of, goal)
        pruned = _prune_copy(model, graph, remove)
        ms = measure_ms(device, pruned, example_input, repeats=10, rounds=3)
        trials.append(RoundingTrial(m, round(knob, 4), int(measure(pruned, example_input, "macs")), ms))
        removals[m] = remove
    pick = choose_step(trials)
    if rounding is not None:
        rounding.extend(trials)
    return removals[pick.step]


def structured(model: nn.Module, example_input: torch.Tensor, ratio: float = 0.5, criterion: str = "l1", *,
               scope: str = "uniform", target: str | dict | None = None, round_to: int | str = 1,
               exclude: Iterable[str] = (), calib_data=None, min_keep: float = 0.1, seed: int = 0,
               inplace: bool = False, graph: DependencyGraph | None = None, calib_batches: int = 8,
               data=None, ratios: dict[str, float] | None = None, latency_device=None,
               rounding: list | None = None, refit_images: int = 0, refit_mode: str = "local") -> nn.Module:
    """Remove whole channels from ``model`` and return a physically smaller, dense model.

    ``ratio``: fraction of each layer's channels to remove (``scope="uniform"``), or of all
    channels ranked together (``scope="global"``, keeping at least ``min_keep`` of each layer).
    ``target``: instead of a ratio, a reduction such as ``"macs:2"``, ``"params:3"`` or
    ``"latency:1.5"`` (measured at ``example_input``'s batch size) reached by bisection.
    ``ratios``: per-layer ratios overriding ``ratio`` (``{"layer1.0.conv1": 0.5}``; a layer's entry sets the
    ratio of the channels it produces and of every layer coupled to them; a name covers its submodules).
    ``criterion``: one of :data:`CRITERIA` (``taylor`` needs ``calib_data``, batches of (inputs, targets),
    of which it reads ``calib_batches``; ``data=`` is its deprecated name). ``round_to``: kept channel
    counts become multiples of it; ``"measured"``: kept counts are rounded to multiples of 1, 4, 8 or 16
    (a multiple at most half a layer's channels), whichever runs fastest on ``latency_device`` (a
    :class:`netslim.search.cost.Device` or its name, default ``torch-cpu`` with 1 thread at ``example_input``'s
    batch size), each candidate moved back within a MAC ``target`` and timed whole (:mod:`.rounding`); the
    trials are appended to the list ``rounding`` when one is given. ``refit_images`` > 0: every dense layer
    that lost input channels is re-solved by least squares to reproduce the unpruned model's outputs on that
    many images of ``calib_data`` (He et al. 2017; :mod:`.refit`), ``refit_mode`` ``local`` (each layer on the
    original model's inputs, one forward pass), ``sequential`` or ``one_pass`` (on the pruned model's
    inputs, layer after layer or all at once). ``exclude``: layers whose output channels
    stay (their inputs may shrink; a name covers its submodules). ``inplace``: prune ``model`` itself instead of a copy.
    The output is unchanged in structure and shape - every tensor of a tuple, list or dict output (a
    segmentation model's ``{"out", "aux"}``) is checked; channels that cannot be removed safely are kept
    with a warning.
    """
    if criterion not in CRITERIA:
        raise unknown_choice("criterion", criterion, CRITERIA)
    scope = check_scope(scope)
    calib_data = renamed_argument(calib_data, data, "data", "calib_data", "structured")
    from .refit import check_refit, refit_pruned_  # refit -> soft -> api: imported here

    check_refit(refit_images, refit_mode, calib_data)
    parsed = parse_target(target, TARGET_METRICS, "target")
    work = model if inplace else safe_deepcopy(model)
    bake_parametrizations_(work)
    graph = graph or trace(work, example_input)
    _fix_excluded(work, graph, exclude)
    _warn_unprunable(graph)
    lgs: list[LayerGroup] = layer_groups(graph)
    scores = group_scores(criterion, work, graph, calib_data=calib_data, calib_batches=calib_batches, seed=seed,
                          device=next(work.parameters()).device)
    check_layer_names(work, ratios or {}, "ratios")
    measured = _check_round_to(round_to)
    if measured:
        remove = _round_measured(work, example_input, graph, lgs, scores, scope, min_keep, ratio, ratios, parsed,
                                 latency_device, rounding)
    elif parsed is None:
        remove = select(lgs, scores, ratio, scope, round_to, min_keep, ratios)
    else:
        _, remove = ratio_for_target(work, example_input, graph, lgs, scores, parsed, scope, round_to, min_keep)
    with torch.no_grad():
        reference = work.eval()(example_input)
    if refit_images:
        errors = refit_pruned_(work, graph, remove, calib_data, refit_images, refit_mode, seed)
        log.info("refit %d layers after pruning: mean relative output error %.4f", len(errors),
                 sum(after for _, after in errors.values()) / max(1, len(errors)))
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
