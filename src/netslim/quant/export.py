"""Integer deployment: ONNX with QuantizeLinear/DequantizeLinear (QDQ) carrying netslim's own scales and
zero points, executed by ONNX Runtime, whose graph optimizer fuses DQ -> Conv/MatMul -> Q into integer
kernels (QLinearConv, QGemm, QLinearAdd ...).

Weights are written as int8 initializers behind a DequantizeLinear (a QuantizeLinear applied to a
constant is folded here, so the file stores one byte per weight and the runtime sees the pattern it
fuses). Activations narrower than 8 bits are a Clip in front of an 8-bit Q/DQ with the same step,
which reproduces the narrower grid exactly.

Running the file: :func:`netslim.export.ort_session`, :func:`~netslim.export.run_onnx` and
:func:`~netslim.export.ort_latency_ms` (``ort_session`` is re-exported here for old callers).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..export import ort_session
from ..io import atomic_write


def onnx_qdq_bytes(qmodel: nn.Module, example_input, opset: int = 17, *, dynamic_batch: bool = True) -> bytes:
    """Serialize a quantized model (from :func:`netslim.quant.quantize` or QAT) as a QDQ ONNX model, with the
    input and output names and dynamic batch axis of :func:`netslim.export.onnx_bytes` (which calls this
    for quantized models)."""
    import onnx

    from ..export import traced_onnx_bytes
    from .ptq import set_mode

    model = copy.deepcopy(qmodel).eval().cpu()
    set_mode(model, "quantize")
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "parametrizations") and "weight" in layer.parametrizations:
                layer.parametrizations.weight.original.copy_(layer.weight)  # onto the grid, once
    set_mode(model, "export")
    graph = onnx.load_from_string(traced_onnx_bytes(model, example_input, opset=opset, dynamic_batch=dynamic_batch))
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


def to_onnx_qdq(qmodel: nn.Module, example_input, path: str | Path, opset: int = 17) -> Path:
    """Write the QDQ ONNX file atomically (what :func:`netslim.export.to_onnx` does for a quantized model)."""
    data = onnx_qdq_bytes(qmodel, example_input, opset)
    return atomic_write(path, lambda f: f.write(data))


def integer_ops(model_bytes: bytes) -> dict[str, int]:
    """Op types of the graph ONNX Runtime actually executes after its optimizations (counts)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        ort_session(model_bytes, optimized_model_path=Path(d) / "opt.onnx")
        graph = onnx.load(Path(d) / "opt.onnx")
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
