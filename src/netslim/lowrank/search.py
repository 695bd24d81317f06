"""Per-layer rank search for a whole-model target (greedy on measured sensitivity, the idea of
AIMET's greedy compression-ratio selection).

Every eligible layer is decomposed alone at each candidate fraction of its full rank and the
model's accuracy measured on held-out data; then, starting from the undecomposed model, the
(layer, rank) step that loses the least accuracy per MAC (or parameter) saved is taken until
the model reaches the target reduction.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..deprecation import renamed_argument
from ..errors import NetslimError
from ..surgery import io_shapes
from ..targets import Target, bisect, measure, target_or_reduction
from ..train import evaluate
from .apply import DecompositionReport, LayerPlan, apply_plan_, build, plan_decomposition, spectra
from .ranks import rank_for_energy

log = logging.getLogger("netslim.lowrank")
TARGETS = ("macs", "params", "latency")  # what greedy_rank_search honours (energy_target: macs, params)


def layer_latencies(model: nn.Module, example_input: torch.Tensor, options: dict[str, list[LayerPlan]],
                    batchnorm: bool = False, batch: int = 1) -> dict[tuple[str, int | None], float]:
    """Median ms of each layer alone, ``(name, None)``, and of each candidate decomposition,
    ``(name, id(plan))``, on the layer's input shape at batch ``batch`` (factors from one ALS / HOOI
    iteration: their values do not change the time)."""
    from ..profile import measure_latency

    shapes = io_shapes(model, example_input[:1], (nn.Conv2d, nn.Linear))
    timed: dict[tuple[str, int | None], float] = {}
    for name, plans in options.items():
        layer = model.get_submodule(name)
        x = torch.randn(batch, *shapes[name][0][1:], device=example_input.device)
        timed[(name, None)] = measure_latency(layer, x, (batch,))[batch]
        for plan in plans:
            built = build(layer, plan.method, plan.rank, batchnorm, iters=1)
            timed[(name, id(plan))] = measure_latency(built, x, (batch,))[batch]
    return timed


def greedy_rank_search(model: nn.Module, example_input: torch.Tensor, eval_data: Dataset | None = None,
                       target: str | dict | Target | None = None, method: str = "auto",
                       candidates: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.75),
                       layers: tuple[str, ...] = (), exclude: tuple[str, ...] = (), batchnorm: bool = False,
                       device: str | torch.device | None = None, progress: bool = True,
                       model_cost: float | None = None, latency_batch: int = 1, *, reduction: float | None = None,
                       data: Dataset | None = None) -> tuple[DecompositionReport, dict]:
    """Choose a rank per layer so that the model meets ``target`` (``"macs:2"``, ``"params:3"`` or
    ``"latency:1.5"``), losing the least accuracy on ``eval_data`` (held-out labelled data).

    For ``latency`` every layer and each of its candidate decompositions is timed alone on its input
    shape at batch ``latency_batch`` (on the CPU, or the device of ``example_input``), and the model's
    latency is measured once; the search then spends measured milliseconds instead of formula MACs.
    ``device``: where accuracy is measured (default :func:`netslim.train.default_device`).
    Returns the chosen plan and a sensitivity table ``{layer: {fraction: top1}}``.
    ``reduction=`` with ``target="macs"`` and ``data=`` are deprecated spellings.
    """
    data = renamed_argument(eval_data, data, "data", "eval_data", "greedy_rank_search")
    goal_target = target_or_reduction(target, reduction, TARGETS, "target")
    if goal_target is None:
        raise NetslimError("greedy_rank_search needs target, e.g. 'macs:2'")
    if data is None:
        raise NetslimError("greedy_rank_search needs eval_data: held-out labelled data to measure accuracy on")
    target, reduction = goal_target.metric, goal_target.factor
    options: dict[str, list[LayerPlan]] = {}
    for f in candidates:
        report = plan_decomposition(model, example_input, method, "fixed", f, layers, exclude)
        for name, plan in report.layers.items():
            if plan.skipped is None:
                options.setdefault(name, []).append(plan)
    baseline = evaluate(model, data, device=device)["top1"]
    table: dict[str, dict[float, float]] = {}
    accuracy: dict[tuple[str, int], float] = {}
    total_runs = sum(len(v) for v in options.values())
    bar = tqdm(total=total_runs, desc="rank sensitivity", disable=not progress, leave=False)
    for name, plans in options.items():
        for plan in plans:
            trial = copy.deepcopy(model)
            apply_plan_(trial, DecompositionReport({name: plan}), batchnorm)
            acc = evaluate(trial, data, device=device)["top1"]
            accuracy[(name, id(plan))] = acc
            table.setdefault(name, {})[str(plan.rank)] = acc
            bar.update()
    bar.close()

    timed = layer_latencies(model, example_input, options, batchnorm, latency_batch) if target == "latency" else {}

    def cost(p: LayerPlan, after: bool) -> float:
        if target == "latency":
            return timed[(p.name, id(p))] if after else timed[(p.name, None)]
        c = p.after if after else p.before
        return c.macs if target == "macs" else c.params

    if model_cost is None:
        model_cost = measure(model, example_input, target, latency_batch=latency_batch)
    goal = goal_target.goal(model_cost)
    chosen: dict[str, LayerPlan] = {}
    current = model_cost
    while current > goal:
        best, best_score = None, None
        for name, plans in options.items():
            now = chosen.get(name)
            now_cost = cost(now, True) if now else cost(plans[0], False)
            now_acc = accuracy[(name, id(now))] if now else baseline
            for p in plans:
                saved = now_cost - cost(p, True)
                if saved <= 0:
                    continue
                score = max(0.0, now_acc - accuracy[(name, id(p))]) / saved
                if best_score is None or score < best_score or (score == best_score and saved > best[1]):
                    best, best_score = (p, saved), score
        if best is None:
            log.warning("target %.2fx %s not reachable with candidates %s; stopping at %.2fx",
                        reduction, target, candidates, model_cost / current)
            break
        plan, saved = best
        chosen[plan.name] = plan
        current -= saved
    return DecompositionReport(chosen), table


def model_cost_after(report: DecompositionReport, model_cost: int, target: str = "macs") -> int:
    """The model's MACs (or params) once ``report`` is applied, from the formulas (nothing is decomposed)."""
    saved = sum((p.before.macs - p.after.macs) if target == "macs" else (p.before.params - p.after.params)
                for p in report.layers.values() if p.skipped is None)
    return model_cost - saved


def energy_rank_search(model: nn.Module, example_input: torch.Tensor, target: str | dict | Target | None = None,
                       method: str = "auto", layers: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                       steps: int = 20, *, reduction: float | None = None) -> tuple[DecompositionReport, float]:
    """The largest singular-value energy, kept uniformly by every layer, at which the model meets
    ``target`` (``"macs:3"`` or ``"params:3"``); found by bisection on the formulas, so no layer is
    decomposed while searching. Returns the plan and the energy. (``reduction=3`` with ``target="macs"``
    is the deprecated spelling.)"""
    goal_target = target_or_reduction(target, reduction, ("macs", "params"), "energy_target target")
    if goal_target is None:
        raise NetslimError("energy_rank_search needs target, e.g. 'macs:3'")
    metric = goal_target.metric
    model_cost = measure(model, example_input, metric)
    goal = goal_target.goal(model_cost)

    def ranks_at(energy: float) -> dict[str, int | list[int]]:
        got = {n: [rank_for_energy(s, energy) for s in spectrum] for n, spectrum in layer_spectra.items()}
        return {n: r if len(r) > 1 else r[0] for n, r in got.items()}

    def cost_at(energy: float) -> float:
        report = plan_decomposition(model, example_input, method, "fixed", 1, names, ranks=ranks_at(energy))
        return model_cost_after(report, model_cost, metric)

    level = log.level
    log.setLevel(logging.ERROR)  # the probes' skipped layers are reported once, by the final plan
    try:
        eligible = plan_decomposition(model, example_input, method, "fixed", 1, layers, exclude).layers
        names = tuple(eligible)
        layer_spectra = {n: spectra(model.get_submodule(n), p.method) for n, p in eligible.items()}
        found = bisect(cost_at, 0.0, 1.0, goal, increasing=True, steps=steps)
    finally:
        log.setLevel(level)
    if found is None:
        raise NetslimError(f"no energy reaches {goal_target.factor:g}x fewer {metric} with method {method!r}: "
                           f"even the smallest ranks save too little")
    return plan_decomposition(model, example_input, method, "fixed", 1, names, ranks=ranks_at(found.knob)), found.knob
