"""Measurement in the survey's terms: parameters, MACs, stored size, latency, activation memory, energy.

``netslim.profile(model, example_input)`` returns a :class:`Profile` (per-layer table and totals);
``netslim.compare(original, compressed, data)`` returns the six ratios r_A, r_p, r_T, r_c, r_E, r_D;
``compare_breakdown(original, compressed, example_input)`` the time per layer of both, matched by name
(:mod:`netslim.profile.breakdown`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..outputs import output_shapes
from .counting import LayerStats, count_layers
from .energy import EnergyEstimate, estimate_energy
from .latency import measure_latency


@dataclass
class Profile:
    """Totals and per-layer rows of one model on one input shape."""

    layers: list[LayerStats]
    input_shape: tuple  # the input's shape, or the shapes of every input tensor (tuple or list input)
    params: int
    nonzero_params: int
    macs: int
    effective_macs: int
    other_macs: int
    stored_bytes: int
    index_bytes: int
    peak_activation_bytes: int
    activation_bytes: int
    energy: EnergyEstimate
    latency_ms: dict[int, float] = field(default_factory=dict)

    def to_dict(self, layers: bool = True) -> dict:
        d = {
            "input_shape": list(self.input_shape), "params": self.params, "nonzero_params": self.nonzero_params,
            "macs": self.macs, "effective_macs": self.effective_macs, "other_macs": self.other_macs,
            "stored_bytes": self.stored_bytes, "index_bytes": self.index_bytes,
            "peak_activation_bytes": self.peak_activation_bytes, "energy_pj": self.energy.total_pj,
            "latency_ms": {str(k): v for k, v in self.latency_ms.items()},
        }
        if layers:
            d["layers"] = [r.to_dict() for r in self.layers]
        return d

    def table(self, layers: bool = True) -> str:
        """A fixed-width text table: one row per layer, then the totals."""
        lines = []
        if layers:
            head = f"{'layer':<34} {'type':<18} {'params':>11} {'nonzero':>11} {'MACs':>14} {'eff. MACs':>14}  output"
            lines += [head, "-" * len(head)]
            for r in self.layers:
                lines.append(f"{r.name[:34]:<34} {r.kind[:18]:<18} {r.params:>11,} {r.nonzero_params:>11,} "
                             f"{r.macs:>14,} {r.effective_macs:>14,}  {tuple(r.output_shape)}")
            if self.other_macs:
                lines.append(f"{'(other ops)':<34} {'matmul etc.':<18} {'':>11} {'':>11} {self.other_macs:>14,}")
            lines.append("")
        lines += [
            f"parameters        {self.params:,} (non-zero {self.nonzero_params:,})",
            f"MACs              {human(self.macs)} ({self.macs:,}); effective {human(self.effective_macs)}",
            f"stored size       {self.stored_bytes:,} bytes ({self.stored_bytes / 2**20:.3f} MiB), index {self.index_bytes:,} bytes",
            f"peak activations  {self.peak_activation_bytes:,} bytes",
            f"energy (45 nm)    {self.energy.total_pj / 1e6:.3f} uJ per inference",
        ]
        for bs, ms in self.latency_ms.items():
            lines.append(f"latency           {ms:.3f} ms median at batch {bs}")
        return "\n".join(lines)


def human(n: float) -> str:
    """``313455616 -> '313.46 M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}" if unit == "G" else f"{n / scale:.2f} {unit}"
    return str(int(n))


def input_shape(example_input: Any) -> tuple:
    """A tensor's shape; the tuple of every input tensor's shape for a tuple or a list of inputs."""
    if isinstance(example_input, torch.Tensor):
        return tuple(example_input.shape)
    return tuple(output_shapes(example_input))


def deployed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as it would be stored after baking parametrizations in
    (a masked weight counts as the masked tensor, the mask itself is not stored)."""
    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        if mname.endswith("parametrizations") or ".parametrizations." in mname:
            continue
        prefix = f"{mname}." if mname else ""
        for pname, p in module.named_parameters(recurse=False):
            out[prefix + pname] = p
        for bname, b in module.named_buffers(recurse=False):
            if b is not None:
                out[prefix + bname] = b
        if hasattr(module, "parametrizations"):
            for pname in module.parametrizations.keys():
                out[prefix + pname] = getattr(module, pname)
    return out


def deployable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parametrization baked in: the form that ships and is timed."""
    from ..surgery import bake_parametrizations_, safe_deepcopy

    return bake_parametrizations_(safe_deepcopy(model))


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model stored densely at each tensor's own dtype (fp32 weights: 4 bytes each)."""
    return sum(t.numel() * t.element_size() for t in deployed_tensors(model).values())


def profile(model: nn.Module, example_input: Any, *, latency: bool = True,
            batch_sizes: tuple[int, ...] = (1,), warmup: int = 5, repeats: int = 20, threads: int | None = None,
            stored_size: int | None = None, index_size: int = 0, mac_bits: int = 32) -> Profile:
    """Profile ``model`` on ``example_input``: a tensor, a tuple of positional inputs, or the list of
    images a torchvision detection model takes (:func:`netslim.outputs.as_args`). The model may return
    any structure of tensors; every layer's output shapes and bytes count.

    Latency is measured on :func:`deployable_copy` (masks and other parametrizations baked in).
    ``stored_size`` / ``index_size`` override the dense stored form when the caller knows the
    real one (an encoded file); ``mac_bits`` picks the energy per MAC (32, 16 or 8).
    """
    was_training = model.training
    model.eval()
    try:
        rows, other = count_layers(model, example_input)
    finally:
        model.train(was_training)
    macs = sum(r.macs for r in rows) + other
    effective = sum(r.effective_macs for r in rows) + other
    size = stored_bytes(model) if stored_size is None else int(stored_size)
    act = sum(r.output_bytes for r in rows)
    lat = measure_latency(deployable_copy(model), example_input, batch_sizes, warmup, repeats, threads) if latency else {}
    return Profile(
        layers=rows, input_shape=input_shape(example_input),
        params=sum(p.numel() for p in model.parameters()),
        nonzero_params=sum(r.nonzero_params for r in rows),
        macs=macs, effective_macs=effective, other_macs=other, stored_bytes=size, index_bytes=int(index_size),
        peak_activation_bytes=max((r.activation_bytes for r in rows), default=0), activation_bytes=act,
        energy=estimate_energy(effective, size, act, mac_bits), latency_ms=lat,
    )


from .compare import Comparison, compare  # noqa: E402
from .breakdown import BreakdownComparison, ComparedLayer, LayerTime, compare_breakdown, layer_breakdown  # noqa: E402

__all__ = ["profile", "Profile", "LayerStats", "compare", "Comparison", "measure_latency", "stored_bytes",
           "estimate_energy", "human", "deployed_tensors", "deployable_copy", "layer_breakdown", "compare_breakdown",
           "LayerTime", "ComparedLayer", "BreakdownComparison"]
