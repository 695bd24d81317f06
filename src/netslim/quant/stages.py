"""The ``quantize`` recipe stage.

Methods: ``kmeans`` weight sharing and ``hash`` (HashedNets); ``ptq``: post-training quantization
to ``weight_bits`` / ``act_bits`` with a calibrator, optional CLE, bias correction, AdaRound, and
mixed precision under a size budget; ``binary`` / ``ternary`` weights; ``inq`` (incremental
power-of-two weights, trained inside the stage); ``soft_sharing`` (Ullrich et al. 2017: retraining
under a learned Gaussian mixture prior, then zeros and shared values from its means, trained inside
the stage). A ``finetune`` stage after ``ptq`` is quantization-aware training (straight-through);
``learn: lsq`` or ``pact`` lets it train the steps.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..errors import NetslimError, unknown_choice
from ..pipeline.stages import StageContext, stage
from ..train import TrainConfig
from .kmeans import INITS, restore_shared_, share_weights_, shareable_layers
from .ptq import QuantConfig
from .qat import LEARNERS
from .soft_sharing import PRECISION_PRIOR, PRECISION_PRIOR_ZERO, SoftSharingConfig

QUANT_METHODS = ("kmeans", "hash", "ptq", "binary", "ternary", "inq", "soft_sharing")
# the fields only method soft_sharing reads (it reads exclude and train too)
SOFT_SHARING_FIELDS = ("components", "pi_zero", "tau", "init_std", "lr_means", "lr_log_precisions", "lr_mixing",
                       "precision_prior_zero", "precision_prior", "merge_threshold", "include_bias")


@dataclass
class QuantizeConfig(QuantConfig):
    """Every :class:`~netslim.quant.ptq.QuantConfig` field (``method: ptq`` passes them to
    :func:`netslim.quant.quantize` as they are: ``weight_bits``, ``act_bits``, ``calibrator``, ...,
    ``target: "size:N"`` for mixed precision), and: ``method``; weight sharing's ``conv_bits`` /
    ``fc_bits`` (2**bits shared values per layer; Deep Compression: 8 and 5) and ``init`` (k-means
    initialisation), or ``max_drop`` (points of top-1): each layer gets the fewest bits keeping top-1 on
    ``held_out`` training images within it (:mod:`netslim.quant.precision`); ``learn`` (ste, lsq, pact: what a following finetune trains, as in
    :func:`netslim.quant.quantization_aware_training`); ``inq``: ``inq_bits`` and ``train`` (TrainConfig
    fields for each portion); ``soft_sharing``: every :class:`~netslim.quant.soft_sharing.SoftSharingConfig`
    field (``components``, ``pi_zero``, ``tau``, ``init_std``, ``lr_means``, ``lr_log_precisions``,
    ``lr_mixing``, ``precision_prior_zero``, ``precision_prior``, ``merge_threshold``, ``include_bias``,
    ``exclude``, and ``train``: TrainConfig fields over the retraining's defaults); ``seed``.
    ``size_budget`` (a fraction of the all-``weight_bits`` weight size) is the deprecated form of
    ``target``: ``size_budget: 0.5`` at 8 bits is ``target: "size:8"``."""

    method: str = "kmeans"
    conv_bits: int = 8
    fc_bits: int = 5
    max_drop: float | None = None
    held_out: int = 10000
    init: str = "linear"
    learn: str = "ste"
    inq_bits: int = 5
    train: dict = field(default_factory=dict)
    seed: int = 0
    size_budget: float | None = field(default=None, metadata={"deprecated": "target"})
    components: int = SoftSharingConfig.components
    pi_zero: float = SoftSharingConfig.pi_zero
    tau: float = SoftSharingConfig.tau
    init_std: float | None = SoftSharingConfig.init_std
    lr_means: float = SoftSharingConfig.lr_means
    lr_log_precisions: float = SoftSharingConfig.lr_log_precisions
    lr_mixing: float = SoftSharingConfig.lr_mixing
    precision_prior_zero: list[float] = field(default_factory=lambda: list(PRECISION_PRIOR_ZERO))
    precision_prior: list[float] = field(default_factory=lambda: list(PRECISION_PRIOR))
    merge_threshold: float = SoftSharingConfig.merge_threshold
    include_bias: bool = SoftSharingConfig.include_bias

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise unknown_choice("quantize method", self.method, QUANT_METHODS)
        if self.init not in INITS:
            raise unknown_choice("k-means init", self.init, INITS)
        if self.learn not in LEARNERS:
            raise unknown_choice("QAT learner", self.learn, LEARNERS)
        if self.max_drop is not None:
            if self.method != "kmeans":
                raise NetslimError(f"max_drop (per-layer bits chosen from data) applies to method 'kmeans' only, "
                                   f"not {self.method!r}")
            if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) \
                    or not 0 <= self.max_drop < 100:
                raise NetslimError(f"max_drop must be points of top-1 in [0, 100), got {self.max_drop!r}")
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, int) or self.held_out < 1:
            raise NetslimError(f"held_out must be a positive number of training images, got {self.held_out!r}")
        for name in ("conv_bits", "fc_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 1 <= bits <= 16:
                raise NetslimError(f"{name} must be an integer in 1..16, got {bits!r}")
        if self.size_budget is not None:
            if not isinstance(self.size_budget, (int, float)) or not 0 < self.size_budget <= 1:
                raise NetslimError(f"size_budget must be a fraction in (0, 1], got {self.size_budget!r}")
            if self.target is not None:
                raise NetslimError("give target: \"size:N\" or the deprecated size_budget, not both")
            factor = 32 / (self.weight_bits * self.size_budget)
            warnings.warn(f"quantize: size_budget: {self.size_budget} is deprecated; write target: \"size:{factor:.4g}\" "
                          f"(N times fewer weight bytes than float32)", DeprecationWarning, stacklevel=3)
            self.target, self.size_budget = {"size": factor}, None
        super().__post_init__()  # validates the PTQ fields
        if self.target is not None and self.method != "ptq":
            raise NetslimError(f"target (mixed precision) needs method 'ptq', not {self.method!r}")
        if self.method == "soft_sharing":
            checked = self.soft_sharing_config()  # validates its fields, train over the retraining's defaults
            self.precision_prior_zero, self.precision_prior = checked.precision_prior_zero, checked.precision_prior
            return
        defaults = SoftSharingConfig()
        for name in SOFT_SHARING_FIELDS:
            value = getattr(self, name)
            if (list(value) if isinstance(value, tuple) else value) != getattr(defaults, name):
                raise NetslimError(f"{name} applies to method 'soft_sharing' only, not {self.method!r}")
        TrainConfig(**self.train)

    def soft_sharing_config(self) -> SoftSharingConfig:
        """The :class:`SoftSharingConfig` of this stage: its fields of the same names."""
        return SoftSharingConfig(**{f.name: getattr(self, f.name) for f in fields(SoftSharingConfig)})

    def ptq_config(self, layer_bits: dict[str, int] | None = None) -> QuantConfig:
        """This config with the widths a size target chose (recorded by the stage) fixed."""
        return replace(self, layer_bits=dict(layer_bits or self.layer_bits), target=None) if layer_bits else self


def _restore(model: nn.Module, cfg: QuantizeConfig, artifacts: dict | None = None) -> nn.Module:
    artifacts = artifacts or {}
    if cfg.method == "soft_sharing":
        from .soft_sharing import restore_soft_shared_
        if "codebook_sizes" not in artifacts:
            raise NetslimError("cannot restore a soft_sharing stage: its run state has no codebook sizes")
        return restore_soft_shared_(model, artifacts["codebook_sizes"])
    if cfg.method == "kmeans" and cfg.max_drop is not None:
        from .precision import restore_shared_bits_
        if "sharing_bits" not in artifacts:
            raise NetslimError("cannot restore a kmeans stage with max_drop: its run state has no chosen bits")
        return restore_shared_bits_(model, artifacts["sharing_bits"])
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
    """Weight sharing (k-means, hashing, soft), post-training quantization, binary/ternary or INQ weights."""
    if cfg.method in ("kmeans", "hash"):
        return _share(ctx, cfg)
    if cfg.method == "soft_sharing":
        return _soft_share(ctx, cfg)
    if cfg.method in ("binary", "ternary"):
        from .lowbit import lowbit_layer_names, lowbit_weights_
        names = lowbit_layer_names(lowbit_weights_(ctx.model, cfg.method, tuple(cfg.exclude)))
        ctx.artifacts["notes"] = f"{cfg.method} weights on {len(names)} layers (first and last stay float); fine-tune next."
        return ctx.model
    if cfg.method == "inq":
        from .lowbit import inq_train
        inq_train(ctx.model, ctx.data.train, TrainConfig(**cfg.train), bits=cfg.inq_bits, exclude=tuple(cfg.exclude),
                  device=ctx.device, progress=ctx.progress, checkpoint_dir=ctx.stage_dir)
        ctx.artifacts["notes"] = f"INQ: every weight a power of two or zero ({cfg.inq_bits} bits)."
        return ctx.model
    return _ptq(ctx, cfg)


def _share(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    if cfg.max_drop is not None:
        return _share_chosen_bits(ctx, cfg)
    share_weights_(ctx.model, cfg.conv_bits, cfg.fc_bits, cfg.method, cfg.init, tuple(cfg.exclude), cfg.seed)
    layers = shareable_layers(ctx.model, tuple(cfg.exclude))
    ctx.artifacts["notes"] = (f"{cfg.method} weight sharing, conv {cfg.conv_bits} bits, fc {cfg.fc_bits} bits "
                              f"({cfg.init} init) on {len(layers)} layers; fine-tune after it to train the centroids.")
    return ctx.model


def _share_chosen_bits(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    """k-means sharing with each layer's bits chosen on held-out training images (:mod:`netslim.quant.precision`)."""
    from ..surgery import bake_parametrizations_
    from .precision import choose_sharing_bits, share_with_bits_

    train = ctx.data.train_plain
    g = torch.Generator().manual_seed(cfg.seed)
    held_out = Subset(train, torch.randperm(len(train), generator=g)[:cfg.held_out].tolist())
    bake_parametrizations_(ctx.model)
    choice = choose_sharing_bits(ctx.model, held_out, max_drop=cfg.max_drop, exclude=tuple(cfg.exclude),
                                 init=cfg.init, seed=cfg.seed, device=ctx.device)
    share_with_bits_(ctx.model, choice.bits, cfg.init, cfg.seed)
    ctx.artifacts["sharing_bits"] = dict(choice.bits)
    ctx.artifacts["notes"] = (
        f"k-means weight sharing, each layer at the fewest bits keeping top-1 on {len(held_out):,} held-out training "
        f"images within {cfg.max_drop} points of the unshared model ({choice.reference_top1:.2%} -> "
        f"{choice.final_top1:.2%}); fine-tune after it to train the centroids.\n\n{choice.markdown()}")
    return ctx.model


def _soft_share(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    from .soft_sharing import soft_weight_sharing_

    report = soft_weight_sharing_(ctx.model, ctx.data.train, cfg.soft_sharing_config(), device=ctx.device,
                                  progress=ctx.progress, checkpoint_path=ctx.stage_dir / "train.ckpt")
    ctx.artifacts["codebook_sizes"] = dict(report.distinct)
    last = report.history[-1] if report.history else {}
    trained = f"{len(report.history)} epoch(s) of retraining"
    if last:
        trained += f", last train loss {last['train_loss']:.4f}"
    if "complexity" in last:
        trained += f", -log prior {last['complexity']:.4g}"
    ctx.artifacts["notes"] = (
        f"soft weight-sharing (Ullrich et al. 2017): {report.components} components, {report.merged_components} "
        f"after merging (KL < {cfg.merge_threshold:g}); {trained}; {report.total_sparsity:.2%} of the shared "
        f"weights are zero. Means (float16): {', '.join(f'{m:.4g}' for m in report.means)}.\n\n{report.table()}")
    return ctx.model


def _ptq(ctx: StageContext, cfg: QuantizeConfig) -> nn.Module:
    from .ptq import quantize as ptq
    from .qat import make_learnable_

    qmodel = ptq(ctx.model, ctx.example_input, DataLoader(ctx.data.calib, batch_size=64), cfg, device=ctx.device)
    make_learnable_(qmodel, cfg.learn)
    plan = qmodel.netslim_bit_plan
    layer_bits = plan.bits if plan is not None else {}
    notes = [] if plan is None else [f"mixed precision for {cfg.size_target} (weights {plan.weight_bytes:,} bytes, "
                                     f"budget {plan.budget_bytes:,}):\n\n{plan.table()}"]
    from .pack import save_quantized
    stored = save_quantized(qmodel, ctx.stage_dir / "model.nsq").stat().st_size
    ctx.artifacts.update(input_shape=list(ctx.example_input.shape), layer_bits=layer_bits, stored_bytes=stored)
    ctx.artifacts["notes"] = "\n\n".join([f"PTQ W{cfg.weight_bits}A{cfg.act_bits} ({cfg.calibrator} calibration, "
                                          f"{'per-channel' if cfg.per_channel else 'per-tensor'} weights); packed weights in model.nsq, "
                                          f"{stored:,} bytes. Latency here is the float simulation's; the integer model "
                                          f"runs in onnxruntime (netslim.quant.to_onnx_qdq).", *notes])
    return qmodel
