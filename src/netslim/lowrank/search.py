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

from ..errors import NetslimError
from ..train import evaluate
from ..surgery import io_shapes
from .apply import DecompositionReport, LayerPlan, apply_plan_, build, plan_decomposition, spectra
from .ranks import rank_for_energy

log = logging.getLogger("netslim.lowrank")
TARGETS = ("macs", "params", "latency")


def whole_model_cost(model: nn.Module, example_input: torch.Tensor, target: str, latency_batch: int = 1) -> float:
    """The model's MACs, parameters, or median latency in ms at batch ``latency_batch``."""
    from ..profile import measure_latency, profile

    if target == "latency":
        return measure_latency(model, example_input[:1], (latency_batch,))[latency_batch]
    prof = profile(model, example_input, latency=False)
    return prof.macs if target == "macs" else prof.params


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


def greedy_rank_search(model: nn.Module, example_input: torch.Tensor, data: Dataset, reduction: float,
                       target: str = "macs", method: str = "auto", candidates: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.75),
                       layers: tuple[str, ...] = (), exclude: tuple[str, ...] = (), batchnorm: bool = False,
                       device: str | torch.device = "cpu", progress: bool = True,
                       model_cost: float | None = None, latency_batch: int = 1) -> tuple[DecompositionReport, dict]:
    """Choose a rank per layer so that the model's ``target`` (macs, params or latency) shrinks by ``reduction``.

    For ``latency`` every layer and each of its candidate decompositions is timed alone on its input
    shape at batch ``latency_batch`` (on the CPU, or the device of ``example_input``), and the model's
    latency is measured once; the search then spends measured milliseconds instead of formula MACs.
    Returns the chosen plan and a sensitivity table ``{layer: {fraction: top1}}``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
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
        model_cost = whole_model_cost(model, example_input, target, latency_batch)
    goal = model_cost / reduction
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


def energy_rank_search(model: nn.Module, example_input: torch.Tensor, reduction: float, target: str = "macs",
                       method: str = "auto", layers: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                       steps: int = 20) -> tuple[DecompositionReport, float]:
    """The largest singular-value energy, kept uniformly by every layer, at which the model's ``target``
    (macs or params) is at least ``reduction`` times smaller; found by bisection on the formulas, so no
    layer is decomposed while searching. Returns the plan and the energy."""
    if target not in ("macs", "params"):
        raise ValueError(f"target must be macs or params, got {target!r}")
    model_cost = whole_model_cost(model, example_input, target)
    goal = model_cost / reduction

    def ranks_at(energy: float) -> dict[str, int | list[int]]:
        got = {n: [rank_for_energy(s, energy) for s in spectrum] for n, spectrum in layer_spectra.items()}
        return {n: r if len(r) > 1 else r[0] for n, r in got.items()}

    lo, hi, best = 0.0, 1.0, None
    level = log.level
    log.setLevel(logging.ERROR)  # the probes' skipped layers are reported once, by the final plan
    try:
        eligible = plan_decomposition(model, example_input, method, "fixed", 1, layers, exclude).layers
        names = tuple(eligible)
        layer_spectra = {n: spectra(model.get_submodule(n), p.method) for n, p in eligible.items()}
        for _ in range(steps):
            mid = (lo + hi) / 2
            report = plan_decomposition(model, example_input, method, "fixed", 1, names, ranks=ranks_at(mid))
            if model_cost_after(report, model_cost, target) <= goal:
                best, lo = mid, mid
            else:
                hi = mid
    finally:
        log.setLevel(level)
    if best is None:
        raise NetslimError(f"no energy reaches {reduction:g}x fewer {target} with method {method!r}: "
                           f"even the smallest ranks save too little")
    return plan_decomposition(model, example_input, method, "fixed", 1, names, ranks=ranks_at(best)), best
