"""The ``encode`` recipe stage: write the model as ``.nsz`` and continue with the decoded model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NetslimError, unknown_choice
from ..pipeline.stages import StageContext, stage
from ..surgery import bake_parametrizations_
from . import load, report_table, save
from .entropy import CODERS


@dataclass
class EncodeConfig:
    """``coders``: entropy coders to try per stream (the smaller wins): huffman, ans."""

    coders: list[str] = field(default_factory=lambda: ["huffman", "ans"])
    filename: str = "model.nsz"

    def __post_init__(self) -> None:
        for c in self.coders:
            if c not in CODERS or c == "const":
                raise unknown_choice("coder", c, ("huffman", "ans"))


def _restore(model: nn.Module, cfg: EncodeConfig, artifacts: dict | None = None) -> nn.Module:
    return bake_parametrizations_(model)


@stage("encode", EncodeConfig, restore=_restore)
def encode(ctx: StageContext, cfg: EncodeConfig) -> nn.Module:
    """Entropy-coded sparse storage (Han et al. 2016 §4 and ANS); the decoded model must be bit-exact."""
    path = ctx.stage_dir / cfg.filename
    reports = save(ctx.model, path, arch=ctx.model_name, num_classes=ctx.num_classes, coders=tuple(cfg.coders))
    decoded = load(path, bake_parametrizations_(_fresh_like(ctx)))
    ctx.model.eval()
    decoded.eval().to(ctx.device)
    x = torch.stack([ctx.data.test[i][0] for i in range(min(256, len(ctx.data.test)))]).to(ctx.device)
    with torch.no_grad():
        if not torch.equal(ctx.model(x), decoded(x)):
            raise NetslimError(f"{path}: decoded model differs from the encoded one")
    size = path.stat().st_size
    index_bytes = sum(r.index_bits for r in reports) // 8
    ctx.artifacts.update(stored_bytes=size, index_bytes=index_bytes, nsz=str(path),
                         notes=f"`{path.name}`: {size:,} bytes, of which sparse indices {index_bytes:,}.\n\n"
                               + report_table(reports, min_elements=64))
    return decoded


def _fresh_like(ctx: StageContext) -> nn.Module:
    """An unparametrized copy of the current model's structure to decode into."""
    from ..surgery import safe_deepcopy

    return safe_deepcopy(ctx.model)
