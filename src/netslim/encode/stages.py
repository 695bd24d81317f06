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


PRECISIONS = ("float32", "float16", "bfloat16")


@dataclass
class EncodeConfig:
    """``coders``: entropy coders to try per stream (the smaller wins): huffman, ans.
    ``fold_dead_units``: zero the units a sparse model no longer uses and fold constant units into the next
    bias first (exact, verified: :func:`netslim.prune.dead_units.fold_dead_units_`). ``precision``: round every
    stored value (shared values and biases) to float16 or bfloat16 first, so the file stores 2 bytes per value;
    the model that is evaluated afterwards is the rounded one."""

    coders: list[str] = field(default_factory=lambda: ["huffman", "ans"])
    filename: str = "model.nsz"
    fold_dead_units: bool = False
    precision: str = "float32"

    def __post_init__(self) -> None:
        for c in self.coders:
            if c not in CODERS or c == "const":
                raise unknown_choice("coder", c, ("huffman", "ans"))
        if not isinstance(self.fold_dead_units, bool):
            raise NetslimError(f"fold_dead_units must be true or false, got {self.fold_dead_units!r}")
        if self.precision not in PRECISIONS:
            raise unknown_choice("precision", self.precision, PRECISIONS)


def _restore(model: nn.Module, cfg: EncodeConfig, artifacts: dict | None = None) -> nn.Module:
    return bake_parametrizations_(model)


@stage("encode", EncodeConfig, restore=_restore)
def encode(ctx: StageContext, cfg: EncodeConfig) -> nn.Module:
    """Entropy-coded sparse storage (Han et al. 2016 §4 and ANS); the decoded model must be bit-exact."""
    path = ctx.stage_dir / cfg.filename
    prepared = _prepare(ctx, cfg)
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
                               + prepared + report_table(reports, min_elements=1))
    return decoded


def _fresh_like(ctx: StageContext) -> nn.Module:
    """An unparametrized copy of the current model's structure to decode into."""
    from ..surgery import safe_deepcopy

    return safe_deepcopy(ctx.model)


def _prepare(ctx: StageContext, cfg: EncodeConfig) -> str:
    """Fold dead units and round the stored values as ``cfg`` asks; a note of what changed."""
    notes = []
    if cfg.fold_dead_units:
        from ..prune.dead_units import fold_dead_units_

        bake_parametrizations_(ctx.model)
        x = torch.stack([ctx.data.train_plain[i][0] for i in range(min(512, len(ctx.data.train_plain)))])
        report = fold_dead_units_(ctx.model, x.to(ctx.device))
        if report.applied:
            notes.append(f"Dead units zeroed: unused {report.unused}, constant folded into the next bias "
                         f"{report.constant}; {report.biases_zeroed} biases are now zero "
                         f"(largest output change on 512 training images: {report.max_output_change:.2e}).")
        else:
            notes.append("Dead units kept: folding them changed an output (the model is not a plain chain).")
    if cfg.precision != "float32":
        dtype = getattr(torch, cfg.precision)
        bake_parametrizations_(ctx.model)
        with torch.no_grad():
            for p in ctx.model.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(dtype).to(p.dtype))
        notes.append(f"Every stored value rounded to {cfg.precision}.")
    return "".join(n + "\n\n" for n in notes)
