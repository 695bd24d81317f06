"""The ``decompose`` recipe stage: :func:`netslim.lowrank.decompose` with the stage's keys as its
:class:`~netslim.lowrank.api.DecomposeConfig`."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..pipeline.stages import StageContext, stage
from ..surgery import replace_module_
from .api import DecomposeConfig, decompose
from .apply import build

__all__ = ["DecomposeConfig", "decompose_stage"]


def _restore(model: nn.Module, cfg: DecomposeConfig, artifacts: dict | None = None) -> nn.Module:
    """The decomposed structure only: the factors are built from seeded random weights of the layer's shape
    (the layer may hold uninitialised values, e.g. after a pruned structure was replayed); the stage's
    checkpoint then loads the real factors."""
    generator = torch.Generator().manual_seed(0)
    for name, entry in (artifacts or {}).get("structure", {}).items():
        rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
        layer = copy.deepcopy(model.get_submodule(name))
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        replace_module_(model, name, build(layer, entry["method"], rank, cfg.batchnorm))
    return model


@stage("decompose", DecomposeConfig, restore=_restore)
def decompose_stage(ctx: StageContext, cfg: DecomposeConfig) -> nn.Module:
    """Low-rank factorization: SVD, spatial k x 1 / 1 x k, CP, Tucker-2 (skips layers where it would not pay)."""
    result = decompose(ctx.model, ctx.example_input, cfg,
                       eval_data=ctx.data.train_plain if cfg.selector == "target" else None,
                       calib_data=ctx.data.train_plain if cfg.refit_images else None, device=ctx.device,
                       progress=ctx.progress, inplace=True)
    ctx.artifacts.update(result.details)
    ctx.artifacts["structure"] = {n: p.to_dict() for n, p in result.report.layers.items() if p.skipped is None}
    ctx.artifacts["notes"] = result.report.markdown()
    return result.model
