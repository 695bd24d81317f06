"""onnxruntime's per-node profile of a model, traced back to the PyTorch modules the nodes came from.

The model exported by :func:`netslim.export.onnx_bytes` runs in an onnxruntime CPU session with every graph
optimization on and ``SessionOptions.enable_profiling``; the trace's ``Node`` events (``dur`` in microseconds)
are summed per node and run. onnxruntime fuses Conv + BatchNorm + ReLU (+ Add) into one node named after a
tensor of the exported graph; :class:`_OnnxGraph` follows that tensor back to the exported node of the fused
node's main operator (Conv, Gemm ...), whose scope (``/layer1/layer1.0/conv1/Conv``) names the module. Nodes
without a scope (the layout changes onnxruntime adds, ``ReorderOutput``) are kept per operator. Used by
:mod:`netslim.profile.breakdown` for ``runtime="ort"``.
"""
from __future__ import annotations

import bisect
import json
import os
import tempfile
from typing import Any

from torch import nn

from ..outputs import as_args, flatten_outputs
from .breakdown import OUTSIDE, _medians_ms, _Timed


def ort_times(models: list[nn.Module], inputs: Any, threads: int, repeats: int, warmup: int) -> list[_Timed]:
    """Per model: median ms per run per module name, and {row name: (op, ms)} for nodes without a module
    and for the session's time outside every node. The sessions run in turn, each with its own trace."""
    from ..export import _onnxruntime, onnx_bytes

    ort = _onnxruntime()
    exported = [onnx_bytes(model, inputs) for model in models]
    tensors = flatten_outputs(as_args(inputs))
    traces = []
    with tempfile.TemporaryDirectory(prefix="netslim-ort-") as tmp:
        sessions = []
        for i, data in enumerate(exported):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = threads
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, f"model{i}")
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            sessions.append((session, {s.name: t.numpy() for s, t in zip(session.get_inputs(), tensors)}))
        for _ in range(warmup + repeats):
            for session, feed in sessions:
                session.run(None, feed)
        for session, _ in sessions:
            with open(session.end_profiling()) as f:
                traces.append(json.load(f))
    return [_ort_trace_times(events, model, data, warmup) for events, model, data in zip(traces, models, exported)]


def _ort_trace_times(events: list[dict], model: nn.Module, data: bytes, warmup: int) -> _Timed:
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[warmup:]
    starts = [e["ts"] for e in model_runs]
    runs: list[dict[str, float]] = [{} for _ in model_runs]
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        run = bisect.bisect_right(starts, e["ts"]) - 1
        if run >= 0:
            node = e["name"][: -len("_kernel_time")]
            ops[node] = e.get("args", {}).get("op_name", "?")
            runs[run][node] = runs[run].get(node, 0.0) + e["dur"]
    for model_run, run in zip(model_runs, runs):
        run[OUTSIDE] = max(model_run["dur"] - sum(run.values()), 0.0)
    per_node = _medians_ms(runs)
    graph = _OnnxGraph(data)
    modules = {name for name, _ in model.named_modules()}
    per_module: dict[str, float] = {}
    extra: dict[str, tuple[str, float]] = {}
    outside = per_node.pop(OUTSIDE)
    for node, ms in per_node.items():
        module = _scope_module(graph.source_node(node, ops[node]), modules)
        if module is None:  # nodes onnxruntime added (ReorderInput, ReorderOutput ...): one row per operator
            row = f"({ops[node]})"
            extra[row] = (ops[node], extra.get(row, ("", 0.0))[1] + ms)
        else:
            per_module[module] = per_module.get(module, 0.0) + ms
    extra[OUTSIDE] = ("session", outside)
    return per_module, extra


class _OnnxGraph:
    """The exported graph's nodes by name and by output tensor, to trace an optimized node to its source."""

    def __init__(self, data: bytes) -> None:
        self.nodes: dict[str, Any] = {}
        self.producer: dict[str, Any] = {}
        try:
            import onnx
        except ImportError:  # node names alone then
            return
        for node in onnx.load_from_string(data).graph.node:
            self.nodes[node.name] = node
            for out in node.output:
                self.producer[out] = node

    def source_node(self, name: str, op: str) -> str:
        """The exported node an onnxruntime node ``name`` (operator ``op``) mostly comes from; ``name``
        itself when none is found. A fused node named after a tensor (``/layer1/layer1.0/Relu_output_0_nchwc``)
        is traced back through the cheap operators fused into it to the node of its main operator."""
        if name.startswith("fused "):  # onnxruntime's name for a node fused from exported ones (FusedGemm)
            name = name[len("fused "):]
        start, key = self.nodes.get(name), name
        while start is None and key:
            start = self.nodes.get(key) or self.producer.get(key)
            key = key.rsplit("_", 1)[0] if "_" in key else ""
        if start is None:
            return name
        main = _main_op(op)
        frontier, seen = [start], {start.name}
        for _ in range(4):
            following = []
            for node in frontier:
                if node.op_type == main:
                    return node.name
                for tensor in node.input:
                    p = self.producer.get(tensor)
                    if p is not None and p.name not in seen and p.op_type not in ("Constant", "Identity"):
                        seen.add(p.name)
                        following.append(p)
            frontier = following
        return start.name


def _main_op(op: str) -> str:
    """``FusedConv -> Conv``, ``QLinearConv -> Conv``, ``FusedGemm -> Gemm``, ``QGemm -> Gemm``."""
    for prefix in ("QLinear", "Fused", "Q"):
        if op.startswith(prefix) and op[len(prefix):][:1].isupper():
            return op[len(prefix):]
    return op


def _scope_module(node_name: str, modules: set[str]) -> str | None:
    """The module an exported node's scope names (``/layer2/layer2.0/downsample/downsample.0/Conv`` ->
    ``layer2.0.downsample.0``; ``/Flatten`` -> the model, ``""``); ``None`` for a name without a scope."""
    if not node_name.startswith("/"):
        return None
    module = ""
    for seg in node_name.strip("/").split("/")[:-1]:
        last = module.rsplit(".", 1)[-1]
        candidates = (f"{module}.{seg}" if module else seg,
                      seg if seg.startswith(module + ".") else "",
                      module + seg[len(last):] if module and seg.startswith(last + ".") else "")
        found = next((c for c in candidates if c and c in modules), None)
        if found is None:
            break
        module = found
    return module


__all__ = ["ort_times"]
