"""How many channels each layer keeps: uniform ratios, global ranking, rounding, protection."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import NetslimError, unknown_choice
from ...layers import covers
from ...targets import SCOPES
from .graph import DependencyGraph


@dataclass
class LayerGroup:
    """Channel groups that span the same layers (one conv's channels, or a whole residual stream)."""

    roots: list[int]
    channels: int        # channels of its widest producing layer
    layers: list[str]    # modules it touches (for messages and reports)
    producers: list[str] = field(default_factory=list)  # the modules whose output channels these are

    @property
    def unit(self) -> float:
        """Channels removed per group (1, or more where grouped convs / shuffles tie channels)."""
        return self.channels / max(1, len(self.roots))


def layer_groups(graph: DependencyGraph) -> list[LayerGroup]:
    groups = graph.groups()
    out = []
    for roots in graph.layer_groups():
        slice_ids = sorted({si for r in roots for si, _ in groups[r]})
        producers = [graph.slices[si] for si in slice_ids if graph.slices[si].role == "out"] or \
                    [graph.slices[si] for si in slice_ids]
        channels = max(s.labels.numel() for s in producers)
        layers = sorted({graph.slices[si].module for si in slice_ids})
        made_by = list(dict.fromkeys(s.module for s in producers))
        out.append(LayerGroup(sorted(roots), channels, layers, made_by))
    return out


def _kept_count(lg: LayerGroup, keep_fraction: float, round_to: int) -> int:
    """Groups to keep so the producing layers keep ~``keep_fraction`` of channels, as a multiple of ``round_to``."""
    channels = lg.channels * keep_fraction
    if round_to > 1:
        channels = max(round_to, math.ceil(channels / round_to - 1e-9) * round_to)
    groups = round(channels / lg.unit)
    return min(len(lg.roots), max(1, groups))


def group_ratio(lg: LayerGroup, ratio: float, ratios: dict[str, float] | None) -> float:
    """The ratio for one layer group: ``ratios``' entry for the first of its producing layers that one
    covers (a name covers its submodules), else ``ratio``."""
    for name in lg.producers:
        for key, value in (ratios or {}).items():
            if covers((key,), name):
                return value
    return ratio


def select_uniform(lgs: list[LayerGroup], scores: dict[int, float], ratio: float, round_to: int = 1,
                   ratios: dict[str, float] | None = None) -> set[int]:
    """Remove the lowest-scored ``ratio`` of every layer group (``ratios``: per producing layer)."""
    remove: set[int] = set()
    for lg in lgs:
        keep = _kept_count(lg, 1.0 - group_ratio(lg, ratio, ratios), round_to)
        ranked = sorted(lg.roots, key=lambda r: (scores.get(r, 0.0), r))
        remove.update(ranked[: len(lg.roots) - keep])
    return remove


def select_global(lgs: list[LayerGroup], scores: dict[int, float], ratio: float, round_to: int = 1,
                  min_keep: float = 0.1) -> set[int]:
    """Rank all groups together and remove the lowest ``ratio`` of channels, but never more than
    ``1 - min_keep`` of one layer group (the protection against emptying a layer)."""
    owner = {r: i for i, lg in enumerate(lgs) for r in lg.roots}
    budget = ratio * sum(lg.channels for lg in lgs)
    caps = [len(lg.roots) - max(1, math.ceil(min_keep * len(lg.roots))) for lg in lgs]
    taken = [0] * len(lgs)
    removed_channels = 0.0
    chosen: list[set[int]] = [set() for _ in lgs]
    for r in sorted(owner, key=lambda r: (scores.get(r, 0.0), r)):
        if removed_channels >= budget:
            break
        i = owner[r]
        if taken[i] < caps[i]:
            chosen[i].add(r)
            taken[i] += 1
            removed_channels += lgs[i].unit
    remove: set[int] = set()
    for lg, picked in zip(lgs, chosen):
        keep = _kept_count(lg, 1.0 - len(picked) / max(1, len(lg.roots)), round_to)
        ranked = sorted(lg.roots, key=lambda r: (scores.get(r, 0.0), r))
        remove.update(ranked[: len(lg.roots) - keep])
    return remove


def select(lgs: list[LayerGroup], scores: dict[int, float], ratio: float, scope: str = "uniform",
           round_to: int = 1, min_keep: float = 0.1, ratios: dict[str, float] | None = None) -> set[int]:
    """The channel groups to remove; ``ratios`` (per producing layer, scope ``uniform`` only) override
    ``ratio`` for the layer groups they name."""
    if not 0.0 <= ratio < 1.0:
        raise NetslimError(f"ratio must be in [0, 1), got {ratio}")
    for key, value in (ratios or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise NetslimError(f"ratios[{key!r}] must be in [0, 1), got {value!r}")
    if ratios and scope != "uniform":
        raise NetslimError("ratios (per layer) need scope 'uniform'; scope 'global' ranks all layers together")
    if round_to < 1:
        raise NetslimError(f"round_to must be >= 1, got {round_to}")
    if scope == "uniform":
        return select_uniform(lgs, scores, ratio, round_to, ratios)
    if scope == "global":
        return select_global(lgs, scores, ratio, round_to, min_keep)
    raise unknown_choice("scope", scope, SCOPES)
