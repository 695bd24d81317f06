"""Integer deployment: ONNX with QuantizeLinear/DequantizeLinear (QDQ) carrying netslim's own scales and
zero points, executed by ONNX Runtime, whose graph optimizer fuses DQ -> Conv/MatMul -> Q into integer
kernels (QLinearConv, QGemm, QLinearAdd ...).

Weights are written as int8 initializers behind a DequantizeLinear (a QuantizeLinear applied to a
constant is folded here, so the file stores one byte per weight and the runtime sees the pattern it
fuses). Activations narrower than 8 bits are a Clip in front of an 8-bit Q/DQ with the same step,
which reproduces the narrower grid exactly.
"""
from __future__ import annotations

import copy
import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NetslimError
from ..io import atomic_write


def onnx_qdq_bytes(qmodel: nn.Module, example_input: torch.Tensor, opset: int = 17) -> bytes:
    """Serialize a quantized model (from :func:`netslim.quant.quantize` or QAT) as a QDQ ONNX model."""
    import onnx

    from .ptq import set_mode

    model = copy.deepcopy(qmodel).eval().cpu()
    set_mode(model, "quantize")
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "parametrizations") and "weight" in layer.parametrizations:
                layer.parametrizations.weight.original.copy_(layer.weight)  # onto the grid, once
    set_mode(model, "export")
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example_input.cpu(),), buffer, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(model, (example_input.cpu(),), buffer, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    graph = onnx.load_from_string(buffer.getvalue())
    fold_constant_quantize(graph)
    drop_unused(graph)
    return graph.SerializeToString()


def drop_unused(model) -> None:
    """Remove nodes and initializers nothing reads any more (the float weights a fold replaced)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        for n in dead:
            model.graph.node.remove(n)
        if not dead:
            break
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)


def fold_constant_quantize(model) -> int:
    """Replace every QuantizeLinear whose input is an initializer by the integer initializer it computes."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    identities = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def value(name):
        while name in identities:
            name = identities[name]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        x, scale = value(node.input[0]), value(node.input[1])
        zp = value(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if x is None or scale is None or zp is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * x.ndim
        if scale.ndim == 1 and x.ndim > 0:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x / scale.reshape(shape)) + zp.reshape(shape if zp.ndim else ()).astype(np.int64),
                    info.min, info.max).astype(zp.dtype)
        tensor = numpy_helper.from_array(q, name=node.output[0])
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
        folded += 1
    return folded


def to_onnx_qdq(qmodel: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """Write the QDQ ONNX file atomically."""
    data = onnx_qdq_bytes(qmodel, example_input)
    return atomic_write(path, lambda f: f.write(data))


def ort_session(model_file: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session with all graph optimizations (QDQ fusion into integer kernels)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise NetslimError("running ONNX models needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    source = model_file if isinstance(model_file, bytes) else str(model_file)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_run(session, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def ort_latency_ms(session, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one ``session.run`` on ``x``, in milliseconds."""
    name, feed = session.get_inputs()[0].name, x.detach().cpu().numpy()
    for _ in range(warmup):
        session.run(None, {name: feed})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {name: feed})
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def integer_ops(model_bytes: bytes) -> dict[str, int]:
    """Op types of the graph ONNX Runtime actually executes after its optimizations (counts)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath)
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
