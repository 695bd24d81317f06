"""The ``finetune`` stage; technique stages live in their own subpackages and register here on import."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
