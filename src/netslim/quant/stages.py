"""The ``quantize`` recipe stage.

Methods: ``kmeans`` weight sharing and ``hash`` (HashedNets); ``ptq``: post-training quantization
to ``weight_bits`` / ``act_bits`` with a calibrator, optional CLE, bias correction, AdaRound, and
mixed precision under a size budget; ``binary`` / ``ternary`` weights; ``inq`` (incremental
power-of-two weights, trained inside the stage). A ``finetune`` stage after ``ptq`` is
quantization-aware training (straight-through); ``learn: lsq`` or ``pact`` lets it train the steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..errors import NetslimError, unknown_choice
from ..pipeline.stages import StageContext, stage
from ..train import TrainConfig
from .calibrate import CALIBRATORS
from .kmeans import INITS, restore_shared_, share_weights_, shareable_layers

QUANT_METHODS = ("kmeans", "hash", "ptq", "binary", "ternary", "inq")


@dataclass
class QuantizeConfig:
    """Weight sharing: ``conv_bits`` / ``fc_bits`` give 2**bits shared values per layer (Deep Compression:
    8 and 5), ``init`` the k-means initialisation. ``ptq``: ``weight_bits``, ``act_bits``, ``per_channel``,
    ``calibrator`` (minmax, moving_average, percentile, mse, kl, aciq), ``weight_range`` (minmax, mse),
    ``cle``, ``bias_correction`` (none, empirical, data_free), ``adaround``, ``size_budget`` (a fraction of
    the all-``weight_bits`` weight size: mixed precision), ``learn`` (ste, lsq, pact: what a following
    finetune trains). ``inq``: ``inq_bits`` and ``train`` (TrainConfig fields for each portion)."""

    method: str = "kmeans"
    conv_bits: int = 8
    fc_bits: int = 5
    init: str = "linear"
    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    calibrator: str = "minmax"
    weight_range: str = "minmax"
    cle: bool = False
    relu6_to_relu: bool = False
    bias_correction: str = "none"
    adaround: bool = False
    adaround_iters: int = 1000
    size_budget: float | None = None
    learn: str = "ste"
    inq_bits: int = 5
    train: dict = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise unknown_choice("quantize method", self.method, QUANT_METHODS)
        if self.init not in INITS:
            raise unknown_choice("k-means init", self.init, INITS)
        if self.calibrator not in CALIBRATORS:
            raise unknown_choice("calibrator", self.calibrator, CALIBRATORS)
        if self.learn not in ("ste", "lsq", "pact"):
            raise unknown_choice("QAT learner", self.learn, ("ste", "lsq", "pact"))
        for name in ("conv_bits", "fc_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 1 <= bits <= 16:
                raise ValueError(f"{name} must be an integer in 1..16, got {bits!r}")
        if self.size_budget is not None and not 0 < self.size_budget <= 1:
            raise ValueError(f"size_budget must be a fraction in (0, 1], got {self.size_budget}")
        self.ptq_config()  # validates the PTQ fields
        TrainConfig(**self.train)

    def ptq_config(self, layer_bits: dict[str, int] | None = None):
        from .ptq import QuantConfig
        return QuantConfig(weight_bits=self.weight_bits, act_bits=self.act_bits, per_channel=self.per_channel,
                           weight_range=self.weight_range, calibrator=self.calibrator, cle=self.cle,
                           relu6_to_relu=self.relu6_to_relu, bias_correction=self.bias_correction,
                           adaround=self.adaround, adaround_iters=self.adaround_iters,
                           layer_bits=dict(layer_bits or {}), exclude=list(self.exclude))


def _restore(model: nn.Module, cfg: QuantizeConfig, artifacts: dict | None = None) -> nn.Module:
    artifacts = artifacts or {}
    if cfg.method in ("kmeans", "hash"):
        return restore_shared_(model, cfg.conv_bits, cfg.fc_bits, tuple(cfg.exclude))
    if cfg.method in ("binary", "ternary"):
        from .lowbit import lowbit_weights_
        lowbit_weights_(model, cfg.method, tuple(cfg.exclude))
        return model
    if cfg.method == "inq":
        return model
    from .ptq import rebuild_quantized
    shape = artifacts.get("input_shape")
    if not shape:
        raise NetslimError("cannot restore a ptq stage: its run state has no input shape")
    return rebuild_quantized(model, shape, cfg.ptq_config(artifacts.get("layer_bits")), cfg.learn)


@stage("quantize", QuantizeConfig, restore=_restore)
def quantize(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    """Weight sharing (k-means, hashing), post-training quantization, binary/ternary or INQ weights."""
    if cfg.method in ("kmeans", "hash"):
        return _share(ctx, cfg)
    if cfg.method in ("binary", "ternary"):
        from .lowbit import lowbit_weights_
        names = lowbit_weights_(ctx.model, cfg.method, tuple(cfg.exclude))
        ctx.artifacts["notes"] = f"{cfg.method} weights on {len(names)} layers (first and last stay float); fine-tune next."
        return ctx.model
    if cfg.method == "inq":
        from .lowbit import inq_train
        inq_train(ctx.model, ctx.data.train, TrainConfig(**cfg.train), bits=cfg.inq_bits, exclude=tuple(cfg.exclude),
                  device=ctx.device, progress=ctx.progress)
        ctx.artifacts["notes"] = f"INQ: every weight a power of two or zero ({cfg.inq_bits} bits)."
        return ctx.model
    return _ptq(ctx, cfg)


def _share(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    share_weights_(ctx.model, cfg.conv_bits, cfg.fc_bits, cfg.method, cfg.init, tuple(cfg.exclude), cfg.seed)
    layers = shareable_layers(ctx.model, tuple(cfg.exclude))
    ctx.artifacts["notes"] = (f"{cfg.method} weight sharing, conv {cfg.conv_bits} bits, fc {cfg.fc_bits} bits "
                              f"({cfg.init} init) on {len(layers)} layers; fine-tune after it to train the centroids.")
    return ctx.model


def _ptq(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    from .mixed import layer_sensitivity, plan_bits
    from .ptq import quantize as ptq
    from .qat import make_learnable_

    calib = DataLoader(ctx.data.calib, batch_size=64)
    layer_bits, notes = {}, []
    if cfg.size_budget is not None:
        probe = ptq(ctx.model, ctx.example_input, calib, cfg.ptq_config(), device=ctx.device)
        images = [x.to(ctx.device) for x, _ in DataLoader(Subset(ctx.data.calib, range(min(256, len(ctx.data.calib)))),
                                                           batch_size=64)]
        table = layer_sensitivity(probe, images, widths=tuple(b for b in (2, 3, 4, 6, 8) if b <= cfg.weight_bits))
        full = sum(p.parametrizations.weight.original.numel() for p in probe.modules()
                   if hasattr(p, "parametrizations") and "weight" in p.parametrizations) * cfg.weight_bits // 8
        plan = plan_bits(probe, table, int(full * cfg.size_budget))
        layer_bits = plan.bits
        notes.append(f"mixed precision under {cfg.size_budget:.0%} of the {cfg.weight_bits}-bit weight size:\n\n{plan.table()}")
    qmodel = ptq(ctx.model, ctx.example_input, calib, cfg.ptq_config(layer_bits), device=ctx.device)
    make_learnable_(qmodel, cfg.learn)
    from .pack import save_quantized
    stored = save_quantized(qmodel, ctx.stage_dir / "model.nsq").stat().st_size
    ctx.artifacts.update(input_shape=list(ctx.example_input.shape), layer_bits=layer_bits, stored_bytes=stored)
    ctx.artifacts["notes"] = "\n\n".join([f"PTQ W{cfg.weight_bits}A{cfg.act_bits} ({cfg.calibrator} calibration, "
                                          f"{'per-channel' if cfg.per_channel else 'per-tensor'} weights); packed weights in model.nsq, "
                                          f"{stored:,} bytes. Latency here is the float simulation's; the integer model "
                                          f"runs in onnxruntime (netslim.quant.to_onnx_qdq).", *notes])
    return qmodel
