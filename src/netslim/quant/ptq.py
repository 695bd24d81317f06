"""Post-training quantization: ``netslim.quant.quantize(model, example_input, calib_data, QuantConfig(...))``.

The steps, in order: fold BatchNorm into the layers before it; optionally equalize ranges across
layers (CLE, Nagel et al. 2019); fake-quantize weights per tensor or per output channel on a min-max
or MSE range; calibrate activation ranges on a few hundred images with the chosen calibrator
(min-max, moving average, percentile, MSE, KL as in TensorRT, ACIQ); optionally correct the bias
shift quantization causes (empirical from the calibration images, or data-free from BatchNorm
statistics) and learn the rounding of each layer (AdaRound, Nagel et al. 2020). With a size target
(``target="size:8"``) each layer's weight bit width is chosen first from its measured sensitivity
(:mod:`netslim.quant.mixed`).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..deprecation import renamed_argument
from ..errors import NetslimError, unknown_choice
from ..layers import check_layer_names
from ..targets import Target, parse_target
from ..train import default_device
from .calibrate import CALIBRATORS, weight_range
from .graph import (fold_batchnorm, insert_activation_quantizers, per_layer_fallback, quantizable_layers,
                    warn_unsupported)
from .modules import ActQuant, WeightQuant
from .qspec import QuantSpec, qparams

log = logging.getLogger("netslim.quant")

BIAS_CORRECTIONS = ("none", "empirical", "data_free")


@dataclass
class QuantConfig:
    """What to quantize and how.

    ``weight_bits`` / ``act_bits``: 2..16 (``act_bits`` 0 leaves activations in float);
    ``per_channel``: one weight scale per output channel; ``weight_range``: ``minmax`` or ``mse``;
    ``calibrator``: activation range method (see :data:`CALIBRATORS`); ``layer_bits``: per-layer weight
    bit widths overriding ``weight_bits`` (mixed precision); ``target``: ``"size:N"`` chooses those
    widths instead (from :data:`MIXED_WIDTHS` up to ``weight_bits``, by measured sensitivity) so that the
    quantized layers' weights take N times fewer bytes than in float32 (``"size:8"``: 4 bits on average;
    biases, scales and float layers are not counted); ``exclude``: layers kept in float (a name covers
    its submodules); ``calib_batches``: at most that many batches of the calibration data are read
    (``calibration_batches``: its deprecated name).
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    weight_range: str = "minmax"
    calibrator: str = "minmax"
    percentile: float = 99.99
    symmetric_activations: bool = False
    cle: bool = False
    relu6_to_relu: bool = False
    bias_correction: str = "none"
    adaround: bool = False
    adaround_iters: int = 1000
    adaround_samples: int = 256
    calib_batches: int | None = None
    quantize_output: bool = True
    layer_bits: dict[str, int] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    target: str | dict | None = None
    calibration_batches: int | None = field(default=None, metadata={"deprecated": "calib_batches"})

    def __post_init__(self) -> None:
        if self.calibration_batches is not None:
            warnings.warn("QuantConfig: calibration_batches is deprecated; write calib_batches",
                          DeprecationWarning, stacklevel=3)
            self.calib_batches, self.calibration_batches = self.calibration_batches, None
        QuantSpec(self.weight_bits)  # validates the range
        parse_target(self.target, ("size",), "quantize target")
        if self.act_bits:
            QuantSpec(self.act_bits)
        for name, bits in self.layer_bits.items():
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise NetslimError(f"layer_bits[{name!r}] must be an integer in 2..16, got {bits!r}")
        if self.calibrator not in CALIBRATORS:
            raise unknown_choice("calibrator", self.calibrator, CALIBRATORS)
        if self.weight_range not in ("minmax", "mse"):
            raise unknown_choice("weight range", self.weight_range, ("minmax", "mse"))
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise unknown_choice("bias correction", self.bias_correction, BIAS_CORRECTIONS)

    def weight_spec(self, layer_name: str) -> QuantSpec:
        return QuantSpec(self.layer_bits.get(layer_name, self.weight_bits), symmetric=True,
                         per_channel=self.per_channel, axis=0)

    def act_spec(self) -> QuantSpec:
        return QuantSpec(self.act_bits, symmetric=self.symmetric_activations, narrow=False)

    @property
    def size_target(self) -> Target | None:
        return parse_target(self.target, ("size",), "quantize target")


def quant_fields(config: QuantConfig) -> dict:
    """The :class:`QuantConfig` fields of ``config`` as a dict (a subclass, such as the ``quantize`` stage's
    config, adds fields of its own that :func:`quantize` does not read)."""
    return {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(QuantConfig)}


MIXED_WIDTHS = (2, 3, 4, 6, 8)  # the widths a size target chooses from (those <= weight_bits)
SENSITIVITY_IMAGES = 256        # calibration images the per-layer sensitivity is measured on


def check_finite(model: nn.Module) -> None:
    """A model with NaN or infinite weights cannot be quantized (its ranges are meaningless)."""
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NetslimError(f"cannot quantize: non-finite values (NaN/inf) in {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}; is the model trained?")


def prepare(model: nn.Module, example_input: torch.Tensor, config: QuantConfig) -> tuple[nn.Module, dict]:
    """Folded, traced copy of ``model`` with activation quantizers in place (in ``float`` mode) and no
    weight quantization yet. Returns it and the folded BatchNorm statistics."""
    check_finite(model)
    check_layer_names(model, config.exclude, "exclude")
    try:
        gm, bn_stats = fold_batchnorm(model)
        traced = True
    except Exception as exc:  # fx cannot trace data-dependent control flow; fall back, say so
        warnings.warn(f"torch.fx could not trace the model ({type(exc).__name__}: {str(exc)[:120]}); "
                      "quantizing per layer, without BatchNorm folding", stacklevel=2)
        gm, bn_stats, traced = copy.deepcopy(model).eval(), {}, False
    if config.cle:
        from .equalize import cross_layer_equalize_
        cross_layer_equalize_(gm, relu6_to_relu=config.relu6_to_relu)
    warn_unsupported(gm)
    if config.act_bits:
        spec = config.act_spec()
        options = {"percentile": config.percentile} if config.calibrator == "percentile" else {}

        def make(_name: str) -> ActQuant:
            return ActQuant(spec, config.calibrator, **options)

        if traced:
            insert_activation_quantizers(gm, example_input, make, config.quantize_output)
        else:
            per_layer_fallback(gm, make, tuple(config.exclude))
    gm.netslim_traced = traced
    _attach_record(gm, {"config": quant_fields(config), "input_shape": [int(s) for s in example_input.shape],
                        "float_model": _skeleton(model)})
    return gm, bn_stats


QUANT_RECORD = "netslim_quant"


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers live on the meta device: its
    structure, at no memory cost (what :func:`netslim.save` records for an ``.nsq`` file)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _attach_record(gm: nn.Module, record: dict) -> None:
    if isinstance(gm, fx.GraphModule):
        gm.meta[QUANT_RECORD] = record  # GraphModule's deepcopy keeps ``meta``, not other attributes
    else:
        gm.__dict__[QUANT_RECORD] = record


def quant_record(model: nn.Module) -> dict | None:
    """What :func:`prepare` recorded on a quantized model: ``config`` (the :class:`QuantConfig` as a dict),
    ``input_shape`` (of the example input) and ``float_model`` (the float model's structure, on the meta
    device); None for a model :func:`prepare` did not make."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and QUANT_RECORD in meta:
        return meta[QUANT_RECORD]
    return model.__dict__.get(QUANT_RECORD)


def rebuild_quantized(model: nn.Module, input_shape: list[int] | tuple[int, ...], config: QuantConfig,
                      learn: str = "ste") -> nn.Module:
    """The quantized structure :func:`quantize` makes of ``model`` (folded, with quantizers marked calibrated,
    in ``quantize`` mode, steps learnable as ``learn`` says), without calibration data: the model to load a
    saved quantized state into (``.nsq`` files, a resumed run)."""
    from .qat import make_learnable_

    qmodel, _ = prepare(model, torch.zeros(list(input_shape)), config)
    quantize_weights_(qmodel, config)
    for m in qmodel.modules():
        if isinstance(m, ActQuant):
            m.calibrated.fill_(True)
    set_mode(qmodel, "quantize")
    make_learnable_(qmodel, learn)
    return qmodel


def quantize_weights_(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """Register a :class:`WeightQuant` parametrization on each conv/linear weight (ranges per config)."""
    layers = quantizable_layers(model, tuple(config.exclude))
    for name, layer in layers.items():
        spec = config.weight_spec(name)
        lo, hi = weight_range(layer.weight.detach(), spec, config.weight_range)
        scale, zero_point = qparams(lo, hi, spec)
        scale = half_representable(scale)
        parametrize.register_parametrization(layer, "weight", WeightQuant(spec, scale, zero_point))
    return layers


def half_representable(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16-representable step >= ``scale`` (the range still fits), so that the packed
    file stores per-channel weight steps in 2 bytes without changing a single quantized value."""
    half = scale.clamp(min=2.0 ** -24, max=65504.0).half()
    up = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return up.float()


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every quantizer of ``model`` to ``float``, ``observe``, ``quantize`` or ``export``."""
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.set_mode(mode)
        elif isinstance(m, WeightQuant):
            m.mode = "float" if mode in ("float", "observe") else mode


def activation_quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate_(model: nn.Module, calib_data: Iterable | None = None, max_batches: int | None = None,
               device: str | torch.device | None = None, *, batches: Iterable | None = None) -> nn.Module:
    """Observe activation ranges on ``calib_data`` (batches: tensors or (input, target) pairs) with float
    weights, then fix every activation quantizer's scale and zero point; returns ``model``.
    ``device``: where the batches go (default :func:`netslim.train.default_device`)."""
    calib_data = renamed_argument(calib_data, batches, "batches", "calib_data", "calibrate_")
    if calib_data is None:
        raise NetslimError("calibrate_ needs calib_data: batches of images")
    device = torch.device(device) if device is not None else default_device()
    set_mode(model, "observe")
    seen = 0
    for i, batch in enumerate(calib_data):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model(x.to(device))
        seen += len(x)
    if seen == 0:
        raise NetslimError("calibration data is empty: give at least one batch of images")
    for q in activation_quantizers(model):
        q.finish_calibration()
    set_mode(model, "quantize")
    return model


def quantize(model: nn.Module, example_input: torch.Tensor, calib_data: Iterable | None = None,
             config: QuantConfig | None = None, device: str | torch.device | None = None, *,
             calibration: Iterable | None = None) -> nn.Module:
    """Post-training quantization of a copy of ``model`` (the original is not changed).

    ``calib_data``: an iterable of image batches (a DataLoader), needed unless ``config.act_bits`` is 0
    and neither empirical bias correction, AdaRound nor a size target is asked for. ``device``: where the
    quantized model and the data go (default :func:`netslim.train.default_device`). Returns the
    simulated quantized model in ``quantize`` mode (with ``netslim_bit_plan``, the
    :class:`~netslim.quant.mixed.BitPlan`, when ``config.target`` chose the widths);
    :func:`netslim.quant.to_onnx_qdq` runs it as integers. ``calibration=`` is the deprecated name of
    ``calib_data``.
    """
    calib_data = renamed_argument(calib_data, calibration, "calibration", "calib_data", "quantize")
    config = config or QuantConfig()
    device = torch.device(device) if device is not None else default_device()
    needs_data = config.act_bits or config.adaround or config.bias_correction == "empirical" or config.target
    if needs_data and calib_data is None:
        raise NetslimError("post-training quantization of activations needs calib_data (calibration images)")
    plan = None
    if config.size_target is not None:
        plan = plan_mixed_precision(model, example_input, calib_data, config, device)
        config = dataclasses.replace(config, layer_bits={**plan.bits, **config.layer_bits}, target=None)
    qmodel, bn_stats = prepare(model, example_input, config)
    qmodel.to(device)
    layers = quantize_weights_(qmodel, config)
    if config.act_bits:
        calibrate_(qmodel, calib_data, config.calib_batches, device)
    set_mode(qmodel, "quantize")
    if config.bias_correction == "data_free":
        from .corrections import data_free_bias_correction_
        data_free_bias_correction_(qmodel, bn_stats)
    elif config.bias_correction == "empirical":
        from .corrections import empirical_bias_correction_
        empirical_bias_correction_(qmodel, calib_data, config.calib_batches, device)
    if config.adaround:
        from .corrections import adaround_model_
        adaround_model_(qmodel, calib_data, config.adaround_samples, config.adaround_iters, device)
    align_biases_(qmodel)
    qmodel.netslim_bit_plan = plan
    log.info("quantized %d layers (%s)", len(layers), "fx graph" if qmodel.netslim_traced else "per layer")
    return qmodel.eval()


def plan_mixed_precision(model: nn.Module, example_input: torch.Tensor, calib_data: Iterable, config: QuantConfig,
                         device: str | torch.device | None = None):
    """Per-layer weight widths meeting ``config.target`` (``"size:N"``: N times fewer weight bytes than
    float32): quantize once at ``weight_bits``, measure each layer's sensitivity at every width of
    :data:`MIXED_WIDTHS` up to ``weight_bits`` on the first :data:`SENSITIVITY_IMAGES` calibration
    images, then :func:`~netslim.quant.mixed.plan_bits` under the byte budget."""
    from .mixed import layer_sensitivity, plan_bits

    target = config.size_target
    device = torch.device(device) if device is not None else default_device()
    probe = quantize(model, example_input, calib_data, dataclasses.replace(config, target=None), device)
    images, seen = [], 0
    for batch in calib_data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        images.append(x[: SENSITIVITY_IMAGES - seen].to(device))
        seen += len(images[-1])
        if seen >= SENSITIVITY_IMAGES:
            break
    widths = tuple(b for b in MIXED_WIDTHS if b <= config.weight_bits) or (config.weight_bits,)
    table = layer_sensitivity(probe, images, widths=widths)
    weights = sum(m.parametrizations.weight.original.numel() for m in probe.modules()
                  if hasattr(m, "parametrizations") and "weight" in m.parametrizations)
    return plan_bits(probe, table, int(target.goal(4 * weights)))


def _input_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> ActQuant | None:
    from .graph import is_passthrough
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(modules[node.target], ActQuant):
            return modules[node.target]
        if not is_passthrough(node, modules) or not node.args:
            return None
        node = node.args[0]
    return None


@torch.no_grad()
def align_biases_(model: nn.Module) -> nn.Module:
    """Round each quantized layer's bias to the int32 grid ``s_input * s_weight`` an integer kernel uses
    (Jacob et al. 2018 §2.4), so that simulation and integer execution add the same bias. Returns ``model``."""
    if not isinstance(model, fx.GraphModule):
        return model
    modules = dict(model.named_modules())
    aligned = 0
    for node in model.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if layer is None or getattr(layer, "bias", None) is None or not hasattr(layer, "parametrizations"):
            continue
        quantizer = layer.parametrizations.weight[0]
        act = _input_quantizer(node.args[0], modules)
        if not isinstance(quantizer, WeightQuant) or act is None or act.mode == "float" or not bool(act.calibrated):
            continue
        grid = (act.scale.detach() * quantizer.scale.detach()).reshape(-1).expand(layer.bias.shape)
        codes = torch.round(layer.bias / grid).clamp(-(2 ** 31), 2 ** 31 - 1)  # int32, as the kernel stores it
        layer.bias.copy_(codes * grid)
        aligned += 1
    log.debug("aligned %d biases to the int32 grid", aligned)
    return model
