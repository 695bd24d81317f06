"""The ``quantize`` recipe stage. Methods: ``kmeans`` weight sharing and ``hash`` (HashedNets)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import unknown_choice
from ..pipeline.stages import StageContext, stage
from .kmeans import INITS, restore_shared_, share_weights_, shareable_layers

QUANT_METHODS = ("kmeans", "hash")


@dataclass
class QuantizeConfig:
    """``conv_bits`` / ``fc_bits``: 2**bits shared values per layer for its non-zero weights
    (Deep Compression: 8 and 5); ``init``: k-means initialisation (linear, density, random)."""

    method: str = "kmeans"
    conv_bits: int = 8
    fc_bits: int = 5
    init: str = "linear"
    exclude: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise unknown_choice("quantize method", self.method, QUANT_METHODS)
        if self.init not in INITS:
            raise unknown_choice("k-means init", self.init, INITS)
        for name in ("conv_bits", "fc_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 1 <= bits <= 16:
                raise ValueError(f"{name} must be an integer in 1..16, got {bits!r}")


def _restore(model: nn.Module, cfg: QuantizeConfig, artifacts: dict | None = None) -> nn.Module:
    return restore_shared_(model, cfg.conv_bits, cfg.fc_bits, tuple(cfg.exclude))


@stage("quantize", QuantizeConfig, restore=_restore)
def quantize(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    """Weight sharing: k-means (Han et al. 2016 §3) or hashed (Chen et al. 2015); zeros stay zero."""
    share_weights_(ctx.model, cfg.conv_bits, cfg.fc_bits, cfg.method, cfg.init, tuple(cfg.exclude), cfg.seed)
    layers = shareable_layers(ctx.model, tuple(cfg.exclude))
    ctx.artifacts["notes"] = (f"{cfg.method} weight sharing, conv {cfg.conv_bits} bits, fc {cfg.fc_bits} bits "
                              f"({cfg.init} init) on {len(layers)} layers; fine-tune after it to train the centroids.")
    return ctx.model
