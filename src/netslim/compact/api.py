"""``netslim.compact.replace(model, example_input, ReplaceConfig(...), calib_data=...)``: swap a trained
model's k x k convolutions for compact blocks initialised from their weights, then refit them on real
images; the same config object the ``replace`` recipe stage is built from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import image_batch
from ..errors import NetslimError, unknown_choice
from ..refit import REFIT_MODES, refit_heads_, working_copies
from ..targets import Target, parse_target
from ..train import default_device
from .plan import BLOCKS, TARGETS, ReplacementPlan, apply_plan_, plan_replacement, target_plan

SELECTORS = ("width", "target")


@dataclass
class ReplaceConfig:
    """``block``: ``separable`` (depthwise k x k + 1x1, rank = channel multiplier), ``bsconv`` (BSConv-U:
    1x1 + depthwise k x k, rank = blueprints per filter), ``fire`` (1x1 squeeze to ``width`` channels +
    concatenated 1x1 / k x k expand, ``expand1x1`` of the outputs from the 1x1) or ``crelu`` (half the
    filters and their negations; no width). ``selector``: ``width`` (``width`` everywhere: an integer, or
    a fraction of the full width: k^2 ranks for separable / bsconv, C_in channels for fire) or ``target``
    (the largest uniform width meeting ``target``: ``"macs:3"`` or ``"params:3"``). ``widths``: integers
    per layer. ``layers`` / ``exclude``: which layers (a name covers its submodules). ``refit_images``
    > 0: refit every block on that many training images so it reproduces the original layer's outputs
    (``refit_positions`` sampled output positions per image); ``refit_mode``: ``sequential`` (layer after
    layer) or ``one_pass`` (all layers from one forward pass: much faster on deep models)."""

    block: str = "separable"
    selector: str = "width"
    width: float | int = 1 / 3
    target: str | dict | None = None
    widths: dict[str, int] = field(default_factory=dict)
    expand1x1: float = 0.5
    layers: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    refit_images: int = 0
    refit_positions: int = 16
    refit_mode: str = "sequential"

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise unknown_choice("compact block", self.block, BLOCKS)
        if self.selector not in SELECTORS:
            raise unknown_choice("replace selector", self.selector, SELECTORS)
        parsed = self.parsed_target
        if self.selector == "target" and parsed is None:
            raise NetslimError("selector 'target' needs target, e.g. target: \"macs:3\"")
        if self.selector == "width" and parsed is not None:
            raise NetslimError("target is read by selector 'target'; with selector 'width' give width")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not (
                self.width >= 1 if isinstance(self.width, int) else 0 < self.width <= 1):
            raise NetslimError(f"width must be an integer >= 1 or a fraction in (0, 1], got {self.width!r}")
        if not 0 <= self.expand1x1 < 1:
            raise NetslimError(f"expand1x1 must be in [0, 1), got {self.expand1x1!r}")
        for name, w in self.widths.items():
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise NetslimError(f"widths[{name!r}] must be an integer >= 1, got {w!r}")
        if not isinstance(self.refit_images, int) or self.refit_images < 0:
            raise NetslimError(f"refit_images must be an integer >= 0, got {self.refit_images!r}")
        if self.refit_mode not in REFIT_MODES:
            raise unknown_choice("refit_mode", self.refit_mode, REFIT_MODES)
        if not isinstance(self.refit_positions, int) or self.refit_positions < 1:
            raise NetslimError(f"refit_positions must be an integer >= 1, got {self.refit_positions!r}")

    @property
    def parsed_target(self) -> Target | None:
        return parse_target(self.target, TARGETS, "replace target")


@dataclass
class ReplaceResult:
    """The model with compact blocks, the per-layer ``plan`` (skipped layers with their numbers) and
    ``details``: ``width`` (the fraction the target selector found), ``refit_relative_error``
    (``{layer: {"before", "after"}}``)."""

    model: nn.Module
    plan: ReplacementPlan
    details: dict[str, Any] = field(default_factory=dict)


def replace(model: nn.Module, example_input: torch.Tensor, config: ReplaceConfig | None = None, *,
            calib_data: Any = None, device: str | torch.device | None = None, progress: bool = True,
            inplace: bool = False) -> ReplaceResult:
    """Swap the chosen convolutions of ``model`` (a copy unless ``inplace``) for ``config.block`` blocks.

    ``calib_data``: training images for the refit (``config.refit_images`` of them; a tensor, a Dataset or
    a DataLoader of the *training* data, never the test set). ``device``: where the work runs (default
    :func:`netslim.train.default_device`)."""
    cfg = config or ReplaceConfig()
    if cfg.refit_images and calib_data is None:
        raise NetslimError(f"refit_images: {cfg.refit_images} needs calib_data (training images to refit on)")
    device = torch.device(device) if device is not None else default_device()
    work, reference = working_copies(model, device, inplace=inplace, keep_reference=bool(cfg.refit_images))
    x = example_input.to(device)
    details: dict[str, Any] = {}
    if cfg.selector == "target":
        plan, details["width"] = target_plan(work, x, cfg.block, cfg.parsed_target, tuple(cfg.layers),
                                             tuple(cfg.exclude), cfg.expand1x1)
    else:
        plan = plan_replacement(work, x, cfg.block, cfg.width, tuple(cfg.layers), tuple(cfg.exclude), cfg.widths,
                                cfg.expand1x1)
    if not plan.replaced:
        raise NetslimError(f"replace: no layer can take a {cfg.block} block here:\n{plan.markdown()}")
    apply_plan_(work, plan, cfg.expand1x1)
    if cfg.refit_images:
        images = image_batch(calib_data, cfg.refit_images, seed=2).to(device)
        heads = BLOCKS[cfg.block].heads
        errors = refit_heads_(work, reference.to(device), images, plan.replaced, heads, cfg.refit_positions,
                              progress=progress, sequential=cfg.refit_mode == "sequential")
        details["refit_relative_error"] = {n: {"before": b, "after": a} for n, (b, a) in errors.items()}
    return ReplaceResult(work, plan, details)


def replace_(model: nn.Module, example_input: torch.Tensor, config: ReplaceConfig | None = None, **kwargs) -> nn.Module:
    """:func:`replace` in place; returns the model."""
    return replace(model, example_input, config, inplace=True, **kwargs).model


__all__ = ["ReplaceConfig", "ReplaceResult", "replace", "replace_", "SELECTORS"]
