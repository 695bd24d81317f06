"""Stages that ship with the foundation: ``finetune`` and ``prune`` (unstructured magnitude)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import unknown_choice
from ..prune import apply_masks_, magnitude_prune_
from ..prune.magnitude import SCOPES, prunable_layers
from ..train import TrainConfig, fit
from .stages import StageContext, stage


@dataclass
class FinetuneConfig(TrainConfig):
    """The fields of :class:`netslim.train.TrainConfig`."""


@stage("finetune", FinetuneConfig)
def finetune(ctx: StageContext, cfg: FinetuneConfig) -> nn.Module:
    """Fine-tune the current model (masks and other parametrizations are kept); resumable per epoch."""
    fit(ctx.model, ctx.data.train, cfg, device=ctx.device, checkpoint_path=ctx.stage_dir / "train.ckpt",
        progress=ctx.progress)
    return ctx.model


PRUNE_METHODS = ("magnitude",)


@dataclass
class PruneConfig:
    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = "global"
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise unknown_choice("prune method", self.method, PRUNE_METHODS)
        if self.scope not in SCOPES:
            raise unknown_choice("scope", self.scope, SCOPES)
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")


def _restore_prune(model: nn.Module, cfg: PruneConfig) -> nn.Module:
    layers = prunable_layers(model, tuple(cfg.exclude))
    return apply_masks_(model, {n: torch.ones_like(m.weight) for n, m in layers.items()})


@stage("prune", PruneConfig, restore=_restore_prune)
def prune(ctx: StageContext, cfg: PruneConfig) -> nn.Module:
    """Unstructured magnitude pruning to a target sparsity, masks kept through later fine-tuning."""
    return magnitude_prune_(ctx.model, cfg.sparsity, cfg.scope, tuple(cfg.exclude))
