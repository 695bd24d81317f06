"""Which layers become which compact block, at what width, and whether it pays.

Every dense k x k convolution (groups 1, k > 1) the ``layers`` / ``exclude`` selection leaves is a
candidate. The block's cost comes from the formulas of its module; a layer where the block would not
cut both parameters and MACs (or where the block is not valid, e.g. CReLU without a following ReLU)
is skipped with the numbers or the reason. Selectors: ``width`` (the same width everywhere: an
integer, or a fraction of the block's full width) and ``target`` (the largest uniform width at which
the model meets ``"macs:3"`` or ``"params:3"``, by bisection on the formulas, nothing built while
searching).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import NetslimError, unknown_choice
from ..layers import select_layers
from ..surgery import io_shapes, replace_module_
from ..targets import Target, bisect, measure
from .cost import Cost, dense_cost, spatial
from .crelu import crelu, crelu_cost, crelu_heads, relu_follows
from .fire import fire, fire_cost, fire_heads
from .separable import bsconv_cost, bsconv_u, depthwise_separable, separable_cost, separable_heads

log = logging.getLogger("netslim.compact")
TARGETS = ("macs", "params")


@dataclass(frozen=True)
class Block:
    """One block type: its full width for a layer, how to build it, its cost, and its refit heads."""

    full: Callable[[nn.Conv2d], int]
    build: Callable[..., nn.Module]
    cost: Callable[..., Cost]
    heads: Callable[[nn.Module], list]
    knob: bool = True


BLOCKS: dict[str, Block] = {
    "separable": Block(spatial, depthwise_separable, separable_cost, separable_heads),
    "bsconv": Block(spatial, bsconv_u, bsconv_cost, separable_heads),
    "fire": Block(lambda c: c.in_channels, fire, fire_cost, fire_heads),
    "crelu": Block(lambda c: 1, lambda c, w, **_: crelu(c), lambda c, w, i, o, **_: crelu_cost(c, i, o), crelu_heads,
                   knob=False),
}


@dataclass
class LayerPlan:
    """What will be done to one layer: its ``block`` at ``width`` (a rank or channel count), costs."""

    name: str
    block: str
    width: int
    before: Cost
    after: Cost
    skipped: str | None = None

    def to_dict(self) -> dict:
        return {"block": self.block, "width": self.width, "params": [self.before.params, self.after.params],
                "macs": [self.before.macs, self.after.macs], "skipped": self.skipped}


@dataclass
class ReplacementPlan:
    """The per-layer plan (``layers``: name -> :class:`LayerPlan`, skipped ones included)."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)

    @property
    def replaced(self) -> list[str]:
        return [n for n, p in self.layers.items() if p.skipped is None]

    def saved(self, metric: str) -> int:
        return sum((p.before.macs - p.after.macs) if metric == "macs" else (p.before.params - p.after.params)
                   for p in self.layers.values() if p.skipped is None)

    def markdown(self) -> str:
        rows = ["| layer | block | width | params | MACs | note |", "| --- | --- | --- | --- | --- | --- |"]
        for p in self.layers.values():
            rows.append(f"| {p.name} | {p.block} | {p.width} | {p.before.params:,} -> {p.after.params:,} | "
                        f"{p.before.macs:,} -> {p.after.macs:,} | {p.skipped or 'replaced'} |")
        return "\n".join(rows)


def eligible(model: nn.Module, layers=(), exclude=()) -> dict[str, nn.Conv2d]:
    """Dense k x k convolutions (groups 1, kernel larger than 1x1, numeric padding) in the selection."""
    return {n: m for n, m in select_layers(model, nn.Conv2d, layers, exclude).items()
            if m.groups == 1 and m.kernel_size != (1, 1) and not isinstance(m.padding, str)}


def to_width(conv: nn.Conv2d, block: str, value: float | int) -> int:
    """An integer width as asked, or a fraction of the block's full width (at least 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise NetslimError(f"width must be an integer >= 1 or a fraction in (0, 1], got {value!r}")
    if isinstance(value, int):
        return value
    if value > 1:
        raise NetslimError(f"width {value!r}: a fraction must be in (0, 1] (or give an integer)")
    return max(1, round(value * BLOCKS[block].full(conv)))


def plan_replacement(model: nn.Module, example_input: torch.Tensor, block: str = "separable",
                     width: float | int = 1 / 3, layers=(), exclude=(), widths: dict[str, int] | None = None,
                     expand1x1: float = 0.5, validity: dict[str, str | None] | None = None) -> ReplacementPlan:
    """The plan for ``block`` at ``width`` (``widths``: per-layer integers that override it)."""
    if block not in BLOCKS:
        raise unknown_choice("compact block", block, BLOCKS)
    convs = eligible(model, layers, exclude)
    widths = dict(widths or {})
    for name in widths:
        if name not in convs:
            raise NetslimError(f"widths: {name!r} is not a dense k x k conv in the selection; valid: "
                               f"{', '.join(convs) or '(none)'}")
    shapes = io_shapes(model, example_input[:1], (nn.Conv2d,))
    if block == "crelu" and validity is None:
        validity = relu_follows(model, example_input[:1], list(convs))
    plan = ReplacementPlan()
    for name, conv in convs.items():
        if name not in shapes:
            continue
        in_hw, out_hw = shapes[name][0][-2:], shapes[name][1][-2:]
        w = to_width(conv, block, widths.get(name, width))
        extra = {"expand1x1": expand1x1} if block == "fire" else {}
        before, after = dense_cost(conv, in_hw, out_hw), BLOCKS[block].cost(conv, w, in_hw, out_hw, **extra)
        skipped = None
        if block == "crelu" and conv.out_channels % 2:
            skipped = f"odd number of filters ({conv.out_channels}): they do not pair"
        elif block == "crelu" and validity.get(name):
            skipped = f"negated filters not valid: {validity[name]}"
        elif after.params >= before.params or after.macs >= before.macs:
            skipped = (f"{block} at width {w} would not save: params {before.params:,} -> {after.params:,}, "
                       f"MACs {before.macs:,} -> {after.macs:,}")
        if skipped:
            log.info("compact: %s skipped (%s)", name, skipped)
        plan.layers[name] = LayerPlan(name, block, w, before, after, skipped)
    return plan


def target_plan(model: nn.Module, example_input: torch.Tensor, block: str, target: Target, layers=(), exclude=(),
                expand1x1: float = 0.5, steps: int = 20) -> tuple[ReplacementPlan, float]:
    """The largest uniform width fraction at which the model meets ``target`` (macs or params), by bisection
    on the formulas. Returns the plan and the fraction (1.0 for CReLU, which has no knob)."""
    if target.metric not in TARGETS:
        raise NetslimError(f"replace target metric {target.metric!r}; valid: {', '.join(TARGETS)}")
    model_cost = measure(model, example_input, target.metric)
    goal = target.goal(model_cost)
    validity = relu_follows(model, example_input[:1], list(eligible(model, layers, exclude))) if block == "crelu" else None

    def cost_at(f: float):
        plan = plan_replacement(model, example_input, block, f, layers, exclude, expand1x1=expand1x1,
                                validity=validity)
        return model_cost - plan.saved(target.metric), plan

    if not BLOCKS[block].knob:
        value, plan = cost_at(1.0)
        if value > goal:
            raise NetslimError(f"{block} reaches only {model_cost / value:.2f}x fewer {target.metric}, not {target}")
        return plan, 1.0
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        found = bisect(cost_at, 0.0, 1.0, goal, increasing=True, steps=steps)
    finally:
        log.setLevel(level)
    if found is None:
        raise NetslimError(f"no width of {block} blocks reaches {target} (the narrowest blocks save too little)")
    return fill(model, example_input, found.result, target.metric, goal - found.value, expand1x1), found.knob


def fill(model: nn.Module, example_input: torch.Tensor, plan: ReplacementPlan, metric: str, budget: float,
         expand1x1: float = 0.5) -> ReplacementPlan:
    """Spend what the uniform width leaves under the goal (integer widths jump): widen layers one unit
    at a time, the cheapest step first, while the model stays within ``budget`` more of ``metric``."""
    shapes = io_shapes(model, example_input[:1], (nn.Conv2d,))
    extra = lambda b: {"expand1x1": expand1x1} if b == "fire" else {}  # noqa: E731
    while True:
        steps = []
        for name in plan.replaced:
            p = plan.layers[name]
            conv = model.get_submodule(name)
            if p.width >= BLOCKS[p.block].full(conv):
                continue
            after = BLOCKS[p.block].cost(conv, p.width + 1, shapes[name][0][-2:], shapes[name][1][-2:],
                                         **extra(p.block))
            if after.params >= p.before.params or after.macs >= p.before.macs:
                continue
            grow = (after.macs - p.after.macs) if metric == "macs" else (after.params - p.after.params)
            if grow <= budget:
                steps.append((grow, name, after))
        if not steps:
            return plan
        grow, name, after = min(steps)
        p = plan.layers[name]
        plan.layers[name] = LayerPlan(name, p.block, p.width + 1, p.before, after)
        budget -= grow


def apply_plan_(model: nn.Module, plan: ReplacementPlan, expand1x1: float = 0.5) -> nn.Module:
    """Swap every layer the plan replaces for its block, initialised from the layer's weights."""
    for name in plan.replaced:
        p = plan.layers[name]
        extra = {"expand1x1": expand1x1} if p.block == "fire" else {}
        replace_module_(model, name, BLOCKS[p.block].build(model.get_submodule(name), p.width, **extra))
    return model


__all__ = ["BLOCKS", "LayerPlan", "ReplacementPlan", "plan_replacement", "target_plan", "fill", "apply_plan_", "eligible"]
