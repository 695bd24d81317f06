"""From a candidate of the search space to a compressed model, through the public API of each family.

The order is the recipe's: channels removed (:func:`netslim.prune.structured` with per-layer ``ratios``,
the layers reading removed channels re-solved by least squares on training images, He et al. 2017),
k x k convolutions factorized (:func:`netslim.lowrank.decompose`, fixed ranks) and swapped for compact
blocks (:func:`netslim.compact.replace`, fixed widths), each refit on training images; BatchNorm
statistics re-estimated on training images (the cheap repair of Li et al. 2020, "EagleEye"); then
post-training quantization calibrated on training images (:func:`netslim.quant.quantize`). Each step is
the one the written recipe runs, with the same options (:func:`stage_options`), so the recipe rebuilds
the model the search chose.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..surgery import safe_deepcopy
from .space import SearchSpace

log = logging.getLogger("netslim.search")


def plan_of(space: SearchSpace, candidate: dict[str, Any]) -> dict[str, dict]:
    """``candidate`` spelled out per layer: ``{"ratios": {layer: removed fraction}, "lowrank": {layer:
    rank fraction}, "bsconv": {layer: width fraction}, "bits": {layer: 8 | 4}, "float": [layers]}``."""
    full = space.complete(candidate)
    plan: dict[str, dict] = {"ratios": {}, "lowrank": {}, "bsconv": {}, "bits": {}}
    for knob in space.knobs:
        choice = full[knob.name]
        for layer in knob.layers:
            if knob.kind == "keep" and choice != 1.0:
                plan["ratios"][layer] = round(1.0 - float(choice), 6)
            elif knob.kind == "op" and choice != "keep":
                family, fraction = choice.split(":")
                plan[family][layer] = float(fraction)
            elif knob.kind == "bits" and choice != "float":
                plan["bits"][layer] = int(choice)
    return plan


def _fraction_to_ranks(model: nn.Module, layers: dict[str, float]) -> dict[str, int]:
    """Spatial ranks at ``fraction`` of the layer's MACs: a k x 1 then 1 x k pair of rank r costs
    ``r * (C_in * kh + C_out * kw)`` per position against ``C_in * C_out * kh * kw`` dense, so
    ``r = fraction * C_in * C_out * kh * kw / (C_in * kh + C_out * kw)`` (at least 1)."""
    ranks = {}
    for name, fraction in layers.items():
        conv = model.get_submodule(name)
        (kh, kw), cin, cout = conv.kernel_size, conv.in_channels // conv.groups, conv.out_channels
        ranks[name] = max(1, int(fraction * cin * cout * kh * kw / (cin * kh + cout * kw)))
    return ranks


def _fraction_to_widths(model: nn.Module, layers: dict[str, float]) -> dict[str, int]:
    """BSConv blueprints per filter: ``fraction`` of k^2 (at least 1)."""
    out = {}
    for name, fraction in layers.items():
        conv = model.get_submodule(name)
        out[name] = max(1, round(fraction * conv.kernel_size[0] * conv.kernel_size[1]))
    return out


def paying_ranks(model: nn.Module, x: torch.Tensor, ranks: dict[str, int]) -> dict[str, int]:
    """``ranks`` less the layers where the factorization would not cut both parameters and MACs (the
    decompose stage would skip them; leaving them out keeps the written stage exact)."""
    from ..lowrank.apply import plan_decomposition

    report = plan_decomposition(model, x, "spatial", "fixed", None, tuple(ranks), (), ranks)
    return {n: r for n, r in ranks.items() if n in report.layers and report.layers[n].skipped is None}


def paying_widths(model: nn.Module, x: torch.Tensor, widths: dict[str, int]) -> dict[str, int]:
    """``widths`` less the layers where a BSConv block would not cut both parameters and MACs."""
    from ..compact.plan import plan_replacement

    plan = plan_replacement(model, x, "bsconv", 1, tuple(widths), (), widths)
    return {n: w for n, w in widths.items() if n in plan.layers and plan.layers[n].skipped is None}


def apply_candidate(model: nn.Module, example_input: torch.Tensor, space: SearchSpace, candidate: dict[str, Any],
                    calib_images: torch.Tensor, *, refit_images: int = 128, bn_images: int = 256,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, list[tuple[str, dict]]]:
    """The model ``candidate`` describes, repaired without training, and the recipe stages that build it.

    ``calib_images``: training images (never test images) for the refits, BatchNorm statistics and
    quantization ranges. Returns ``(model, stages)``: the stages are ``(name, options)`` pairs in recipe
    order (prune_channels, decompose, replace, quantize) that :func:`netslim.compress` runs to the same
    model."""
    from ..compact import ReplaceConfig, replace
    from ..lowrank import DecomposeConfig, decompose
    from ..prune.structured import structured
    from ..quant import QuantConfig, quantize

    for name in ("netslim.lowrank", "netslim.compact", "netslim.prune.structured", "netslim.quant"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the search reports skipped layers in its own rows
    plan = plan_of(space, candidate)
    x = example_input[:1].to(device)
    work = safe_deepcopy(model).eval().to(device)
    stages: list[tuple[str, dict]] = []
    if plan["ratios"]:
        options = {"ratio": 0.0, "ratios": dict(plan["ratios"]), "criterion": "l1", "refit_images": refit_images,
                   "refit_mode": "local"}
        work = structured(work, x, **options, calib_data=calib_images).eval()
        stages.append(("prune_channels", options))
    lowrank = paying_ranks(work, x, _fraction_to_ranks(work, plan["lowrank"])) if plan["lowrank"] else {}
    if lowrank:
        options = {"method": "spatial", "selector": "fixed", "layers": sorted(lowrank), "ranks": lowrank,
                   "refit_images": refit_images, "refit_mode": "one_pass"}
        work = decompose(work, x, DecomposeConfig(**options), calib_data=calib_images, device=device,
                         progress=False, inplace=True).model
        stages.append(("decompose", options))
    bsconv = paying_widths(work, x, _fraction_to_widths(work, plan["bsconv"])) if plan["bsconv"] else {}
    if bsconv:
        options = {"block": "bsconv", "layers": sorted(bsconv), "widths": bsconv, "refit_images": refit_images,
                   "refit_mode": "one_pass"}
        work = replace(work, x, ReplaceConfig(**options), calib_data=calib_images, device=device, progress=False,
                       inplace=True).model
        stages.append(("replace", options))
    if lowrank or bsconv or plan["ratios"]:
        recalibrate_batchnorm_(work, calib_images[:bn_images], device=device)
    if plan["bits"]:
        options = quant_options(work, plan["bits"])
        calib = [calib_images[i:i + 64].to(device) for i in range(0, min(len(calib_images), 256), 64)]
        work = quantize(work, x, calib, QuantConfig(**options), device=device)
        stages.append(("quantize", {"method": "ptq", **options}))
    return work.eval(), stages


def quant_options(model: nn.Module, bits: dict[str, int]) -> dict:
    """QuantConfig options for per-layer weight bits: 8-bit activations, the layers not named in float,
    4-bit layers (and the factors inside a factorized layer) in ``layer_bits``."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def slot(name: str) -> str | None:  # the searched layer a (factor) layer belongs to
        for s in bits:
            if name == s or name.startswith(s + "."):
                return s
        return None

    exclude = [n for n in layers if slot(n) is None]
    layer_bits = {n: bits[slot(n)] for n in layers if slot(n) is not None and bits[slot(n)] != 8}
    return {"weight_bits": 8, "act_bits": 8, "exclude": exclude, "layer_bits": layer_bits}


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, images: torch.Tensor, batch_size: int = 64,
                           device: str | torch.device = "cpu") -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``images`` (training images) with the
    weights fixed: after layers change, the statistics the network was trained with no longer hold
    (Li et al. 2020, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning")."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(images) == 0:
        return model
    was_training = model.training
    saved = [(m.momentum,) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size].to(device))
    for m, (momentum,) in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)
    return model


__all__ = ["apply_candidate", "plan_of", "recalibrate_batchnorm_", "quant_options"]
