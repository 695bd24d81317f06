"""Decomposing a whole model: which layers, which method, which rank, and whether it pays.

A layer is decomposed only when the formulas of :mod:`.formulas` say the result has fewer
parameters *and* fewer MACs; otherwise it is skipped with a message giving the numbers.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NetslimError, unknown_choice
from ..layers import check_layer_names, select_layers
from ..surgery import io_shapes, replace_module_
from . import formulas
from .factorize import cp_conv, spatial_conv, svd_conv1x1, svd_linear, tucker2_conv
from .ranks import rank_for_energy, vbmf_rank

log = logging.getLogger("netslim.lowrank")
METHODS = ("auto", "svd", "spatial", "cp", "tucker2")
SELECTORS = ("fixed", "energy", "vbmf")


@dataclass
class LayerPlan:
    """What will be done to one layer (rank is an int, or (rank_in, rank_out) for Tucker-2)."""

    name: str
    method: str
    rank: int | tuple[int, int]
    before: formulas.Cost
    after: formulas.Cost
    skipped: str | None = None

    def to_dict(self) -> dict:
        return {"method": self.method, "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank,
                "params": [self.before.params, self.after.params], "macs": [self.before.macs, self.after.macs],
                "skipped": self.skipped}


def layer_method(module: nn.Module, method: str) -> str | None:
    """The method for this layer, or None when the layer is not decomposable by ``method``."""
    is_linear = isinstance(module, nn.Linear)
    is_conv = isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str)
    is_1x1 = is_conv and module.kernel_size == (1, 1)
    if method == "auto":
        return "svd" if (is_linear or is_1x1) else ("spatial" if is_conv else None)
    if method == "svd":
        return "svd" if (is_linear or is_1x1) else None
    if method in ("spatial", "cp", "tucker2"):
        return method if (is_conv and not is_1x1) else None
    raise unknown_choice("decompose method", method, METHODS)


def _matrix(module: nn.Module, method: str) -> torch.Tensor:
    w = module.weight.detach()
    if method == "svd":
        return w.flatten(1)
    n, c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)  # the spatial split's matrix


def _full_rank(module: nn.Module, method: str) -> int | tuple[int, int]:
    """The rank a fraction of 1 means (for CP: max(N, C); a CP rank may go beyond it, see :func:`_max_rank`)."""
    w = module.weight
    if method == "tucker2":
        return (w.shape[1], w.shape[0])
    if method == "cp":
        return max(w.shape[0], w.shape[1])
    return min(_matrix(module, method).shape)


def _max_rank(module: nn.Module, method: str) -> int | tuple[int, int]:
    """The largest rank that can still add information: the matrix rank for SVD / spatial / Tucker-2; for CP
    the generic bound of a tensor's rank, the product of its dimensions over the largest one."""
    if method == "cp":
        dims = sorted(module.weight.shape)
        return dims[0] * dims[1] * dims[2]
    return _full_rank(module, method)


def select_rank(module: nn.Module, method: str, selector: str, value: float | int | None) -> int | tuple[int, int]:
    """Rank by ``selector``: ``fixed`` (an int, or a float as a fraction of full rank: in (0, 1], and for CP
    also above 1, since a CP rank may exceed max(N, C)),
    ``energy`` (fraction of squared singular values kept), ``vbmf`` (one-shot EVBMF)."""
    full = _full_rank(module, method)
    if selector == "fixed":
        if value is None:
            raise NetslimError("selector 'fixed' needs rank: an integer or a fraction in (0, 1]")
        def pick(f: int) -> int:  # an integer rank is taken as asked (costs are judged on it)
            return max(1, int(value)) if (isinstance(value, int) and value >= 1) else max(1, round(f * float(value)))
        return (pick(full[0]), pick(full[1])) if isinstance(full, tuple) else pick(full)
    if selector == "energy":
        ranks = [rank_for_energy(spectrum, value) for spectrum in spectra(module, method)]
        return tuple(ranks) if method == "tucker2" else ranks[0]
    w = module.weight.detach()
    if selector == "vbmf":
        if method == "tucker2":
            return (vbmf_rank(w.transpose(0, 1).flatten(1)), vbmf_rank(w.flatten(1)))
        return vbmf_rank(w.flatten(1) if method == "cp" else _matrix(module, method))
    raise unknown_choice("rank selector", selector, SELECTORS)


def spectra(module: nn.Module, method: str) -> list[torch.Tensor]:
    """The singular values the energy selector reads: of the input and output unfoldings for Tucker-2
    (in that order), of the kernel's output unfolding for CP, of the method's matrix otherwise."""
    w = module.weight.detach().double()
    if method == "tucker2":
        return [torch.linalg.svdvals(w.transpose(0, 1).flatten(1)), torch.linalg.svdvals(w.flatten(1))]
    return [torch.linalg.svdvals(w.flatten(1) if method == "cp" else _matrix(module, method).double())]


def costs(module: nn.Module, method: str, rank, in_shape: tuple, out_shape: tuple) -> tuple[formulas.Cost, formulas.Cost]:
    """(before, after) parameter and MAC counts of one layer (biases excluded)."""
    if isinstance(module, nn.Linear):
        m, n = module.out_features, module.in_features
        positions = max(1, int(torch.tensor(out_shape[:-1]).prod())) if len(out_shape) > 1 else 1
        b, a = formulas.linear_cost(m, n), formulas.svd_cost(m, n, rank)
        return formulas.Cost(b.params, b.macs * positions), formulas.Cost(a.params, a.macs * positions)
    n, c, kh, kw = module.weight.shape
    in_hw, out_hw = tuple(in_shape[-2:]), tuple(out_shape[-2:])
    mid_hw = (out_hw[0], in_hw[1] + 2 * module.padding[1] - module.dilation[1] * (kw - 1)) if method in ("spatial", "cp") else out_hw
    before = formulas.conv_cost(c, n, kh, kw, out_hw)
    if method == "svd":
        after = formulas.Cost(rank * (c + n), rank * (c + n) * out_hw[0] * out_hw[1])
    elif method == "spatial":
        after = formulas.spatial_cost(c, n, kh, kw, rank, mid_hw, out_hw)
    elif method == "cp":
        after = formulas.cp_cost(c, n, kh, kw, rank, in_hw, mid_hw, out_hw)
    else:
        after = formulas.tucker2_cost(c, n, kh, kw, rank[0], rank[1], in_hw, out_hw)
    return before, after


def _exceeds(rank, full) -> bool:
    if isinstance(rank, tuple):
        return any(r > f for r, f in zip(rank, full))
    return rank > full


def build(module: nn.Module, method: str, rank, batchnorm: bool = False, iters: int = 100) -> nn.Sequential:
    """The decomposed replacement of ``module`` (``iters``: ALS / HOOI iterations for CP and Tucker-2)."""
    if method == "svd":
        return svd_linear(module, rank) if isinstance(module, nn.Linear) else svd_conv1x1(module, rank)
    if method == "spatial":
        return spatial_conv(module, rank, batchnorm)
    if method == "cp":
        return cp_conv(module, rank, n_iter=iters)
    return tucker2_conv(module, rank[0], rank[1], n_iter=iters)


@dataclass
class DecompositionReport:
    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = ["| layer | method | rank | params before → after | MACs before → after | note |",
                 "|---|---|---|---|---|---|"]
        for name, p in self.layers.items():
            rank = "x".join(map(str, p.rank)) if isinstance(p.rank, tuple) else p.rank
            lines.append(f"| {name} | {p.method} | {rank} | {p.before.params:,} → {p.after.params:,} "
                         f"| {p.before.macs:,} → {p.after.macs:,} | {p.skipped or 'decomposed'} |")
        return "\n".join(lines)


def plan_decomposition(model: nn.Module, example_input: torch.Tensor, method: str = "auto", selector: str = "fixed",
                       value: float | int | None = None, layers: tuple[str, ...] = (),
                       exclude: tuple[str, ...] = (), ranks: dict[str, int | list[int]] | None = None) -> DecompositionReport:
    """Decide method and rank per layer; mark layers where decomposition would not reduce both
    parameters and MACs as skipped, with the numbers."""
    if method not in METHODS:
        raise unknown_choice("decompose method", method, METHODS)
    if selector not in SELECTORS:
        raise unknown_choice("rank selector", selector, SELECTORS)
    check_layer_names(model, ranks or {}, "ranks")
    chosen = select_layers(model, (nn.Linear, nn.Conv2d), layers, exclude)
    shapes = io_shapes(model, example_input, (nn.Linear, nn.Conv2d))
    report = DecompositionReport()
    for name, module in chosen.items():
        if name not in shapes:
            continue
        m = layer_method(module, method)
        if m is None:
            continue
        if ranks and name in ranks:
            r = ranks[name]
            rank = tuple(r) if isinstance(r, (list, tuple)) else int(r)
        else:
            rank = select_rank(module, m, selector, value)
        before, after = costs(module, m, rank, *shapes[name])
        full = _max_rank(module, m)
        if after.params < before.params and after.macs < before.macs and _exceeds(rank, full):
            rank = tuple(min(r, f) for r, f in zip(rank, full)) if isinstance(rank, tuple) else min(rank, full)
            before, after = costs(module, m, rank, *shapes[name])
        plan = LayerPlan(name, m, rank, before, after)
        if after.params >= before.params or after.macs >= before.macs:
            plan.skipped = (f"skipped: {m} at rank {rank} gives {after.params:,} params / {after.macs:,} MACs "
                            f"vs. {before.params:,} / {before.macs:,}")
            log.warning("%s %s", name, plan.skipped)
        report.layers[name] = plan
    return report


def apply_plan_(model: nn.Module, report: DecompositionReport, batchnorm: bool = False, iters: int = 100) -> nn.Module:
    """Replace every non-skipped layer of ``report`` by its decomposition."""
    for name, plan in report.layers.items():
        if plan.skipped is None:
            replace_module_(model, name, build(model.get_submodule(name), plan.method, plan.rank, batchnorm, iters))
    return model


def decompose_(model: nn.Module, example_input: torch.Tensor, method: str = "auto", selector: str = "fixed",
               value: float | int | None = None, batchnorm: bool = False, **kw) -> DecompositionReport:
    """Deprecated: plan and apply in place, returning the report (a ``_`` function returns the model).
    Use :func:`netslim.lowrank.decompose` with a :class:`~netslim.lowrank.DecomposeConfig`, or
    :func:`plan_decomposition` then :func:`apply_plan_`."""
    warnings.warn("netslim.lowrank.decompose_ is deprecated: use netslim.lowrank.decompose(model, x, "
                  "DecomposeConfig(...)), or plan_decomposition then apply_plan_", DeprecationWarning, stacklevel=2)
    report = plan_decomposition(model, example_input, method, selector, value, **kw)
    apply_plan_(model, report, batchnorm)
    return report
