"""The ``prune_channels`` recipe stage: structured pruning, one-shot, iterative, SFP or reconstruction."""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...errors import NetslimError, unknown_choice
from ...pipeline.stages import StageContext, stage
from ...train import TrainConfig, fit
from ...targets import check_scope, parse_target
from .api import TARGET_METRICS, structured
from .criteria import CRITERIA, SlimmingRegularizer
from .reconstruct import reconstruct_prune
from .serialize import apply_structure_, structure_of
from .soft import soft_filter_prune

METHODS = ("oneshot", "iterative", "sfp", "reconstruct")


@dataclass
class ChannelPruneConfig:
    """The keyword arguments of :func:`netslim.prune.structured` under the same names (``ratio`` of
    channels to remove, ``ratios`` per layer overriding it, or ``target`` such as ``"macs:2"``: macs, params, size, latency; ``criterion``,
    ``scope``, ``round_to``, ``min_keep``, ``exclude``, ``seed``, ``calib_batches`` of training data
    for ``taylor``; ``round_to: measured`` times the rounding candidates on ``latency_device`` -- ``ort-cpu``,
    ``torch-cpu`` or ``torch-cuda`` -- at ``latency_batch`` with ``latency_threads``), and: ``method``: ``oneshot``; ``iterative`` (``steps`` rounds of prune + fine-tune
    with ``train``); ``sfp`` (Soft Filter Pruning during ``train``); ``reconstruct`` (He 2017, no
    fine-tuning, on ``calib_images`` training images). ``refit_images`` > 0 (``oneshot``): the layers that lost
    input channels re-solved by least squares on that many training images (``refit_mode``: ``local``,
    ``sequential`` or ``one_pass``; see :mod:`.refit`). ``slimming_l1`` > 0 first trains with an L1
    penalty on BatchNorm scales (Network Slimming) for ``train``'s epochs. ``train``: the fields of the
    ``finetune`` stage, for the training these need. ``data_batches`` and ``calibration_images`` are the
    deprecated names of ``calib_batches`` and ``calib_images``."""

    ratio: float = 0.5
    ratios: dict[str, float] = field(default_factory=dict)
    target: str | None = None
    criterion: str = "l1"
    method: str = "oneshot"
    scope: str = "uniform"
    round_to: int | str = 1
    latency_device: str | None = None
    latency_batch: int = 1
    latency_threads: int = 1
    min_keep: float = 0.1
    exclude: list[str] = field(default_factory=list)
    steps: int = 3
    slimming_l1: float = 0.0
    calib_batches: int = 8
    calib_images: int = 256
    refit_images: int = 0
    refit_mode: str = "local"
    seed: int = 0
    train: dict = field(default_factory=dict)
    data_batches: int | None = field(default=None, metadata={"deprecated": "calib_batches"})
    calibration_images: int | None = field(default=None, metadata={"deprecated": "calib_images"})

    def __post_init__(self) -> None:
        for old, new in (("data_batches", "calib_batches"), ("calibration_images", "calib_images")):
            if getattr(self, old) is not None:
                warnings.warn(f"prune_channels: {old} is deprecated; write {new}", DeprecationWarning, stacklevel=3)
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.criterion not in CRITERIA:
            raise unknown_choice("criterion", self.criterion, CRITERIA)
        if self.method not in METHODS:
            raise unknown_choice("method", self.method, METHODS)
        self.scope = check_scope(self.scope)
        if not 0 <= self.ratio < 1:
            raise NetslimError(f"ratio must be in [0, 1), got {self.ratio}")
        parse_target(self.target, TARGET_METRICS, "prune_channels target")
        self._check_rounding()
        from .refit import check_refit
        check_refit(self.refit_images, self.refit_mode, calib_data=True)
        if self.refit_images and self.method != "oneshot":
            raise NetslimError(f"refit_images needs method 'oneshot' (got {self.method!r})")
        valid = {f.name for f in fields(TrainConfig)}
        unknown = set(self.train) - valid
        if unknown:
            raise NetslimError(f"unknown key(s) {sorted(unknown)} in train; valid keys: {', '.join(sorted(valid))}")
        self.train_config = TrainConfig(**self.train)

    def _check_rounding(self) -> None:
        from .api import _check_round_to

        if _check_round_to(self.round_to) and self.method != "oneshot":
            raise NetslimError(f"round_to: measured needs method 'oneshot' (got {self.method!r}): it times candidate "
                               "models, so a resumed multi-round stage could not rebuild the same structure")
        if self.latency_device is not None:
            self.device_for_rounding()

    def device_for_rounding(self):
        """The :class:`netslim.search.cost.Device` ``round_to: measured`` times on (None: structured's default)."""
        if self.latency_device is None:
            return None
        from ...search.cost import Device
        return Device(self.latency_device, self.latency_threads, self.latency_batch)

    def structured_options(self) -> dict:
        """The fields that are keyword arguments of :func:`structured`, joined by name (no copied list)."""
        params = inspect.signature(structured).parameters
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in params}


def _restore(model: nn.Module, cfg: ChannelPruneConfig, artifacts: dict | None = None) -> nn.Module:
    return apply_structure_(model, (artifacts or {})["structure"])


def _loader(ctx: StageContext, cfg: ChannelPruneConfig) -> DataLoader:
    return DataLoader(ctx.data.train_plain, batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(cfg.seed))


def _prune(model, ctx, cfg, target, ratio):
    options = {**cfg.structured_options(), "ratio": ratio, "target": target,
               "latency_device": cfg.device_for_rounding()}
    calib = _loader(ctx, cfg) if cfg.criterion == "taylor" else (ctx.data.train_plain if cfg.refit_images else None)
    return structured(model.cpu(), ctx.example_input, **options, calib_data=calib)


def _iterative(ctx: StageContext, cfg: ChannelPruneConfig) -> nn.Module:
    """``steps`` rounds, each removing an equal share (geometrically) of the goal, then fine-tuning."""
    parsed = parse_target(cfg.target, TARGET_METRICS)
    model = ctx.model
    for i in range(cfg.steps):
        if parsed is not None:
            model = _prune(model, ctx, cfg, parsed.root(cfg.steps), cfg.ratio)
        else:
            model = _prune(model, ctx, cfg, None, 1 - (1 - cfg.ratio) ** (1 / cfg.steps))
        # one checkpoint per round: pruning is deterministic, so a restarted stage prunes to the same structure
        # and its round's fine-tuning resumes per epoch (a finished round reloads its weights without training)
        fit(model, ctx.data.train, cfg.train_config, device=ctx.device, progress=ctx.progress,
            checkpoint_path=ctx.stage_dir / f"round{i + 1}.ckpt")
    return model


@stage("prune_channels", ChannelPruneConfig, restore=_restore)
def prune_channels(ctx: StageContext, cfg: ChannelPruneConfig) -> nn.Module:
    """Structured pruning: remove whole channels through the dependency graph (dense, really faster)."""
    model = ctx.model
    if cfg.slimming_l1 > 0:
        fit(model, ctx.data.train, cfg.train_config, hooks=[SlimmingRegularizer(cfg.slimming_l1)], device=ctx.device,
            progress=ctx.progress, checkpoint_path=ctx.stage_dir / "slimming.ckpt")
    if cfg.method == "oneshot":
        model = _prune(model, ctx, cfg, cfg.target, cfg.ratio)
    elif cfg.method == "iterative":
        model = _iterative(ctx, cfg)
    elif cfg.method == "sfp":
        model = soft_filter_prune(model, ctx.example_input.to(ctx.device), ctx.data.train, cfg.train_config,
                                  cfg.ratio, cfg.target, cfg.criterion if cfg.criterion != "taylor" else "l2",
                                  cfg.scope, cfg.round_to, device=ctx.device, progress=ctx.progress,
                                  checkpoint_path=ctx.stage_dir / "sfp.ckpt")
    else:
        model = reconstruct_prune(model.cpu(), ctx.example_input.cpu(), ctx.data.train_plain, cfg.ratio, cfg.target,
                                  seed=cfg.seed, calib_images=cfg.calib_images)
    ctx.artifacts["structure"] = structure_of(model)
    ctx.artifacts["notes"] = _channel_table(ctx.original, model)
    return model


def _channel_table(original: nn.Module, pruned: nn.Module) -> str:
    before = {n: m.out_channels for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    rows = [f"| {n} | {before[n]} | {m.out_channels} |" for n, m in pruned.named_modules()
            if isinstance(m, nn.Conv2d) and n in before and m.out_channels != before[n]]
    return "\n".join(["| conv | channels before | after |", "|---|---|---|", *rows]) if rows else "no channel removed"
