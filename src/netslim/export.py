"""Deployment: one ONNX exporter and one onnxruntime runner for every kind of netslim model.

:func:`to_onnx` / :func:`onnx_bytes` write float, masked, structurally pruned, low-rank decomposed and
quantized models alike. A model that carries netslim quantizers (:class:`netslim.quant.modules.WeightQuant`,
:class:`~netslim.quant.modules.ActQuant`) goes through the QDQ path of :mod:`netslim.quant.export`, so the
file runs as integers; any other model is exported in float with its parametrizations (pruning masks,
shared weights) baked in. Both use the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``,
several times faster than the ``torch.export`` one and the only one that writes QDQ pairs); if it fails
the ``torch.export``-based exporter is tried, with a warning.

Inputs are named ``input`` (``input_0``, ``input_1`` ... for several tensors, e.g. a list of images).
Outputs: a model returning one
tensor has one output ``output``; one returning a tuple, list or dict (a segmentation model's
``{"out": ..., "aux": ...}``) has one ONNX output per tensor, in the flattened order of
:mod:`netslim.outputs` (dict values in insertion order), named after their place (``out``, ``aux``,
``output_0`` ...). By default the batch axis is dynamic: the file runs at any batch size (a detection
model taking a list of images keeps the example's number of images).

:func:`run_onnx` returns a *list* of tensors, one per ONNX output in that order, whatever the model's
structure (``netslim.outputs.unflatten_like(model_output, run_onnx(...))`` rebuilds the structure);
:func:`check_onnx` compares every output with PyTorch.
"""
from __future__ import annotations

import io
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import NetslimError
from .io import atomic_write
from .outputs import as_args, flatten_outputs, output_names, tree_to

OnnxSource = Union[str, Path, bytes]
Inputs = Union[torch.Tensor, tuple, list]  # a tensor, a tuple of positional inputs, or one list of images


# ---------------------------------------------------------------------------------------------- export
def to_onnx(model: nn.Module, example_input: Inputs, path: str | Path, *, opset: int = 18,
            dynamic_batch: bool = True) -> Path:
    """Write ``model`` as an ONNX file atomically (see :func:`onnx_bytes`); returns the path."""
    data = onnx_bytes(model, example_input, opset=opset, dynamic_batch=dynamic_batch)
    return atomic_write(path, lambda f: f.write(data))


def onnx_bytes(model: nn.Module, example_input: Inputs, *, opset: int = 18, dynamic_batch: bool = True) -> bytes:
    """Serialize ``model`` as ONNX, traced on ``example_input``: a tensor, a tuple of positional inputs, or
    the list of images a torchvision detection model takes.

    Quantized models (netslim quantizers inside) become QDQ graphs that onnxruntime executes with integer
    kernels; other models are exported in float with parametrizations baked in. ``dynamic_batch``: the
    first axis of the inputs, and of every output whose first axis is the batch, is symbolic (``batch``).
    The model itself is not changed.
    """
    if is_quantized(model):
        from .quant.export import onnx_qdq_bytes
        return onnx_qdq_bytes(model, example_input, opset=opset, dynamic_batch=dynamic_batch)
    return traced_onnx_bytes(_float_export_copy(model), example_input, opset=opset, dynamic_batch=dynamic_batch)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` carries netslim weight or activation quantizers."""
    from .quant.modules import ActQuant, WeightQuant
    return any(isinstance(m, (ActQuant, WeightQuant)) for m in model.modules())


def _float_export_copy(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy with every parametrization (masks, shared weights) baked in."""
    from .surgery import bake_parametrizations_, safe_deepcopy
    clone = safe_deepcopy(model).cpu().eval()
    if any(parametrize.is_parametrized(m) for m in clone.modules()):
        bake_parametrizations_(clone)
    return clone


def _input_tensors(example_input: Any) -> list[torch.Tensor]:
    tensors = flatten_outputs(as_args(example_input))
    if not tensors:
        raise NetslimError(f"the example input holds no tensor ({type(example_input).__name__}): give a tensor, "
                           "a tuple of tensors or a list of images")
    return tensors


def input_names(example_input: Any) -> list[str]:
    """``["input"]`` for one input tensor, ``["input_0", "input_1", ...]`` for several (flattened order)."""
    n = len(_input_tensors(example_input))
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def export_names(model: nn.Module, example_input: Any, dynamic_batch: bool
                 ) -> tuple[list[str], list[str], dict[str, dict[int, str]] | None]:
    """Input names, output names (flattened order) and dynamic axes for exporting ``model`` on
    ``example_input`` (one forward pass). With ``dynamic_batch``, axis 0 of each positional tensor input and
    of every output as long as the batch is named ``batch``; a model taking a list of images (torchvision's
    detection models) keeps the example's number of images, and its per-image box counts stay dynamic."""
    args = as_args(example_input)
    with torch.no_grad():
        output = model(*args)
    if not flatten_outputs(output):
        raise NetslimError(f"the model returns no tensor ({type(output).__name__}): nothing to export")
    ins, outs = input_names(example_input), output_names(output)
    if not dynamic_batch:
        return ins, outs, None
    batched = [isinstance(a, torch.Tensor) and a.dim() > 0 for a in args]
    if len(ins) != len(args) or not any(batched):  # nested inputs: no batch axis to name
        return ins, outs, {}
    batch = next(a.shape[0] for a, b in zip(args, batched) if b)
    axes = {name: {0: "batch"} for name, b in zip(ins, batched) if b}
    for name, t in zip(outs, flatten_outputs(output)):
        if t.dim() and t.shape[0] == batch:
            axes[name] = {0: "batch"}
    return ins, outs, axes


def traced_onnx_bytes(model: nn.Module, example_input: Any, *, opset: int = 18,
                      dynamic_batch: bool = True) -> bytes:
    """The ONNX writer below :func:`onnx_bytes` and the QDQ path: ``model`` exported as it is (no copy, no
    baking) with netslim's input/output names and dynamic batch axis."""
    _input_tensors(example_input)
    args = tree_to(as_args(example_input), "cpu")
    model = model.eval()
    ins, outs, axes = export_names(model, args, dynamic_batch)
    try:
        return _torchscript_export(model, args, opset, ins, outs, axes)
    except Exception as first:
        if is_quantized(model):
            raise NetslimError(f"ONNX export of the quantized model failed: {type(first).__name__}: "
                               f"{str(first).splitlines()[0][:300] if str(first) else ''}") from first
        warnings.warn(f"the TorchScript ONNX exporter failed ({type(first).__name__}: {str(first)[:200]}); "
                      "trying the torch.export-based exporter", stacklevel=2)
        try:
            return _dynamo_export(model, args, opset, ins, outs, bool(axes))
        except Exception as second:
            raise NetslimError(f"ONNX export failed: TorchScript exporter: {type(first).__name__}: "
                               f"{str(first)[:200]}; torch.export exporter: {type(second).__name__}: "
                               f"{str(second)[:200]}") from second


def _torchscript_export(model, inputs, opset, ins, outs, axes) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = {"opset_version": opset, "input_names": ins, "output_names": outs, "dynamic_axes": axes}
        try:
            torch.onnx.export(model, inputs, buffer, dynamo=False, **kwargs)
        except TypeError as exc:  # a torch from before the dynamo switch
            if "dynamo" not in str(exc):
                raise
            torch.onnx.export(model, inputs, buffer, **kwargs)
    return buffer.getvalue()


def _dynamo_export(model, inputs, opset, ins, outs, dynamic_batch) -> bytes:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise NetslimError("the torch.export-based ONNX exporter needs onnxscript: pip install onnxscript") from None
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() else None for t in inputs)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buffer, dynamo=True, opset_version=opset, verbose=False,
                          input_names=ins, output_names=outs, dynamic_shapes=shapes)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- onnxruntime
def ort_session(model_file: OnnxSource, threads: int | None = None, *, optimized_model_path: str | Path | None = None):
    """An onnxruntime CPU ``InferenceSession`` on an ONNX file or its bytes, all graph optimizations on
    (QDQ patterns fuse into integer kernels). ``threads``: intra-op threads (default: onnxruntime's);
    ``optimized_model_path``: also write the graph onnxruntime actually executes there."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
        options.log_severity_level = 3  # not the notice that the written graph is specific to this machine
    if isinstance(model_file, (bytes, bytearray)):
        source = bytes(model_file)
    else:
        if not Path(model_file).is_file():
            raise NetslimError(f"ONNX file {str(model_file)!r} does not exist")
        source = str(model_file)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise NetslimError("running ONNX models needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime


def _session(model: Any, threads: int | None = None):
    return model if hasattr(model, "get_inputs") and hasattr(model, "run") else ort_session(model, threads)


def _feed(session, inputs: Any) -> dict:
    tensors = _input_tensors(inputs)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise NetslimError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(tensors)}")
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors)}


def run_onnx(model: Any, inputs: Any) -> list[torch.Tensor]:
    """Run an ONNX model (file, bytes or :func:`ort_session`) in onnxruntime on ``inputs``: the same form
    as the example input it was exported with (a tensor, a tuple of tensors, a list of images). Returns one tensor per ONNX output, in the flattened order of the PyTorch model's
    output (:mod:`netslim.outputs`): ``run_onnx(...)[0]`` for a classifier."""
    session = _session(model)
    feed = _feed(session, inputs)
    try:
        results = session.run(None, feed)
    except Exception as exc:
        shapes = {n: list(v.shape) for n, v in feed.items()}
        expected = {i.name: i.shape for i in session.get_inputs()}
        raise NetslimError(f"onnxruntime refused inputs {shapes} (the model expects {expected}; a fixed batch "
                           f"size means it was exported with dynamic_batch=False): {str(exc)[:300]}") from None
    return [torch.from_numpy(r) for r in results]


def ort_latency_ms(session_or_file: Any, example_input: Inputs, batch_sizes: Sequence[int] = (1,),
                   threads: int | None = None, repeats: int = 20, warmup: int = 3) -> dict[int, float]:
    """Median milliseconds of one onnxruntime run per batch size (the example's first sample repeated to
    each batch size), after ``warmup`` runs; the same protocol as :func:`netslim.profile.measure_latency`.
    ``threads`` applies when a session is made here from a file or bytes. A model taking a list of images
    is timed on the example as given, keyed by its number of images."""
    session = _session(session_or_file, threads)
    args = as_args(example_input)
    if all(isinstance(a, torch.Tensor) and a.dim() for a in args):
        feeds = {int(bs): tuple(a[:1].expand(bs, *a.shape[1:]) for a in args) for bs in batch_sizes}
    else:
        feeds = {len(_input_tensors(example_input)): example_input}
    result: dict[int, float] = {}
    for bs, inputs in feeds.items():
        feed = _feed(session, inputs)
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
        result[bs] = statistics.median(times)
    return result


def check_onnx(model: nn.Module, onnx_file: Any, inputs: Inputs) -> dict:
    """Run ``model`` in PyTorch and the ONNX file (path, bytes or session) in onnxruntime on ``inputs``.

    Returns ``outputs`` (how many tensors), ``max_abs_diff`` (over all of them; infinite when a shape
    differs), ``per_output`` (name -> max abs difference), ``shape_mismatches`` (names of outputs whose
    shapes differ, e.g. a detection model that found another number of boxes) and ``top1_agreement``: for a
    classifier (one 2-D output), the share of samples whose arg-max class is the same; ``None`` otherwise.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(*as_args(inputs))
    finally:
        model.train(was_training)
    expected = flatten_outputs(reference)
    got = run_onnx(onnx_file, inputs)
    if len(got) != len(expected):
        raise NetslimError(f"the ONNX model has {len(got)} outputs, the PyTorch model {len(expected)}: "
                           "was it exported from this model?")
    per_output, mismatches = {}, []
    for name, a, b in zip(output_names(reference), expected, got):
        if tuple(a.shape) != tuple(b.shape):
            per_output[name] = float("inf")
            mismatches.append(name)
        else:
            per_output[name] = float((a.detach().cpu().double() - b.double()).abs().max()) if a.numel() else 0.0
    top1 = None
    if len(expected) == 1 and expected[0].dim() == 2 and not mismatches:
        top1 = float((expected[0].argmax(1).cpu() == got[0].argmax(1)).float().mean())
    return {"outputs": len(expected), "max_abs_diff": max(per_output.values(), default=0.0),
            "per_output": per_output, "shape_mismatches": mismatches, "top1_agreement": top1}


__all__ = ["to_onnx", "onnx_bytes", "traced_onnx_bytes", "is_quantized", "export_names", "input_names",
           "ort_session", "run_onnx", "ort_latency_ms", "check_onnx"]
