"""The ``finetune`` stage; technique stages live in their own subpackages and register here on import."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import NetslimError
from ..train import TrainConfig, fit
from .stages import StageContext, stage


@dataclass
class FinetuneConfig(TrainConfig):
    """The fields of :class:`netslim.train.TrainConfig`, and optionally distillation from the recipe's
    original (uncompressed) model: ``distill`` maps loss names to weights as in the ``distill`` stage
    (``{kd: 1.0}``: pure KD; ``{kd: 0.5}``: half KD, half cross-entropy; ``ce`` sets the labels' weight),
    ``temperature`` is KD's, ``distill_layers`` the (original layer, current layer) pairs of the feature
    losses. Without ``distill`` the stage is plain fine-tuning."""

    distill: dict[str, float] = field(default_factory=dict)
    temperature: float = 4.0
    distill_layers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill:
            from ..distill.distiller import layer_pairs, validate_losses

            layer_pairs(validate_losses(self.distill), self.distill_layers or None, key="distill_layers")
        if not self.temperature > 0:
            raise NetslimError(f"temperature must be > 0, got {self.temperature}")


@stage("finetune", FinetuneConfig)
def finetune(ctx: StageContext, cfg: FinetuneConfig) -> nn.Module:
    """Fine-tune the current model (masks and other parametrizations are kept), optionally distilling from
    the original model; resumable per epoch."""
    if not cfg.distill:
        fit(ctx.model, ctx.data.train, cfg, device=ctx.device, checkpoint_path=ctx.stage_dir / "train.ckpt",
            progress=ctx.progress)
        return ctx.model
    from ..distill import distill

    result = distill(ctx.model, ctx.original, ctx.data.train, cfg.distill, cfg.distill_layers or None, cfg,
                     temperature=cfg.temperature, checkpoint_path=ctx.stage_dir / "train.ckpt", device=ctx.device,
                     progress=ctx.progress)
    last = result.history[-1] if result.history else {}
    ctx.artifacts["distill_terms"] = {k[len("distill_"):]: v for k, v in last.items() if k.startswith("distill_")}
    ctx.artifacts["notes"] = f"fine-tuned with distillation from the original model: {cfg.distill}"
    return ctx.model
