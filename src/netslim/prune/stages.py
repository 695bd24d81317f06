"""The ``prune`` recipe stage: unstructured magnitude pruning, one-shot or gradual (AGP), with a
per-layer sparsity that is uniform, global, threshold-based, sensitivity-planned or contribution-ranked; or
sparse variational dropout (``method: variational``), where training decides each weight's fate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from ..errors import NetslimError, unknown_choice
from ..pipeline.stages import StageContext, stage
from ..train import TrainConfig, fit
from ..targets import OLD_SCOPES, SCOPES, check_scope
from .magnitude import contribution_plan, magnitude_masks, planned_masks, prunable_layers, threshold_masks
from .masks import apply_masks_
from .schedules import AGPHook
from .variational import VariationalDropoutConfig, variational_prune_
from .sensitivity import DEFAULT_GRID, plan_sparsity, plot_sensitivity, sensitivity_analysis

PRUNE_METHODS = ("magnitude", "variational")
PLANS = ("global", "uniform", "threshold", "sensitivity", "contribution", "explicit")
SCHEDULES = ("oneshot", "agp")


@dataclass
class PruneConfig:
    """``plan`` decides each layer's sparsity: ``global`` (one magnitude threshold over all layers),
    ``uniform`` (every layer at ``sparsity``; ``layer`` is the deprecated word), ``threshold`` (|w| < threshold_std x std, Han 2015),
    ``sensitivity`` (measured per-layer sensitivity, least predicted loss), ``contribution``
    (layers ranked by sum |W| + |b| per weight), ``explicit`` (``layer_sparsity``).
    ``schedule: agp`` prunes gradually while training with ``train`` settings.

    ``method: variational`` is sparse variational dropout (Molchanov et al. 2017,
    :mod:`netslim.prune.variational`): it trains with ``train`` settings (default Adam, lr 1e-3, 20 epochs)
    and removes the weights whose log alpha exceeds ``log_alpha_threshold``; the sparsity is its outcome, so
    ``sparsity``, ``plan`` and ``schedule`` do not apply. ``kl_weight`` scales the KL term (1: the exact
    bound), reached linearly over ``kl_warmup_epochs``."""

    method: str = "magnitude"
    sparsity: float = 0.5
    plan: str = "global"
    scope: str | None = None  # alias of plan for global / uniform (the words of prune_channels' scope)
    threshold_std: float = 1.0
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    schedule: str = "oneshot"
    agp_frequency: int = 50
    train: dict[str, Any] = field(default_factory=dict)
    sensitivity_samples: int = 2000
    sensitivity_grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID))
    log_alpha_threshold: float = 3.0
    kl_weight: float = 1.0
    kl_warmup_epochs: float = 5.0

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise unknown_choice("prune method", self.method, PRUNE_METHODS)
        if self.method == "variational":
            self.variational = VariationalDropoutConfig(
                threshold=self.log_alpha_threshold, kl_weight=self.kl_weight,
                kl_warmup_epochs=self.kl_warmup_epochs, exclude=list(self.exclude), train=dict(self.train))
            self.train_config = self.variational.train_config
            return
        if self.scope is not None:
            self.plan = self.scope = check_scope(self.scope)
        if self.plan in OLD_SCOPES:
            self.plan = check_scope(self.plan, "plan")
        if self.plan not in PLANS:
            raise unknown_choice("plan", self.plan, PLANS)
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise NetslimError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.plan == "explicit" and not self.layer_sparsity:
            raise NetslimError("plan 'explicit' needs layer_sparsity: {layer: sparsity}")
        if self.schedule == "agp" and self.plan == "threshold":
            raise NetslimError("schedule 'agp' needs a target sparsity; plan 'threshold' has none")
        self.train_config = TrainConfig(**self.train) if self.schedule == "agp" else None


def _masks(model: nn.Module, cfg: PruneConfig, sparsity: float, plan: dict[str, float] | None = None):
    """Masks at overall ``sparsity``; a per-layer plan is scaled by ``sparsity / cfg.sparsity``
    so that a gradual schedule raises every layer along the same curve."""
    exclude = tuple(cfg.exclude)
    if cfg.plan in SCOPES:
        return magnitude_masks(model, sparsity, cfg.plan, exclude)
    if cfg.plan == "threshold":
        return threshold_masks(model, cfg.threshold_std, exclude)
    scale = sparsity / cfg.sparsity if cfg.sparsity > 0 else 1.0
    return planned_masks(model, {n: s * scale for n, s in plan.items()})


def _restore_prune(model: nn.Module, cfg: PruneConfig, artifacts: dict | None = None) -> nn.Module:
    layers = prunable_layers(model, tuple(cfg.exclude))
    return apply_masks_(model, {n: torch.ones_like(m.weight) for n, m in layers.items()})


def _sensitivity_plan(ctx: StageContext, cfg: PruneConfig) -> tuple[dict[str, float], str]:
    train = ctx.data.train_plain
    g = torch.Generator().manual_seed(0)
    held_out = Subset(train, torch.randperm(len(train), generator=g)[:cfg.sensitivity_samples].tolist())
    table = sensitivity_analysis(ctx.model, held_out, tuple(cfg.sensitivity_grid), tuple(cfg.exclude),
                                 ctx.device, ctx.progress)
    plan = plan_sparsity(table, cfg.sparsity)
    plot_sensitivity(table, ctx.stage_dir / "sensitivity.png", plan)
    (ctx.stage_dir / "sensitivity.md").write_text(table.markdown(plan) + "\n")
    total = sum(table.sizes.values())
    reached = sum(plan[n] * table.sizes[n] for n in plan) / total
    note = (f"Sensitivity on {len(held_out)} held-out training images (top-1 %, each layer pruned alone); "
            f"plan for {cfg.sparsity:.0%} total sparsity reaches {reached:.1%}.\n\n" + table.markdown(plan))
    return plan, note


@stage("prune", PruneConfig, restore=_restore_prune)
def prune(ctx: StageContext, cfg: PruneConfig) -> nn.Module:
    """Unstructured magnitude pruning (Han et al. 2015), masks kept through later fine-tuning."""
    if cfg.method == "variational":
        return _variational(ctx, cfg)
    plan, note = None, None
    if cfg.plan == "sensitivity":
        plan, note = _sensitivity_plan(ctx, cfg)
    elif cfg.plan == "contribution":
        plan = contribution_plan(ctx.model, cfg.sparsity, tuple(cfg.exclude))
        note = "Contribution plan (sum |W|+|b| per weight): " + ", ".join(f"{n} {s:.1%}" for n, s in plan.items())
    elif cfg.plan == "explicit":
        plan = dict(cfg.layer_sparsity)
    if cfg.schedule == "oneshot":
        apply_masks_(ctx.model, _masks(ctx.model, cfg, cfg.sparsity, plan))
    else:
        tc = cfg.train_config
        steps = tc.epochs * (tc.max_steps_per_epoch or max(1, len(ctx.data.train) // tc.batch_size))
        hook = AGPHook(lambda m, s: _masks(m, cfg, s, plan), 0.0, cfg.sparsity, steps, cfg.agp_frequency)
        fit(ctx.model, ctx.data.train, tc, hooks=[hook], device=ctx.device, progress=ctx.progress,
            checkpoint_path=ctx.stage_dir / "train.ckpt")
    layers = prunable_layers(ctx.model, tuple(cfg.exclude))
    sparsities = {n: float((m.weight == 0).float().mean()) for n, m in layers.items()}
    summary = "Per-layer sparsity: " + ", ".join(f"{n} {s:.1%}" for n, s in sparsities.items())
    ctx.artifacts["notes"] = (note + "\n\n" + summary) if note else summary
    return ctx.model


def _variational(ctx: StageContext, cfg: PruneConfig) -> nn.Module:
    report = variational_prune_(ctx.model, ctx.data.train, cfg.variational, device=ctx.device,
                                progress=ctx.progress, checkpoint_path=ctx.stage_dir / "train.ckpt")
    ctx.artifacts["notes"] = (f"Sparse variational dropout (Molchanov et al. 2017), log alpha threshold "
                              f"{cfg.log_alpha_threshold}: {report.sparsity:.2%} of the weights removed "
                              f"({1 / max(1 - report.sparsity, 1e-12):.1f}x fewer).\n\n" + report.markdown())
    return ctx.model
