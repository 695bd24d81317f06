"""Per-layer precision of weight sharing, chosen from data.

Deep Compression gives every conv layer 8 bits and every fc layer 5 (Han et al. 2016, §3); Bayesian
compression (Louizos, Ullrich & Welling, NeurIPS 2017, §5) showed that layers tolerate very different
precisions and read each layer's from its posterior variances. netslim measures it instead: each layer in
turn (largest first, the others already at their chosen width) gets the fewest shared values whose model
stays within ``max_drop`` points of the unshared model's top-1 on a held-out slice of the *training* data. The
widths are then applied with k-means (:func:`netslim.quant.kmeans.share_layer_`), ready for centroid
fine-tuning and :mod:`netslim.encode`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import NetslimError
from ..surgery import bake_parametrizations_
from ..train import evaluate
from .kmeans import SharedWeight, kmeans_1d, share_layer_, shareable_layers

BIT_CHOICES = tuple(range(1, 9))


@dataclass
class PrecisionChoice:
    """The chosen bits per layer, the held-out top-1 it was chosen against, and every trial made."""

    bits: dict[str, int]
    reference_top1: float
    final_top1: float
    trials: list[dict]

    def markdown(self) -> str:
        rows = ["| layer | bits | shared values | held-out top-1 at that width |", "|---|---|---|---|"]
        for name, b in self.bits.items():
            top1 = next((t["top1"] for t in self.trials if t["layer"] == name and t["bits"] == b), float("nan"))
            rows.append(f"| {name} | {b} | {1 << b} | {top1:.2%} |")
        return "\n".join(rows)


def _shared_values(w: torch.Tensor, bits: int, init: str, seed: int) -> torch.Tensor:
    """``w`` with its non-zeros replaced by their k-means centroid (zeros stay zero)."""
    out = w.clone()
    nonzero = w != 0
    if nonzero.any():
        centroids, assign = kmeans_1d(w[nonzero], 1 << bits, init, seed=seed)
        out[nonzero] = centroids[assign]
    return out


def choose_sharing_bits(model: nn.Module, held_out, *, max_drop: float = 0.2,
                        choices: tuple[int, ...] = BIT_CHOICES, exclude: tuple[str, ...] = (),
                        init: str = "linear", seed: int = 0, device=None) -> PrecisionChoice:
    """The fewest bits per layer keeping held-out top-1 within ``max_drop`` points (as in
    :class:`netslim.SearchConfig`) of the unshared model's. ``model`` is left as it was."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 100:
        raise NetslimError(f"max_drop must be points of top-1 in [0, 100), got {max_drop!r}")
    choices = tuple(sorted(set(choices)))
    if not choices or choices[0] < 1 or choices[-1] > 16:
        raise NetslimError(f"bit choices must be integers in 1..16, got {choices!r}")
    layers = shareable_layers(model, exclude)
    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    for m in layers.values():
        if parametrize.is_parametrized(m, "weight"):
            raise NetslimError("choose_sharing_bits needs plain weights: bake masks or sharing first")
    reference = evaluate(model, held_out, device)["top1"]
    floor = reference - max_drop / 100
    order = sorted(layers, key=lambda n: -int((originals[n] != 0).sum()))
    bits, trials = {}, []
    try:
        for name in order:
            weight = layers[name].weight
            chosen = choices[-1]
            for b in choices:
                with torch.no_grad():
                    weight.copy_(_shared_values(originals[name], b, init, seed))
                top1 = evaluate(model, held_out, device)["top1"]
                trials.append({"layer": name, "bits": b, "top1": top1})
                if top1 >= floor:
                    chosen = b
                    break
            with torch.no_grad():
                weight.copy_(_shared_values(originals[name], chosen, init, seed))
            bits[name] = chosen
        final = evaluate(model, held_out, device)["top1"]
    finally:
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.copy_(originals[n])
    return PrecisionChoice({n: bits[n] for n in layers}, reference, final, trials)


def share_with_bits_(model: nn.Module, bits: dict[str, int], init: str = "linear", seed: int = 0) -> nn.Module:
    """k-means weight sharing of each layer in ``bits`` at its own width (masks are baked first)."""
    for name, b in bits.items():
        share_layer_(model.get_submodule(name), b, init, seed=seed)
    return model


def restore_shared_bits_(model: nn.Module, bits: dict[str, int]) -> nn.Module:
    """Rebuild the sharing structure of :func:`share_with_bits_` (values come from a state_dict loaded after)."""
    for name, b in bits.items():
        module = model.get_submodule(name)
        bake_parametrizations_(module)
        module.weight.requires_grad_(False)
        parametrize.register_parametrization(
            module, "weight", SharedWeight(torch.zeros(1 << b), torch.zeros_like(module.weight, dtype=torch.long)),
            unsafe=True)
    return model
