"""The ``finetune`` stage; technique stages live in their own subpackages and register here on import."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import NetslimError
from ..train import TrainConfig, fit
from .stages import StageContext, stage


@dataclass
class FinetuneConfig(TrainConfig):
    """The fields of :class:`netslim.train.TrainConfig`, and optionally distillation from the recipe's
    original (uncompressed) model: ``distill`` maps loss names to weights as in the ``distill`` stage
    (``{kd: 1.0}``: pure KD; ``{kd: 0.5}``: half KD, half cross-entropy; ``ce`` sets the labels' weight),
    ``temperature`` is KD's, ``distill_layers`` the (original layer, current layer) pairs of the feature
    losses. Without ``distill`` the stage is plain fine-tuning."""

    distill: dict[str, float] = field(default_factory=dict)
    temperature: float = 4.0
    distill_layers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill:
            from ..distill.distiller import layer_pairs, validate_losses

            layer_pairs(validate_losses(self.distill), self.distill_layers or None, key="distill_layers")
        if not self.temperature > 0:
            raise NetslimError(f"temperature must be > 0, got {self.temperature}")


@stage("finetune", FinetuneConfig)
def finetune(ctx: StageContext, cfg: FinetuneConfig) -> nn.Module:
    """Fine-tune the current model (masks and other parametrizations are kept), optionally distilling from
    the original model; resumable per epoch."""
    if not cfg.distill:
        fit(ctx.model, ctx.data.train, cfg, device=ctx.device, checkpoint_path=ctx.stage_dir / "train.ckpt",
            progress=ctx.progress)
        return ctx.model
    from ..distill import distill

    result = distill(ctx.model, ctx.original, ctx.data.train, cfg.distill, cfg.distill_layers or None, cfg,
                     temperature=cfg.temperature, checkpoint_path=ctx.stage_dir / "train.ckpt", device=ctx.device,
                     progress=ctx.progress)
    last = result.history[-1] if result.history else {}
    ctx.artifacts["distill_terms"] = {k[len("distill_"):]: v for k, v in last.items() if k.startswith("distill_")}
    ctx.artifacts["notes"] = f"fine-tuned with distillation from the original model: {cfg.distill}"
    return ctx.model


@dataclass
class ExportConfig:
    """Write the current model as ONNX (``filename`` in the run directory; dynamic batch axis; QDQ integers when
    it is quantized), check onnxruntime's outputs against PyTorch's on ``check_images`` evaluation images (the
    largest difference may be ``tolerance`` of the largest output, or ``quantized_tolerance`` for an integer
    model, whose kernels round differently from the float simulation), and
    time the original and the exported model side by side in onnxruntime at the recipe's
    ``latency_batch_sizes`` with ``threads`` intra-op threads (``r_T_ort`` in the metrics)."""

    filename: str = "model.onnx"
    opset: int = 18
    check_images: int = 64
    threads: int = 1
    repeats: int = 30
    tolerance: float = 1e-3
    quantized_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.filename, str) or not self.filename.endswith(".onnx") or "/" in self.filename:
            raise NetslimError(f"filename must be a plain file name ending in .onnx, got {self.filename!r}")
        for key, low in (("opset", 13), ("check_images", 1), ("threads", 1), ("repeats", 3)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise NetslimError(f"{key} must be an integer >= {low}, got {value!r}")
        for key in ("tolerance", "quantized_tolerance"):
            if not isinstance(getattr(self, key), (int, float)) or not getattr(self, key) > 0:
                raise NetslimError(f"{key} must be a number > 0, got {getattr(self, key)!r}")


@stage("export", ExportConfig)
def export_stage(ctx: StageContext, cfg: ExportConfig) -> nn.Module:
    """Deployable ONNX file in the run directory, checked in onnxruntime and timed against the original there."""
    import torch

    from ..export import check_onnx, is_quantized, ort_latency_ms, ort_session, to_onnx

    run_dir = ctx.run_dir if ctx.run_dir is not None else ctx.stage_dir
    model = ctx.model.eval()
    x = ctx.example_input.detach().cpu()
    path = to_onnx(model.cpu(), x, run_dir / cfg.filename, opset=cfg.opset)
    baseline = to_onnx(ctx.original.cpu().eval(), x, ctx.stage_dir / "original.onnx", opset=cfg.opset)
    test = ctx.data.test
    count = min(cfg.check_images, len(test))
    images = torch.stack([test[i][0] for i in range(count)])
    check = check_onnx(model, path, images)
    _require_faithful(model, images, check, cfg.quantized_tolerance if is_quantized(model) else cfg.tolerance, path)
    batches = tuple(ctx.latency_batch_sizes)
    sessions = {"base": ort_session(baseline, threads=cfg.threads), "model": ort_session(path, threads=cfg.threads)}
    best: dict[str, dict[int, float]] = {"base": {}, "model": {}}
    for _ in range(3):  # the two models alternate in one process; the best of three medians each
        for bs in batches:
            for key, session in sessions.items():
                ms = ort_latency_ms(session, x, (bs,), repeats=cfg.repeats)[bs]
                best[key][bs] = min(ms, best[key].get(bs, float("inf")))
    ms_base, ms_model = best["base"], best["model"]
    ctx.model.to(ctx.device)
    ctx.original.to(ctx.device)
    ctx.artifacts.update(onnx=str(path), onnx_bytes=path.stat().st_size, onnx_check=check,
                         ort_latency_ms={str(k): v for k, v in ms_model.items()},
                         baseline_ort_latency_ms={str(k): v for k, v in ms_base.items()})
    speed = ", ".join(f"batch {b}: {ms_base[b]:.3f} → {ms_model[b]:.3f} ms ({ms_base[b] / ms_model[b]:.2f}x)"
                      for b in batches)
    ctx.artifacts["notes"] = (f"`{path.name}` ({path.stat().st_size:,} bytes, opset {cfg.opset}, dynamic batch). "
                              f"onnxruntime vs PyTorch on {count} evaluation inputs: max |diff| "
                              f"{check['max_abs_diff']:.3g}" + (f", top-1 agreement {check['top1_agreement']:.2%}"
                                                                 if check.get("top1_agreement") is not None else "")
                              + f". onnxruntime CPU latency, {cfg.threads} thread(s), original → exported: {speed}.")
    return ctx.model


def _require_faithful(model: nn.Module, images, check: dict, tolerance: float, path) -> None:
    """Fail when onnxruntime's outputs are further from PyTorch's than ``tolerance`` of the largest output."""
    import torch

    from ..export import is_quantized
    from ..outputs import flatten_outputs

    with torch.no_grad():
        scale = max((float(t.abs().max()) for t in flatten_outputs(model(images)) if t.numel()), default=1.0)
    quantized = is_quantized(model)
    limit = tolerance * max(scale, 1.0)
    check.update(max_abs_output=scale, limit=limit, quantized=quantized)
    if check["max_abs_diff"] > limit or (check.get("top1_agreement") is not None and check["top1_agreement"] < 0.9):
        raise NetslimError(f"{path}: onnxruntime's outputs differ from PyTorch's by {check['max_abs_diff']:.3g} "
                           f"(limit {limit:.3g}; top-1 agreement {check.get('top1_agreement')}); "
                           "the export is not faithful")
