"""One search space across the families, per layer (or per group of layers tied by their name).

A :class:`Knob` is one decision of the search with a few discrete choices:

- ``keep:<layers>``: the fraction of output channels the layer groups whose producing layers are in
  ``<layers>`` keep (structured pruning through the dependency graph, so coupled layers move together);
  ``keep:stream:<layers>`` the same for residual streams (channels several layers add into, named by
  the first of them, e.g. ResNet's ``conv1``), which cost far more accuracy to thin;
- ``op:<layers>``: what becomes of the dense k x k convolutions there: ``keep``, ``lowrank:<f>`` (spatial
  k x 1 / 1 x k factorization at fraction ``f`` of the full rank, Jaderberg et al. 2014) or
  ``bsconv:<f>`` (blueprint-separable BSConv-U at ``f`` of k^2 blueprints, Haase & Amthor 2020);
- ``bits:<layers>``: ``float``, ``8`` or ``4`` weight bits (activations in 8 bits as soon as one layer is
  quantized; on a target that executes int8 the 4-bit layers run as int8 and only their storage shrinks).

Layers a family cannot handle lack that option (a 1 x 1 conv has no ``op`` knob; channels the
dependency graph must keep have no ``keep`` knob). With many layers (ResNet-56 has 57), layers are tied by
the prefix of their names (``layer1.3.conv1`` -> ``layer1``) or in consecutive runs, leaving at most
``max_knobs`` knobs of a kind (:func:`tie`), so that a search of a hundred or so trials covers the space;
``tie_depth`` ties by name prefix at that depth instead (0: every layer its own knob).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import NetslimError
from ..layers import check_layer_names, covers
from ..lowrank.apply import layer_method
from ..compact.plan import eligible

FAMILIES = ("prune", "lowrank", "compact", "quant")
KEEP_CHOICES = (1.0, 0.75, 0.5, 0.375, 0.25)
OP_CHOICES = ("keep", "lowrank:0.5", "lowrank:0.25", "bsconv:0.34")
BITS_CHOICES = ("float", "8", "4")


@dataclass(frozen=True)
class Knob:
    """One decision: ``kind`` (``keep``, ``op`` or ``bits``), its ``choices`` (the first: leave the layers
    as they are) and the ``layers`` it sets."""

    name: str
    kind: str
    choices: tuple
    layers: tuple[str, ...]


@dataclass
class SearchSpace:
    """The knobs of one model; a candidate is ``{knob name: choice}`` (missing knobs: their first choice)."""

    knobs: list[Knob] = field(default_factory=list)
    families: tuple[str, ...] = FAMILIES

    def __len__(self) -> int:
        return len(self.knobs)

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise NetslimError(f"unknown knob {name!r}; knobs: {', '.join(k.name for k in self.knobs)}")

    def identity(self) -> dict[str, Any]:
        """The candidate that changes nothing."""
        return {k.name: k.choices[0] for k in self.knobs}

    def complete(self, candidate: dict[str, Any]) -> dict[str, Any]:
        """``candidate`` with every knob present and every choice checked."""
        out = self.identity()
        for name, choice in candidate.items():
            knob = self.knob(name)
            if choice not in knob.choices:
                raise NetslimError(f"knob {name}: {choice!r} is not a choice; valid: {', '.join(map(str, knob.choices))}")
            out[name] = choice
        return out

    def size(self) -> int:
        """How many candidates the space holds."""
        n = 1
        for k in self.knobs:
            n *= len(k.choices)
        return n

    def uniform(self, keep: float = 1.0, op: str = "keep", bits: str = "float", stream: float | None = None) -> dict[str, Any]:
        """The candidate with the same choice in every knob of a kind (the first choice where it is not
        one); residual streams keep ``stream`` (default: ``keep``)."""
        def wanted(k: Knob):
            if k.kind == "keep":
                return keep if stream is None or not k.name.startswith("keep:stream:") else stream
            return op if k.kind == "op" else bits
        return {k.name: wanted(k) if wanted(k) in k.choices else k.choices[0] for k in self.knobs}

    def describe(self) -> str:
        rows = [f"| {k.name} | {k.kind} | {', '.join(map(str, k.choices))} | {len(k.layers)} |" for k in self.knobs]
        return "\n".join(["| knob | kind | choices | layers |", "|---|---|---|---|", *rows])


def tie_key(name: str, depth: int) -> str:
    """``layer1.3.conv1`` at depth 1 -> ``layer1``; depth 0 ties nothing (the name itself)."""
    return name if depth <= 0 else ".".join(name.split(".")[:depth])


def tie(names: list[str], max_knobs: int, depth: int | None = None) -> dict[str, list[str]]:
    """``names`` (in model order) tied into at most ``max_knobs`` groups, keyed by the group's name.

    ``depth`` given: by name prefix at that depth (0: one group per name). Otherwise per name when they
    are few enough; else by the deepest name prefix giving at most ``max_knobs`` groups and at least a
    (``layer1``, ``layer2``, ``layer3`` of a ResNet); else in consecutive runs of about
    equal length (``features.0..features.7``)."""
    if depth is not None:
        return _tied(names, depth)
    if len(names) <= max_knobs:
        return _tied(names, 0)
    deepest = max((n.count(".") + 1 for n in names), default=1)
    for d in range(deepest, 0, -1):
        count = len({tie_key(n, d) for n in names})
        if min(3, max_knobs) <= count <= max_knobs:
            return _tied(names, d)
    runs: dict[str, list[str]] = {}
    per = -(-len(names) // max_knobs)
    for i in range(0, len(names), per):
        run = names[i:i + per]
        runs[run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}"] = run
    return runs


def _tied(names: Iterable[str], depth: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(tie_key(n, depth), []).append(n)
    return groups


def prune_knobs(model: nn.Module, example_input: torch.Tensor, exclude: tuple[str, ...], max_knobs: int,
                tie_depth: int | None) -> list[Knob]:
    """``keep`` knobs: one per tie group of prunable layer groups, one per stream spanning tie groups."""
    from ..prune.structured.api import _fix_excluded
    from ..prune.structured.graph import trace
    from ..prune.structured.select import layer_groups

    graph = trace(model, example_input)
    _fix_excluded(model, graph, exclude)
    lgs = [lg for lg in layer_groups(graph) if lg.producers and len(lg.roots) > 1]
    modules = dict(model.named_modules())

    def dense(name: str) -> bool:
        m = modules.get(name)
        return not (isinstance(m, nn.Conv2d) and m.groups > 1)

    streams, internal = [], []
    for lg in lgs:  # a stream: channels written by several dense layers (a residual path); a depthwise conv
        # sharing its input's channels does not make one
        (streams if sum(dense(p) for p in lg.producers) > 1 else internal).append(lg.producers[0])
    knobs = [Knob(f"keep:{key}", "keep", KEEP_CHOICES, tuple(names))
             for key, names in tie(list(dict.fromkeys(internal)), max_knobs, tie_depth).items()]
    knobs += [Knob(f"keep:stream:{key}", "keep", KEEP_CHOICES, tuple(names))
              for key, names in tie(list(dict.fromkeys(streams)), max_knobs, tie_depth).items()]
    return knobs


def op_knobs(model: nn.Module, families: tuple[str, ...], exclude: tuple[str, ...], max_knobs: int,
             tie_depth: int | None) -> list[Knob]:
    """``op`` knobs over the dense k x k convs that both spatial low-rank and BSConv can take."""
    choices = ["keep"]
    if "lowrank" in families:
        choices += [c for c in OP_CHOICES if c.startswith("lowrank")]
    if "compact" in families:
        choices += [c for c in OP_CHOICES if c.startswith("bsconv")]
    if len(choices) == 1:
        return []
    convs = [n for n, m in eligible(model, (), exclude).items() if layer_method(m, "spatial") is not None]
    return [Knob(f"op:{key}", "op", tuple(choices), tuple(names)) for key, names in tie(convs, max_knobs, tie_depth).items()]


def bits_knobs(model: nn.Module, exclude: tuple[str, ...], max_knobs: int, tie_depth: int | None) -> list[Knob]:
    """``bits`` knobs over every conv and linear layer."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not covers(exclude, n)]
    return [Knob(f"bits:{key}", "bits", BITS_CHOICES, tuple(names)) for key, names in tie(layers, max_knobs, tie_depth).items()]


def build_space(model: nn.Module, example_input: torch.Tensor, families: Iterable[str] = FAMILIES, *,
                exclude: Iterable[str] = (), max_knobs: int = 8, tie_depth: int | None = None) -> SearchSpace:
    """The search space of ``model``: knobs of the ``families`` asked (:data:`FAMILIES`), leaving the
    layers in ``exclude`` alone (a name covers its submodules)."""
    families = tuple(families)
    for f in families:
        if f not in FAMILIES:
            raise NetslimError(f"unknown search family {f!r}; valid families: {', '.join(FAMILIES)}")
    if not families:
        raise NetslimError(f"the search needs at least one family; valid families: {', '.join(FAMILIES)}")
    if not isinstance(max_knobs, int) or max_knobs < 1:
        raise NetslimError(f"max_knobs must be an integer >= 1, got {max_knobs!r}")
    exclude = check_layer_names(model, exclude, "exclude")
    model = model.eval()
    knobs: list[Knob] = []
    if "prune" in families:
        knobs += prune_knobs(model, example_input, exclude, max_knobs, tie_depth)
    knobs += op_knobs(model, families, exclude, max_knobs, tie_depth)
    if "quant" in families:
        knobs += bits_knobs(model, exclude, max_knobs, tie_depth)
    if not knobs:
        raise NetslimError(f"no layer of this model can be changed by {', '.join(families)}")
    return SearchSpace(knobs, families)


__all__ = ["FAMILIES", "KEEP_CHOICES", "OP_CHOICES", "BITS_CHOICES", "Knob", "SearchSpace", "build_space", "tie_key"]
