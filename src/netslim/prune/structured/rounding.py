"""Kept channel counts rounded to values the target runs fast, the rounding chosen by measurement.

A fixed ``round_to=8`` is a guess about the hardware. CPU kernels work on blocks of channels: oneDNN and
onnxruntime's NCHWc convolutions use blocks of 8 (AVX2) or 16 (AVX-512) channels, and onnxruntime runs a
convolution whose channel count is not a multiple of its block in a slower layout, with reorders around it,
so a model pruned to odd counts can be slower than the dense one at large batch. Where the steps fall, and
whether a coarser step pays for the channels it moves, differs per kernel, shape, batch and runtime. A
per-layer lookup table (NetAdapt, Yang et al. 2018, §3.2) times each layer alone and so cannot see the
layout a whole graph runs in; here each candidate rounding is applied to the whole model (each layer's kept
count to the nearest multiple, then moved a step at a time until a MAC target is met again:
:func:`rounded_removal`), and the pruned model timed whole on the target
(:func:`netslim.search.cost.measure_ms`). The fastest wins; when none is ``tolerance`` faster than the
unrounded model, the unrounded model is kept (it is closest to what the criterion chose).

A rounding *step* ``m`` rounds each layer group to a multiple of ``min(m, p)``, ``p`` being the largest power of
two at most half the group's channels, so a 16-channel layer may still lose half its channels at ``m = 16``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

from .select import LayerGroup

log = logging.getLogger("netslim.prune.structured")

STEPS = (1, 4, 8, 16)


def group_step(lg: LayerGroup, m: int) -> int:
    """The multiple layer group ``lg`` is rounded to under step ``m``: ``min(m, p)``, ``p`` the largest power of
    two at most half its channels (at least 1)."""
    p = 1
    while p * 2 <= lg.channels // 2:
        p *= 2
    return max(1, min(m, p))


@dataclass
class RoundingTrial:
    """One candidate rounding: its step, the channel ratio of the unrounded selection it rounds, the pruned
    model's MACs and its latency measured whole on the target (ms)."""

    step: int
    ratio: float
    macs: int
    ms: float
    chosen: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _kept(lg: LayerGroup, remove: set[int]) -> int:
    return sum(1 for r in lg.roots if r not in remove)


def _with_count(lg: LayerGroup, scores: dict[int, float], remove: set[int], count: int) -> set[int]:
    """``remove`` with layer group ``lg`` keeping its ``count`` best-scored groups."""
    ranked = sorted(lg.roots, key=lambda r: (scores.get(r, 0.0), r))
    return (remove - set(lg.roots)) | set(ranked[: len(lg.roots) - count])


def _steps_of(lg: LayerGroup, m: int) -> int:
    """Kept groups per rounding step of ``lg`` under step ``m`` (channels per step over channels per group)."""
    return max(1, round(group_step(lg, m) / lg.unit))


def rounded_removal(lgs: list[LayerGroup], scores: dict[int, float], remove: set[int], m: int,
                    macs_of: Callable[[set[int]], int], goal: int | None, max_moves: int = 64) -> set[int]:
    """``remove`` with every layer group's kept count moved to the nearest multiple of :func:`group_step`, then,
    when ``goal`` (MACs) is given, moved a step at a time until the model meets it: down in the group kept
    furthest above its original fraction while it exceeds the goal, then up in the group furthest below its
    original fraction while it still fits (at most ``max_moves`` moves). ``macs_of``: MACs of the model with a
    removal set."""
    target = {i: _kept(lg, remove) / len(lg.roots) for i, lg in enumerate(lgs)}
    counts = {}
    for i, lg in enumerate(lgs):
        step = _steps_of(lg, m)
        counts[i] = min(len(lg.roots), max(step, round(_kept(lg, remove) / step) * step))

    def removal() -> set[int]:
        out = set(remove)
        for i, lg in enumerate(lgs):
            out = _with_count(lg, scores, out, counts[i])
        return out

    if goal is None:
        return removal()
    macs = macs_of(removal())
    for _ in range(max_moves):
        if macs <= goal:
            break
        movable = [i for i, lg in enumerate(lgs) if counts[i] - _steps_of(lg, m) >= 1]
        if not movable:
            break
        i = max(movable, key=lambda j: counts[j] / len(lgs[j].roots) - target[j])
        counts[i] -= _steps_of(lgs[i], m)
        macs = macs_of(removal())
    tried: set[int] = set()
    for _ in range(max_moves):
        growable = [i for i, lg in enumerate(lgs) if i not in tried and counts[i] + _steps_of(lg, m) <= len(lg.roots)
                    and counts[i] / len(lg.roots) < target[i]]
        if not growable or macs > goal:
            break
        i = min(growable, key=lambda j: counts[j] / len(lgs[j].roots) - target[j])
        counts[i] += _steps_of(lgs[i], m)
        grown = macs_of(removal())
        if grown <= goal:
            macs = grown
        else:
            counts[i] -= _steps_of(lgs[i], m)
            tried.add(i)
    return removal()


def choose_step(trials: list[RoundingTrial], tolerance: float = 0.03) -> RoundingTrial:
    """The fastest measured trial; the unrounded one (step 1) unless another is more than ``tolerance`` faster."""
    feasible = list(trials)
    if not feasible:
        raise ValueError("no rounding trials to choose from")
    fastest = min(feasible, key=lambda t: t.ms)
    plain = next((t for t in feasible if t.step == 1), None)
    pick = plain if plain is not None and fastest.ms >= plain.ms * (1.0 - tolerance) else fastest
    pick.chosen = True
    for t in trials:
        log.info("rounding step %d: ratio %s, %s MACs, %s ms%s", t.step, t.ratio, t.macs,
                 f"{t.ms:.3f}", " (chosen)" if t.chosen else "")
    return pick


__all__ = ["STEPS", "RoundingTrial", "group_step", "rounded_removal", "choose_step"]
