"""Where the time goes: per-layer latency of a model, and of a compressed model against its dense original.

A compressed model with 3x fewer MACs is often well short of 3x faster; this module names the layers that
lose the speed-up. :func:`layer_breakdown` times every layer of one model in one runtime:

* ``runtime="torch"``: eager PyTorch on the CPU under ``torch.profiler``. Every module is wrapped in a
  ``record_function`` range by forward pre/post hooks; a module's time is that of the operators its range
  holds directly (not through a child module's range), so a leaf layer (Conv, Linear, BatchNorm, ReLU,
  pooling ...) gets its operators and a block those of its own ``forward`` (a residual ``out + x``, a
  functional ReLU). Operators of pure containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``)
  go to the nearest module above them that has a row; the model's own ``forward`` is the ``(model)`` row.
  The rest of the forward pass's time (Python, module calls, the profiling hooks) is ``(outside ops)``.
* ``runtime="ort"``: the model exported by :func:`netslim.export.onnx_bytes` and run in onnxruntime (CPU, all
  graph optimizations) with ``SessionOptions.enable_profiling``; the trace's ``Node`` events (``dur`` in
  microseconds) are summed per node. onnxruntime fuses Conv + BatchNorm + ReLU (+ Add) into one node and names
  it after a tensor of the exported graph; the node is traced back to the exported node of its main operator
  (Conv, Gemm ...), whose scope (``/layer1/layer1.0/conv1/Conv``) names the module. Nodes without a scope
  (the layout changes onnxruntime adds, ``ReorderOutput``) are summed per operator (``(ReorderOutput)``);
  session time outside every node is the ``(outside nodes)`` row.
  BatchNorm layers folded into convolutions have no row of their own.

Times are medians over ``repeats`` runs after ``warmup`` runs, at a fixed thread count, on the model with
masks and other parametrizations baked in (:func:`netslim.profile.deployable_copy`), the example's first sample
repeated to ``batch``. Profiling costs a little per operator, so the total is above the plain latency of
:func:`netslim.profile.measure_latency`; shares are of the profiled total and sum to 1.

:func:`compare_breakdown` runs both models in turn in one loop (so drift hits both alike), in one runtime,
and matches layers by module name:
a pruned model keeps its names; a layer replaced by several (a low-rank ``nn.Sequential`` of factor layers at
the original layer's name, :mod:`netslim.lowrank`) is summed under that name. Each row gets its speed-up, its
MAC reduction and their ratio: 1.0 where the layer got as much faster as its MACs promise, lower where the
cut is lost.
"""
from __future__ import annotations

import bisect
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import NetslimError, unknown_choice
from ..outputs import as_args, batch_size, flatten_outputs, output_shapes
from .counting import layer_macs
from .latency import fixed_threads

RUNTIMES = ("torch", "ort")
ROOT = "(model)"
OUTSIDE = "(outside nodes)"  # onnxruntime session time outside every node
OUTSIDE_OPS = "(outside ops)"  # torch: Python, module calls and the profiling hooks, outside every operator
_SPECIAL = (ROOT, OUTSIDE_OPS, OUTSIDE)
_TAG = "netslim.model"  # a range per module: netslim.model<i>::<module name>
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class LayerTime:
    """One row of a breakdown: a module (or an onnxruntime node without a module) and its time per run."""

    name: str
    kind: str
    ms: float
    share: float = 0.0
    macs: int = 0
    input_shape: tuple = ()
    output_shape: tuple = ()
    leaf: bool = False  # a module without children: a low-rank replacement's factors are summed under it

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"], d["output_shape"] = _lists(self.input_shape), _lists(self.output_shape)
        return d


@dataclass
class ComparedLayer:
    """One layer of the compressed model next to the same layer of the dense original."""

    name: str
    kind: str
    input_shape: tuple
    output_shape: tuple
    dense_macs: int
    macs: int
    dense_ms: float
    ms: float
    share: float  # of the compressed model's total time
    dense_share: float

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.ms if self.ms > 0 and self.dense_ms > 0 else None

    @property
    def mac_reduction(self) -> float | None:
        return self.dense_macs / self.macs if self.macs > 0 and self.dense_macs > 0 else None

    @property
    def realized(self) -> float | None:
        """Speed-up divided by MAC reduction: 1.0 when the layer got as much faster as its MACs promise."""
        s, r = self.speedup, self.mac_reduction
        return s / r if s is not None and r is not None else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"], d["output_shape"] = _lists(self.input_shape), _lists(self.output_shape)
        d.update(speedup=self.speedup, mac_reduction=self.mac_reduction, realized=self.realized)
        return d


@dataclass
class BreakdownComparison:
    """Per-layer times of a compressed model and its dense original, measured in one call."""

    layers: list[ComparedLayer]
    runtime: str
    batch: int
    threads: int
    repeats: int
    dense_ms: float
    ms: float
    dense_macs: int = 0
    macs: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ms if self.ms > 0 else float("nan")

    @property
    def mac_reduction(self) -> float | None:
        return self.dense_macs / self.macs if self.macs > 0 and self.dense_macs > 0 else None

    def slowest(self, k: int = 5) -> list[ComparedLayer]:
        """The ``k`` layers with the largest share of the compressed model's time, largest first (the time
        outside every operator or node, ``(outside ops)`` / ``(outside nodes)``, is no layer)."""
        return sorted((r for r in self.layers if r.name not in (OUTSIDE, OUTSIDE_OPS)), key=lambda r: -r.share)[:k]

    def lagging(self, k: int = 5) -> list[ComparedLayer]:
        """Up to ``k`` layers whose speed-up falls short of their MAC reduction (ratio below 1, lowest first),
        among the layers whose MACs changed by more than 5 % (an untouched layer has no cut to lose)."""
        rated = [r for r in self.layers
                 if r.realized is not None and r.realized < 1.0 and abs(r.mac_reduction - 1.0) > 0.05]
        return sorted(rated, key=lambda r: r.realized)[:k]

    def to_dict(self, top: int = 5) -> dict:
        return {"runtime": self.runtime, "batch": self.batch, "threads": self.threads, "repeats": self.repeats,
                "dense_ms": self.dense_ms, "ms": self.ms, "speedup": self.speedup, "dense_macs": self.dense_macs,
                "macs": self.macs, "mac_reduction": self.mac_reduction, "notes": list(self.notes),
                "slowest": [r.name for r in self.slowest(top)], "lagging": [r.name for r in self.lagging(top)],
                "layers": [r.to_dict() for r in self.layers]}

    def markdown(self, top: int = 5) -> str:
        """A Markdown table, one row per layer in execution order; ``slowest #i`` flags the ``top`` largest
        shares of the compressed model's time, ``lags #i`` the ``top`` lowest speed-up / MAC-cut ratios."""
        slow = {r.name: i for i, r in enumerate(self.slowest(top), 1)}
        lag = {r.name: i for i, r in enumerate(self.lagging(top), 1)}
        lines = ["| layer | kind | input -> output | MACs | MAC cut | dense ms | ms | share | speed-up "
                 "| speed-up / MAC cut | flag |", "|" + " --- |" * 11]
        for r in self.layers:
            flags = ", ".join(([f"slowest #{slow[r.name]}"] if r.name in slow else [])
                              + ([f"lags #{lag[r.name]}"] if r.name in lag else []))
            lines.append(f"| {r.name} | {r.kind} | {_shapes(r.input_shape, r.output_shape)} | {_human(r.macs)} "
                         f"| {_x(r.mac_reduction)} | {r.dense_ms:.4f} | {r.ms:.4f} | {100 * r.share:.1f}% "
                         f"| {_x(r.speedup)} | {_f(r.realized)} | {flags} |")
        red = self.mac_reduction
        ratio = _f(self.speedup / red if red else None)
        lines += ["", f"{self.runtime}, batch {self.batch}, {self.threads} thread(s), median of {self.repeats} "
                      f"profiled runs: dense {self.dense_ms:.3f} ms, compressed {self.ms:.3f} ms, "
                      f"{self.speedup:.2f}x faster for {_x(red)} fewer MACs (ratio {ratio})"]
        lines.append("slowest: " + ", ".join(f"{r.name} ({100 * r.share:.1f}%)" for r in self.slowest(top)))
        lagging = self.lagging(top)
        if lagging:
            lines.append("furthest below their MAC cut: " + ", ".join(
                f"{r.name} ({_x(r.speedup)} faster for {_x(r.mac_reduction)} fewer MACs)" for r in lagging))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one model
def layer_breakdown(model: nn.Module, example_input: Any, *, runtime: str = "torch", batch: int = 1,
                    threads: int = 1, repeats: int = 20, warmup: int = 3) -> list[LayerTime]:
    """Per-layer time of ``model`` on ``example_input`` (a tensor or a tuple of positional inputs; the first
    sample repeated to ``batch``) in ``runtime`` (``"torch"`` or ``"ort"``), in execution order; ``share``
    is of the model's total profiled time. See the module docstring for what each runtime's rows hold."""
    _check_args(runtime, batch, threads, repeats, warmup)
    model = _prepared(model)
    inputs = _batched(example_input, batch)
    table, _ = _module_table(model, inputs, "the model")
    return _breakdowns([model], inputs, [table], runtime, threads, repeats, warmup)[0]


def _check_args(runtime: str, batch: int, threads: int, repeats: int, warmup: int) -> None:
    if runtime not in RUNTIMES:
        raise unknown_choice("runtime", runtime, RUNTIMES)
    for what, value, low in (("batch", batch, 1), ("threads", threads, 1), ("repeats", repeats, 1),
                             ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise NetslimError(f"{what} must be an integer >= {low}, got {value!r}")


def _prepared(model: nn.Module) -> nn.Module:
    from . import deployable_copy

    return deployable_copy(model).cpu().eval()


def _batched(example_input: Any, batch: int) -> Any:
    """The example's first sample repeated to ``batch``, in the example's own form (tensor or tuple)."""
    if isinstance(example_input, torch.Tensor) and example_input.dim():
        return example_input[:1].detach().cpu().expand(batch, *example_input.shape[1:]).contiguous()
    if isinstance(example_input, tuple) and batch_size(example_input) is not None:
        return tuple(a[:1].detach().cpu().expand(batch, *a.shape[1:]).contiguous() for a in example_input)
    raise NetslimError(f"the per-layer breakdown takes a tensor or a tuple of tensors with a batch axis, got "
                       f"{type(example_input).__name__}")


@dataclass
class _Module:
    kind: str
    leaf: bool
    row: bool
    input_shape: tuple = ()
    output_shape: tuple = ()
    macs: int = 0


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(output_shapes(x))


def _module_table(model: nn.Module, inputs: Any, what: str) -> tuple[dict[str, _Module], Any]:
    """One forward pass: every called module's kind, shapes and MACs, in the order of first call."""
    table: dict[str, _Module] = {}
    handles = []

    def pre(name: str, module: nn.Module):
        def fn(_module, _inputs):
            if name not in table:
                children = any(True for _ in module.children())
                table[name] = _Module(type(module).__name__, not children,
                                      name == "" or not isinstance(module, _CONTAINERS))
        return fn

    def post(name: str):
        def fn(module, args, output):
            m = table[name]
            if not m.output_shape:
                m.input_shape = _shape(args[0] if len(args) == 1 else args)
                m.output_shape = _shape(output)
            m.macs += layer_macs(module, args, output)
        return fn

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name, module)))
        handles.append(module.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            output = model(*as_args(inputs))
    except RuntimeError as exc:
        raise NetslimError(f"{what} cannot run on input {_shape(inputs)}: {(str(exc).splitlines() or [''])[0][:300]}"
                           ) from None
    finally:
        for h in handles:
            h.remove()
    return table, output


def _own_row(name: str, table: dict[str, _Module]) -> str:
    """The row a module's time goes to: itself, or for a pure container the nearest row above it."""
    while name and not (name in table and table[name].row):
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name


def _breakdowns(models: list[nn.Module], inputs: Any, tables: list[dict[str, _Module]], runtime: str, threads: int,
                repeats: int, warmup: int) -> list[list[LayerTime]]:
    """The rows of each model, all timed in one loop that runs the models in turn (drift hits all alike)."""
    from .ort_trace import ort_times

    timed = (_torch_times(models, inputs, threads, repeats, warmup) if runtime == "torch"
             else ort_times(models, inputs, threads, repeats, warmup))
    return [_rows(table, per_module, extra, runtime) for table, (per_module, extra) in zip(tables, timed)]


def _rows(table: dict[str, _Module], per_module: dict[str, float], extra: dict[str, tuple[str, float]],
          runtime: str) -> list[LayerTime]:
    times: dict[str, float] = {}
    for name, ms in per_module.items():
        row = _own_row(name, table)
        times[row] = times.get(row, 0.0) + ms
    rows = []
    for name, m in table.items():
        if name and m.row and (name in times or (runtime == "torch" and m.leaf)):
            rows.append(LayerTime(name, m.kind, times.get(name, 0.0), 0.0, m.macs, m.input_shape, m.output_shape,
                                  m.leaf))
    rows += [LayerTime(name, kind, ms) for name, (kind, ms) in extra.items() if name not in _SPECIAL]
    if "" in times:
        root = table[""]
        rows.append(LayerTime(ROOT, root.kind, times[""], 0.0, root.macs, root.input_shape, root.output_shape,
                              root.leaf))
    rows += [LayerTime(name, kind, ms) for name, (kind, ms) in extra.items() if name in _SPECIAL]
    total = sum(r.ms for r in rows)
    for r in rows:
        r.share = r.ms / total if total > 0 else 0.0
    return rows


_Timed = tuple[dict[str, float], dict[str, tuple[str, float]]]  # ms per module name; {row name: (kind, ms)}


def _torch_times(models: list[nn.Module], inputs: Any, threads: int, repeats: int, warmup: int) -> list[_Timed]:
    """Per model: median ms per run of the operators each module calls itself (not through a child module),
    and {OUTSIDE_OPS: the rest of the forward pass: Python, module calls and these hooks}."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    open_ranges: dict[str, list] = {}
    handles = []

    def pre(tag: str):
        def fn(_module, _inputs):
            rf = record_function(tag)
            rf.__enter__()
            open_ranges.setdefault(tag, []).append(rf)
        return fn

    def post(tag: str):
        def fn(_module, _inputs, _output):
            open_ranges[tag].pop().__exit__(None, None, None)
        return fn

    tags = [f"{_TAG}{i}::" for i in range(len(models))]
    for tag, model in zip(tags, models):
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(tag + name)))
            handles.append(module.register_forward_hook(post(tag + name)))
    args = as_args(inputs)
    try:
        with fixed_threads(threads), torch.inference_mode():
            for _ in range(warmup):
                for model in models:
                    model(*args)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(repeats):
                    for model in models:
                        model(*args)
    finally:
        for h in handles:
            h.remove()
    events = list(prof.events())
    result = []
    for tag in tags:
        roots = sorted((e for e in events if e.name == tag), key=lambda e: e.time_range.start)  # one per run
        starts = [e.time_range.start for e in roots]
        runs: list[dict[str, float]] = [{} for _ in roots]
        for event in events:
            parent = event.cpu_parent
            if parent is None or not parent.name.startswith(tag) or event.name.startswith((_TAG, "[")):
                continue  # a module's range, or an operator called by another operator or by another model
            run = bisect.bisect_right(starts, event.time_range.start) - 1
            if run >= 0:
                module = parent.name[len(tag):]
                runs[run][module] = runs[run].get(module, 0.0) + event.cpu_time_total
        for root, run in zip(roots, runs):
            run[OUTSIDE_OPS] = max(root.cpu_time_total - sum(run.values()), 0.0)
        per_module = _medians_ms(runs)
        result.append((per_module, {OUTSIDE_OPS: ("python", per_module.pop(OUTSIDE_OPS, 0.0))}))
    return result


def _medians_ms(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over runs of its microseconds (0 in a run without it), in milliseconds."""
    if not runs:
        raise NetslimError("the profiler recorded no run of the model: cannot time its layers")
    keys = dict.fromkeys(k for run in runs for k in run)
    return {k: statistics.median(run.get(k, 0.0) for run in runs) / 1e3 for k in keys}


# ---------------------------------------------------------------------------------------------- two models
def compare_breakdown(original: nn.Module, compressed: nn.Module, example_input: Any, *, runtime: str = "torch",
                      batch: int = 1, threads: int = 1, repeats: int = 20, warmup: int = 3) -> BreakdownComparison:
    """Per-layer times of ``compressed`` next to ``original`` in one runtime, batch and thread count, matched
    by module name (a layer replaced by several is summed under its original name). ``.slowest(k)`` names the
    layers with the largest share of the compressed model's time, ``.lagging(k)`` those whose speed-up falls
    furthest short of their MAC reduction, ``.markdown()`` prints the table."""
    _check_args(runtime, batch, threads, repeats, warmup)
    inputs = _batched(example_input, batch)
    dense, comp = _prepared(original), _prepared(compressed)
    dense_table, dense_out = _module_table(dense, inputs, "the original model")
    comp_table, comp_out = _module_table(comp, inputs, "the compressed model")
    want = [tuple(t.shape) for t in flatten_outputs(dense_out)]
    got = [tuple(t.shape) for t in flatten_outputs(comp_out)]
    if want != got:
        raise NetslimError(f"the compressed model's output shapes {got} differ from the original's {want} on input "
                           f"{_shape(inputs)}: is it a compressed form of this model?")
    dense_rows, comp_rows = _breakdowns([dense, comp], inputs, [dense_table, comp_table], runtime, threads,
                                        repeats, warmup)
    layers = _match(dense_rows, comp_rows)
    notes = []
    unmatched = [r.name for r in layers if r.dense_ms == 0 and r.dense_macs == 0 and r.name not in _SPECIAL]
    if unmatched:
        notes.append(f"{len(unmatched)} row(s) of the compressed model have no layer of that name in the original: "
                     + ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else ""))
    return BreakdownComparison(layers, runtime, batch, threads, repeats, sum(r.ms for r in dense_rows),
                               sum(r.ms for r in comp_rows), sum(m.macs for m in dense_table.values()),
                               sum(m.macs for m in comp_table.values()), notes)


def _match(dense_rows: list[LayerTime], comp_rows: list[LayerTime]) -> list[ComparedLayer]:
    """Rows of both models under one name each: a compressed row under a layer that is a leaf of the original
    (the factors of a decomposed layer) goes to that layer."""
    dense_leaves = {r.name for r in dense_rows if r.leaf}

    def target(name: str) -> str:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in dense_leaves:
                return prefix
        return name

    merged: dict[str, dict] = {}
    order = [r.name for r in dense_rows if r.name not in _SPECIAL]
    for r in dense_rows:
        merged[r.name] = {"dense": r, "comp": []}
    for r in comp_rows:
        name = target(r.name) if r.leaf else r.name
        if name not in merged:
            merged[name] = {"dense": None, "comp": []}
            if name not in _SPECIAL:
                order.append(name)
        merged[name]["comp"].append(r)
    order += [n for n in _SPECIAL if n in merged]
    layers = []
    for name in order:
        d, cs = merged[name]["dense"], merged[name]["comp"]
        kinds = [c.kind for c in cs]
        if d is None:
            kind = "+".join(kinds)
        elif not cs or (len(cs) == 1 and cs[0].name == name and cs[0].kind == d.kind):
            kind = d.kind
        else:
            kind = f"{d.kind} -> " + "+".join(kinds)
        shaped = [c for c in cs if c.input_shape] or ([d] if d is not None else [])
        layers.append(ComparedLayer(
            name, kind, shaped[0].input_shape if shaped else (), shaped[-1].output_shape if shaped else (),
            d.macs if d else 0, sum(c.macs for c in cs), d.ms if d else 0.0, sum(c.ms for c in cs),
            sum(c.share for c in cs), d.share if d else 0.0))
    return layers


# ---------------------------------------------------------------------------------------------- formatting
def _lists(shape: Any) -> Any:
    return [_lists(s) for s in shape] if isinstance(shape, (tuple, list)) else shape


def _dims(shape: tuple) -> str:
    if not shape:
        return "?"
    if isinstance(shape[0], tuple):
        return ", ".join(_dims(s) for s in shape)
    return "x".join(str(d) for d in shape)


def _shapes(a: tuple, b: tuple) -> str:
    return "" if not a and not b else f"{_dims(a)} -> {_dims(b)}"


def _human(n: int) -> str:
    if not n:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


__all__ = ["layer_breakdown", "compare_breakdown", "LayerTime", "ComparedLayer", "BreakdownComparison", "RUNTIMES"]
