"""The ``decompose`` recipe stage: low-rank factorization with fixed, energy, VBMF or target-driven ranks."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Subset

from ..errors import unknown_choice
from ..pipeline.stages import StageContext, stage
from ..surgery import replace_module_
from .apply import METHODS, SELECTORS, apply_plan_, build, plan_decomposition
from .refit import refit_
from .search import TARGETS, energy_rank_search, greedy_rank_search

STAGE_SELECTORS = (*SELECTORS, "target", "energy_target")


@dataclass
class DecomposeConfig:
    """``selector``: ``fixed`` (``rank``: an int, or a fraction of full rank), ``energy`` (keep ``energy``
    of the squared singular values), ``vbmf`` (one-shot EVBMF), ``target`` (greedy per-layer search
    on measured sensitivity until ``target`` (macs, params, or latency measured at batch ``latency_batch``)
    is ``reduction`` times smaller),
    ``energy_target`` (the largest energy, the same for every layer, that makes ``target`` ``reduction``
    times smaller).
    ``refit_images`` > 0: refit each decomposed layer's last factor on that many training images so it
    reproduces the layer's outputs before decomposition (asymmetric reconstruction, Zhang 2016)."""

    method: str = "auto"
    selector: str = "fixed"
    rank: float | int | None = 0.5
    energy: float = 0.9
    target: str = "macs"
    reduction: float = 2.0
    candidates: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.375, 0.5, 0.75])
    sensitivity_samples: int = 1000
    layers: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    ranks: dict[str, int | list[int]] = field(default_factory=dict)
    batchnorm: bool = False
    refit_images: int = 0
    latency_batch: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise unknown_choice("decompose method", self.method, METHODS)
        if self.selector not in STAGE_SELECTORS:
            raise unknown_choice("rank selector", self.selector, STAGE_SELECTORS)
        if self.target not in TARGETS:
            raise unknown_choice("target", self.target, TARGETS)
        if self.target == "latency" and self.selector != "target":
            raise ValueError("target 'latency' needs selector 'target' (the greedy search times every candidate)")
        if self.selector in ("target", "energy_target") and not self.reduction > 1:
            raise ValueError(f"reduction must be > 1, got {self.reduction}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.refit_images < 0:
            raise ValueError(f"refit_images must be >= 0, got {self.refit_images}")


def _restore(model: nn.Module, cfg: DecomposeConfig, artifacts: dict | None = None) -> nn.Module:
    for name, entry in (artifacts or {}).get("structure", {}).items():
        rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
        replace_module_(model, name, build(model.get_submodule(name), entry["method"], rank, cfg.batchnorm))
    return model


def _training_images(ctx: StageContext, count: int) -> torch.Tensor:
    train = ctx.data.train_plain
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(2))[:count].tolist()
    return torch.stack([train[i][0] for i in picked]).to(ctx.device)


@stage("decompose", DecomposeConfig, restore=_restore)
def decompose(ctx: StageContext, cfg: DecomposeConfig) -> nn.Module:
    """Low-rank factorization: SVD, spatial k x 1 / 1 x k, CP, Tucker-2 (skips layers where it would not pay)."""
    x = ctx.example_input
    if cfg.selector == "target":
        train = ctx.data.train_plain
        g = torch.Generator().manual_seed(0)
        held_out = Subset(train, torch.randperm(len(train), generator=g)[:cfg.sensitivity_samples].tolist())
        report, table = greedy_rank_search(ctx.model, x, held_out, cfg.reduction, cfg.target, cfg.method,
                                           tuple(cfg.candidates), tuple(cfg.layers), tuple(cfg.exclude),
                                           cfg.batchnorm, ctx.device, ctx.progress, latency_batch=cfg.latency_batch)
        ctx.artifacts["sensitivity"] = table
    elif cfg.selector == "energy_target":
        report, energy = energy_rank_search(ctx.model, x, cfg.reduction, cfg.target, cfg.method,
                                            tuple(cfg.layers), tuple(cfg.exclude))
        ctx.artifacts["energy"] = energy
    else:
        value = cfg.energy if cfg.selector == "energy" else cfg.rank
        report = plan_decomposition(ctx.model, x, cfg.method, cfg.selector, value, tuple(cfg.layers),
                                    tuple(cfg.exclude), cfg.ranks)
    reference = copy.deepcopy(ctx.model) if cfg.refit_images else None
    apply_plan_(ctx.model, report, cfg.batchnorm)
    if reference is not None:
        images = _training_images(ctx, cfg.refit_images)
        errors = refit_(ctx.model, reference, images, [n for n, p in report.layers.items() if p.skipped is None],
                        progress=ctx.progress)
        ctx.artifacts["refit_relative_error"] = {n: {"before": b, "after": a} for n, (b, a) in errors.items()}
    ctx.artifacts["structure"] = {n: p.to_dict() for n, p in report.layers.items() if p.skipped is None}
    ctx.artifacts["notes"] = report.markdown()
    return ctx.model
