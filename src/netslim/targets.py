"""How much smaller: one target syntax for every family, and one bisection that reaches it.

A target names a metric and a reduction factor: ``"macs:2"`` means 2x fewer MACs, ``"params:4"`` 4x
fewer parameters, ``"size:10"`` 10x fewer stored bytes, ``"latency:3"`` 3x faster (measured). The same
words are accepted as a mapping (``{"macs": 2}``, the YAML form ``target: {macs: 2}``) or a
:class:`Target`. Factors are always > 1 and always "times smaller than before the step".

:func:`bisect` is the one monotone bisection-to-a-target of the code base: structured pruning bisects
its channel ratio, low-rank search the energy kept, contribution-ranked pruning its scale, and the
benchmarks their tools' knobs, all with it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .errors import NetslimError

METRICS = ("macs", "params", "size", "latency")
SCOPES = ("uniform", "global")  # the same amount in every layer / one ranking across all layers
OLD_SCOPES = {"layer": "uniform"}  # deprecated words (magnitude pruning said "layer")


@dataclass(frozen=True)
class Target:
    """``factor``-fold reduction of ``metric`` (one of :data:`METRICS`), e.g. ``Target("macs", 2.0)``."""

    metric: str
    factor: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise NetslimError(f"unknown target metric {self.metric!r}; valid target metrics: {', '.join(METRICS)}")
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or not self.factor > 1.0:
            raise NetslimError(f"target {self.metric}: the factor must be a number > 1 (e.g. {self.metric}:2 for "
                               f"2x {'faster' if self.metric == 'latency' else 'fewer'}), got {self.factor!r}")
        object.__setattr__(self, "factor", float(self.factor))

    def goal(self, before: float) -> float:
        """The value of the metric to reach from ``before``: ``before / factor``."""
        return before / self.factor

    def root(self, steps: int) -> Target:
        """The per-step target of ``steps`` equal (geometric) steps reaching this one."""
        return Target(self.metric, self.factor ** (1.0 / steps))

    def __str__(self) -> str:
        return f"{self.metric}:{self.factor:g}"


def parse_target(target: str | Mapping | Target | None, metrics: Iterable[str] = METRICS,
                 what: str = "target") -> Target | None:
    """``"macs:2"``, ``{"macs": 2}`` or a :class:`Target` -> ``Target("macs", 2.0)``; ``None`` -> ``None``.

    ``metrics``: the metrics the caller can honour; another valid metric is refused with a message
    naming the ones it can (``what`` names the caller in messages, e.g. ``"prune_channels target"``).
    """
    if target is None:
        return None
    allowed = tuple(metrics)
    example = f"'{allowed[0] if allowed else 'macs'}:2'"
    if isinstance(target, Target):
        parsed = target
    else:
        if isinstance(target, str):
            metric, sep, value = target.strip().partition(":")
            if not sep:
                raise NetslimError(f"{what} {target!r} must look like {example} (metric:factor; metrics: "
                                   f"{', '.join(allowed)})")
            target = {metric.strip(): value.strip()}
        if not isinstance(target, Mapping) or len(target) != 1:
            raise NetslimError(f"{what} must name one metric and a factor, e.g. {example}; got {target!r}")
        (metric, value), = target.items()
        if metric not in METRICS:
            raise NetslimError(f"unknown {what} metric {metric!r}; valid {what} metrics: {', '.join(allowed)}")
        try:
            factor = float(value)
        except (TypeError, ValueError):
            raise NetslimError(f"{what} {metric}: {value!r} is not a number") from None
        parsed = Target(metric, factor)
    if parsed.metric not in allowed:
        raise NetslimError(f"{what} metric {parsed.metric!r} is not supported here; valid {what} metrics: "
                           f"{', '.join(allowed)}")
    return parsed


def target_or_reduction(target: str | Mapping | Target | None, reduction: float | None, metrics: Iterable[str] = METRICS,
                        what: str = "target") -> Target | None:
    """``target`` parsed, or the deprecated pair ``target="macs", reduction=2`` read as ``"macs:2"`` (with a
    :class:`DeprecationWarning`; ``reduction`` alone means MACs)."""
    if reduction is None:
        return parse_target(target, metrics, what)
    if target is not None and not (isinstance(target, str) and ":" not in target):
        raise NetslimError("give either target='macs:2' or the deprecated reduction=2 with target='macs', not both")
    metric = target or "macs"
    try:
        factor = float(reduction)
    except (TypeError, ValueError):
        raise NetslimError(f"reduction must be a number > 1, got {reduction!r}") from None
    warnings.warn(f"{what}: reduction={reduction!r} with target={metric!r} is deprecated; write "
                  f"target='{metric}:{factor:g}'", DeprecationWarning, stacklevel=3)
    return parse_target({metric: factor}, metrics, what)


def check_scope(scope: str, what: str = "scope") -> str:
    """``scope`` as one of :data:`SCOPES`: ``uniform`` (every layer gets the same amount) or ``global``
    (one ranking across layers); the old word ``layer`` is read as ``uniform`` with a DeprecationWarning."""
    if scope in OLD_SCOPES:
        warnings.warn(f"{what} {scope!r} is deprecated; write {OLD_SCOPES[scope]!r}", DeprecationWarning, stacklevel=3)
        return OLD_SCOPES[scope]
    if scope not in SCOPES:
        raise NetslimError(f"unknown {what} {scope!r}; valid {what}s: {', '.join(SCOPES)}")
    return scope


@dataclass(frozen=True)
class Bisection:
    """The knob :func:`bisect` found, the value ``fn`` gave there, and what ``fn`` returned with it."""

    knob: float
    value: float
    result: Any = None


def bisect(fn: Callable[[float], float | tuple[float, Any]], lo: float, hi: float, goal: float, *,
           increasing: bool, at_most: bool = True, steps: int = 20, exact: bool = False) -> Bisection | None:
    """Monotone bisection to a target: the knob in ``[lo, hi]`` nearest to where ``fn`` crosses ``goal``,
    on the side where the goal is met.

    ``fn(knob)`` returns a value, or ``(value, result)`` to carry what was built at that knob (a plan, a
    pruned model). The goal is met when ``value <= goal`` (``at_most``) or ``value >= goal``.
    ``increasing``: whether ``fn`` grows with the knob. So with a rank fraction (MACs grow with it) the
    largest fraction meeting a MAC budget is found; with a pruning ratio (MACs shrink as it grows) the
    smallest ratio meeting it. ``steps`` halvings; ``exact`` stops as soon as ``value == goal``.
    Returns ``None`` when no probed knob met the goal (the caller says why in its own words).
    """
    meets_low = increasing == at_most  # the goal is met on the low side of the crossing
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = fn(mid)
        value, result = got if isinstance(got, tuple) else (got, None)
        if (value <= goal) if at_most else (value >= goal):
            best = Bisection(mid, value, result)
            lo, hi = (mid, hi) if meets_low else (lo, mid)
        else:
            lo, hi = (lo, mid) if meets_low else (mid, hi)
        if exact and value == goal:
            break
    return best


def measure(model, example_input, metric: str, *, latency_batch: int | None = None, warmup: int = 5,
            repeats: int = 20) -> float:
    """The model's MACs, parameters, stored bytes, or median latency in ms (at ``latency_batch``, default
    ``example_input``'s batch size; parametrizations baked into a copy first): what a :class:`Target`
    of that metric divides."""
    from .profile import deployable_copy, measure_latency, profile

    if metric == "latency":
        batch = latency_batch or example_input.shape[0]
        return measure_latency(deployable_copy(model), example_input[:1], (batch,), warmup, repeats)[batch]
    report = profile(model, example_input, latency=False)
    if metric == "macs":
        return float(report.macs)
    if metric == "params":
        return float(report.params)
    if metric == "size":
        return float(report.stored_bytes)
    raise NetslimError(f"unknown target metric {metric!r}; valid target metrics: {', '.join(METRICS)}")


__all__ = ["METRICS", "SCOPES", "check_scope", "Target", "parse_target", "target_or_reduction", "Bisection", "bisect", "measure"]
