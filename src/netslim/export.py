"""Deployment export: ONNX files that onnxruntime runs, checked against PyTorch."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import NetslimError
from .io import atomic_write


def onnx_bytes(model: nn.Module, example_input: torch.Tensor, opset: int = 18) -> bytes:
    """Serialize ``model`` to ONNX: the ``torch.export``-based exporter when ``onnxscript`` is installed,
    the TorchScript-based one otherwise."""
    try:
        import onnxscript  # noqa: F401
        dynamo = True
    except ImportError:
        dynamo = False
    buffer = io.BytesIO()
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"dynamo": dynamo, "opset_version": opset if dynamo else min(opset, 17)}
        if dynamo:
            kwargs["verbose"] = False
        torch.onnx.export(model, (example_input,), buffer, **kwargs)
    return buffer.getvalue()


def to_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = 18) -> Path:
    """Write ``model`` as an ONNX file atomically."""
    data = onnx_bytes(model, example_input, opset)
    return atomic_write(path, lambda f: f.write(data))


def run_onnx(model_file: str | Path | bytes, inputs: torch.Tensor) -> torch.Tensor:
    """Run an ONNX model in onnxruntime (CPU) on ``inputs``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise NetslimError("running ONNX models needs onnxruntime: pip install onnxruntime") from None
    source = model_file if isinstance(model_file, bytes) else str(model_file)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: inputs.detach().cpu().numpy()})[0]
    return torch.from_numpy(out)
