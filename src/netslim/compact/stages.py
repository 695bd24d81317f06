"""The ``replace`` recipe stage: :func:`netslim.compact.replace` with the stage's keys as its
:class:`~netslim.compact.api.ReplaceConfig`; the refit reads the training images (never the test set)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..pipeline.stages import StageContext, stage
from ..surgery import replace_module_
from .api import ReplaceConfig, replace
from .plan import BLOCKS

__all__ = ["ReplaceConfig", "replace_stage"]


def _restore(model: nn.Module, cfg: ReplaceConfig, artifacts: dict | None = None) -> nn.Module:
    """The replaced structure only, from the recorded blocks and widths (built from seeded random weights of
    the layer's shape); the stage's checkpoint then loads the real weights and channel orders."""
    generator = torch.Generator().manual_seed(0)
    for name, entry in (artifacts or {}).get("structure", {}).items():
        layer = copy.deepcopy(model.get_submodule(name))
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        extra = {"expand1x1": cfg.expand1x1} if entry["block"] == "fire" else {}
        replace_module_(model, name, BLOCKS[entry["block"]].build(layer, entry["width"], **extra))
    return model


@stage("replace", ReplaceConfig, restore=_restore)
def replace_stage(ctx: StageContext, cfg: ReplaceConfig) -> nn.Module:
    """Compact filters: k x k convs -> separable / BSConv-U / fire / CReLU blocks from their weights, refit."""
    result = replace(ctx.model, ctx.example_input, cfg, calib_data=ctx.data.train_plain if cfg.refit_images else None,
                     device=ctx.device, progress=ctx.progress, inplace=True)
    ctx.artifacts.update(result.details)
    ctx.artifacts["structure"] = {n: p.to_dict() for n, p in result.plan.layers.items() if p.skipped is None}
    ctx.artifacts["skipped"] = {n: p.skipped for n, p in result.plan.layers.items() if p.skipped}
    ctx.artifacts["notes"] = result.plan.markdown()
    return result.model
