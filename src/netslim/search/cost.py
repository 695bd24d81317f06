"""Targets with measured cost: the device a search optimizes for, its measured latency, and a per-layer
latency lookup table cached on disk.

A compression search over several families (pruning, low rank, quantization) scores many candidate
models; timing each one whole is slow and noisy. Following NetAdapt (Yang et al. 2018, §3.2, "layer-wise
look-up tables") and HAQ (Wang et al. 2019, §3.3, hardware feedback through a latency lookup table), the
cost of a candidate is predicted as the sum of its conv/linear layers' latencies, each measured once on
the target runtime and cached by the layer's signature, plus a *residual* for everything else (batch
norm, activations, adds, pooling, the runtime's per-call overhead) that :meth:`LatencyTable.calibrate`
fits on one whole-model measurement and :meth:`LatencyTable.predict` scales with activation volume.

Only what the target really executes counts: on ``ort-cpu`` a quantized layer is timed as the int8
QDQ graph onnxruntime runs with integer kernels; on ``torch-cpu`` / ``torch-cuda`` netslim's
quantized layers run as float (PyTorch here does not execute netslim's int8), so they are timed, and
cached, as float layers and make a model no faster there.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import NetslimError, unknown_choice
from ..surgery import forward_once

DEVICES = ("ort-cpu", "torch-cpu", "torch-cuda")
FORMULAS = ("macs", "params", "size")  # formula metrics, via netslim.targets.measure
UNIT_KINDS = (nn.Conv2d, nn.Linear)
TABLE_FORMAT = 1
MAX_TABLE_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------- devices
def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NetslimError(f"{what} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class Device:
    """A latency target: runtime ``name`` (one of :data:`DEVICES`), intra-op ``threads``, ``batch`` size."""

    name: str
    threads: int = 1
    batch: int = 1

    def __post_init__(self) -> None:
        if self.name not in DEVICES:
            raise unknown_choice("device", self.name, DEVICES)
        _positive_int(self.threads, "threads")
        _positive_int(self.batch, "batch")

    @property
    def runtime(self) -> str:
        """The runtime and its version, e.g. ``onnxruntime-1.20.1`` or ``torch-2.5.1+cpu``."""
        if self.name == "ort-cpu":
            from ..export import _onnxruntime
            return f"onnxruntime-{_onnxruntime().__version__}"
        return f"torch-{torch.__version__}"

    @property
    def key(self) -> str:
        """``ort-cpu_t1_b1_onnxruntime-1.20.1``: name, threads, batch and runtime version, safe for a filename
        (a table measured under another runtime version is another table)."""
        raw = f"{self.name}_t{self.threads}_b{self.batch}_{self.runtime}"
        return re.sub(r"[^A-Za-z0-9._+-]", "-", raw)


def parse_device(name: str, threads: int = 1, batch: int = 1) -> Device:
    """The :class:`Device` called ``name``; fails with one clear line when it is unknown, the numbers are not
    integers >= 1, or its runtime is missing here (no CUDA, no onnxruntime)."""
    device = Device(name, threads, batch)
    if name == "torch-cuda" and not torch.cuda.is_available():
        raise NetslimError("device 'torch-cuda' needs a CUDA GPU, but torch.cuda.is_available() is False here; "
                           "use torch-cpu or ort-cpu")
    if name == "ort-cpu":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise NetslimError("device 'ort-cpu' needs onnxruntime: pip install 'netslim[deploy]'") from None
    return device


# ---------------------------------------------------------------------------------------------- measuring
def _torch_device(device: Device) -> torch.device:
    return torch.device("cuda" if device.name == "torch-cuda" else "cpu")


def _first_sample(example_input: torch.Tensor) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise NetslimError("measured cost needs one batched input tensor as the example input")
    return example_input[:1]


def _ort_ms(device: Device, model: nn.Module, x1: torch.Tensor, warmup: int, repeats: int, rounds: int = 1) -> float:
    from ..export import onnx_bytes, ort_latency_ms, ort_session
    from ..surgery import safe_deepcopy

    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        model = safe_deepcopy(model).cpu()
    model.eval()
    session = ort_session(onnx_bytes(model, x1.cpu()), threads=device.threads)
    return min(ort_latency_ms(session, x1.cpu(), (device.batch,), repeats=repeats, warmup=warmup)[device.batch]
               for _ in range(rounds))


def _torch_ms(device: Device, model: nn.Module, x1: torch.Tensor, warmup: int, repeats: int, rounds: int = 1) -> float:
    """``model`` must already be the deployable copy (it is moved to the device)."""
    from ..profile import measure_latency

    where = _torch_device(device)
    threads = device.threads if where.type == "cpu" else None
    with torch.inference_mode():
        return min(measure_latency(model.to(where).eval(), x1.to(where), (device.batch,), warmup, repeats,
                                   threads)[device.batch] for _ in range(rounds))


def measure_ms(device: Device, model: nn.Module, example_input: torch.Tensor, *, warmup: int = 3,
               repeats: int = 20, rounds: int = 1) -> float:
    """Median latency in ms of the whole ``model`` at batch ``device.batch`` (``example_input[:1]`` repeated),
    in eval mode, on the device's runtime: ``ort-cpu`` exports with :func:`netslim.export.onnx_bytes` (float,
    or the QDQ graph of a netslim-quantized model) and times an onnxruntime session with ``device.threads``;
    ``torch-*`` time :func:`netslim.profile.deployable_copy` with :func:`netslim.profile.measure_latency`.
    ``rounds`` > 1: the least of that many medians (one export), which damps the noise of other processes on
    a shared machine. The model itself is not changed."""
    x1 = _first_sample(example_input)
    if device.name == "ort-cpu":
        return _ort_ms(device, model, x1, warmup, repeats, rounds)
    from ..profile import deployable_copy
    return _torch_ms(device, deployable_copy(model), x1, warmup, repeats, rounds)


def _runner(device: Device, model: "nn.Module | bytes", x1: torch.Tensor):
    """A function running ``model`` (a module, or ONNX bytes on ``ort-cpu``) once at ``device.batch`` on the target."""
    if device.name == "ort-cpu":
        from ..export import onnx_bytes, ort_session

        if isinstance(model, nn.Module):
            from ..surgery import safe_deepcopy
            model = onnx_bytes(safe_deepcopy(model).cpu().eval(), x1.cpu())
        session = ort_session(model, threads=device.threads)
        feed = {session.get_inputs()[0].name: x1.cpu().expand(device.batch, *x1.shape[1:]).contiguous().numpy()}
        return lambda: session.run(None, feed)
    if not isinstance(model, nn.Module):
        raise NetslimError(f"{device.name} times PyTorch modules; ONNX bytes run on ort-cpu only")
    from ..profile import deployable_copy
    from ..profile.latency import _sync

    where = _torch_device(device)
    copy = deployable_copy(model).to(where).eval()
    batch = x1.to(where).expand(device.batch, *x1.shape[1:]).contiguous()

    def run():
        with torch.inference_mode():
            copy(batch)
        _sync(where)
    return run


def paired_ms(device: Device, model: "nn.Module | bytes", reference: "nn.Module | bytes", example_input: torch.Tensor,
              *, pairs: int = 100, warmup: int = 10) -> tuple[float, float]:
    """Median latency in ms of ``model`` and of ``reference`` on ``device``, timed *run by run in turn* (one
    run of each, ``pairs`` times), so that a slower spell of a shared machine slows both alike. Their ratio
    is the speed-up to trust: on a 2-core VM, ResNet-56 timed by separate medians a few seconds apart gave
    speed-ups of int8 from 1.16x to 1.98x; timed in turn, 1.89x to 1.93x. ``model`` / ``reference``:
    modules, or ONNX bytes on ``ort-cpu`` (e.g. a peer tool's quantized graph)."""
    import statistics
    import time

    from ..profile.latency import fixed_threads

    x1 = _first_sample(example_input)
    runs = (_runner(device, model, x1), _runner(device, reference, x1))
    times: tuple[list[float], list[float]] = ([], [])
    with fixed_threads(device.threads if device.name == "torch-cpu" else None):
        for _ in range(warmup):
            for run in runs:
                run()
        for _ in range(pairs):
            for run, got in zip(runs, times):
                t0 = time.perf_counter()
                run()
                got.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def formula(model: nn.Module, example_input: torch.Tensor, metric: str) -> float:
    """A formula cost (one of :data:`FORMULAS`) of ``model``: MACs, parameters or stored bytes, as
    :func:`netslim.targets.measure` counts them."""
    if metric not in FORMULAS:
        raise unknown_choice("formula metric", metric, FORMULAS)
    from ..targets import measure
    return measure(model, example_input, metric)


# ---------------------------------------------------------------------------------------------- units
def _base_class(module: nn.Module) -> str:
    """``Conv2d`` for a conv, also when a parametrization made its class ``ParametrizedConv2d``."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.modules"):
            return cls.__name__
    return type(module).__name__


def _weight_quantized(module: nn.Module) -> bool:
    from ..quant.modules import WeightQuant
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    return plist is not None and any(isinstance(p, WeightQuant) and p.mode != "float" and p.spec.bits <= 8
                                     for p in plist)


def _live_int8(m: nn.Module) -> bool:
    from ..quant.modules import ActQuant
    return isinstance(m, ActQuant) and m.mode in ("quantize", "export") and m.spec.bits <= 8


def _graph_quantized_inputs(model: nn.Module) -> set[str]:
    """Names of the layers of an fx-traced quantized model whose input comes from an activation quantizer,
    directly or through pass-through ops (flatten, pooling, reshapes)."""
    import torch.fx as fx

    from ..quant.graph import is_passthrough

    found: set[str] = set()
    if not isinstance(model, fx.GraphModule):
        return found
    modules = dict(model.named_modules())
    for node in model.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), UNIT_KINDS) or not node.args:
            continue
        src = node.args[0]
        while isinstance(src, fx.Node):
            if src.op == "call_module" and _live_int8(modules[src.target]):
                found.add(node.target)
                break
            if not is_passthrough(src, modules) or not src.args:
                break
            src = src.args[0]
    return found


@dataclass
class _Unit:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    quantized: bool
    output_volume: int  # output elements per sample


def _scan(model: nn.Module, example_input: torch.Tensor, batch: int) -> list[_Unit]:
    """Every conv/linear layer with its input shape (batch set to ``batch``), its quantized flag and its
    per-sample output volume, on one forward pass of ``example_input``."""
    int8_storages: list[torch.Tensor] = []  # kept alive so that storage pointers stay unique
    seen: dict[str, tuple] = {}
    handles = []

    def act_hook(m, _inputs, output):
        if _live_int8(m) and isinstance(output, torch.Tensor):
            int8_storages.append(output)

    def unit_hook(name):
        def fn(m, inputs, output):
            if name in seen or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            x = inputs[0]
            ptr = x.untyped_storage().data_ptr()
            from_int8 = any(t.untyped_storage().data_ptr() == ptr for t in int8_storages)
            volume = output[0].numel() if isinstance(output, torch.Tensor) and output.dim() else 0
            seen[name] = (tuple(x.shape), from_int8, int(volume))
        return fn

    named = [(n, m) for n, m in model.named_modules()
             if isinstance(m, UNIT_KINDS) and ".parametrizations." not in f".{n}."]
    for m in model.modules():
        if _live_int8(m):
            handles.append(m.register_forward_hook(act_hook))
    for n, m in named:
        handles.append(m.register_forward_hook(unit_hook(n)))
    forward_once(model, example_input, handles)
    graph_q = _graph_quantized_inputs(model)
    units = []
    for n, m in named:
        if n not in seen:
            warnings.warn(f"layer {n!r} did not run on the example input; it is not counted in the latency",
                          stacklevel=3)
            continue
        shape, from_int8, volume = seen[n]
        quantized = _weight_quantized(m) and (from_int8 or n in graph_q)
        units.append(_Unit(n, m, (batch, *shape[1:]), quantized, volume))
    return units


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Prediction:
    """Predicted latency: ``total_ms`` = sum of ``units_ms`` (by layer name) + ``residual_ms``."""

    total_ms: float
    units_ms: dict[str, float] = field(default_factory=dict)
    residual_ms: float = 0.0


def _default_table_path(device: Device) -> Path:
    from ..paths import cache_dir
    return cache_dir() / "latency" / f"{device.key}.json"


class LatencyTable:
    """Per-layer latency lookup table cached on disk (NetAdapt, Yang et al. 2018, §3.2; HAQ, Wang et al.
    2019, §3.3).

    A layer's latency is measured once per signature (its class, geometry -- channels, kernel, stride,
    padding, groups, bias --, input shape at ``device.batch``, and whether it runs as int8) on the device's
    runtime, less the runtime's fixed per-call overhead, and stored in ``path`` (default
    ``<netslim cache>/latency/<device.key>.json``, the cache being ``$NETSLIM_CACHE`` or ``~/.cache/netslim``).
    A second table on the same device and path re-measures nothing. ``hits`` / ``misses`` count lookups
    served from the table / measured now. ``warmup`` / ``repeats``: the timing protocol of each layer.
    """

    def __init__(self, device: Device, path: str | Path | None = None, *, warmup: int = 3,
                 repeats: int = 20) -> None:
        self.device = device
        self.path = Path(path) if path is not None else _default_table_path(device)
        self.warmup = warmup
        self.repeats = repeats
        self.entries: dict[str, float] = {}
        self.overhead_ms: float | None = None
        self.residual_ms: float = 0.0
        self.reference_volume: int = 0
        self.hits = 0
        self.misses = 0
        self.dirty = False
        self._load()

    # -------------------------------------------------------------------------------- file
    def _load(self) -> None:
        if not self.path.exists():
            return
        from ..io import bounded_json

        try:
            if self.path.stat().st_size > MAX_TABLE_BYTES:
                raise NetslimError(f"{self.path}: larger than {MAX_TABLE_BYTES} bytes")
            data = bounded_json(self.path.read_bytes(), str(self.path), "latency table")
            if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
                raise NetslimError(f"{self.path}: not a netslim latency table (format {TABLE_FORMAT})")
            if data.get("device") != self.device.key:
                raise NetslimError(f"{self.path}: measured on {data.get('device')!r}, not {self.device.key!r}")
            entries = data.get("entries", {})
            if not isinstance(entries, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in entries.items()):
                raise NetslimError(f"{self.path}: corrupt latency entries")
            overhead = data.get("overhead_ms")
            calibration = data.get("calibration") or {}
            residual = calibration.get("residual_ms", 0.0) if isinstance(calibration, dict) else None
            volume = calibration.get("reference_volume", 0) if isinstance(calibration, dict) else None
            if not (overhead is None or isinstance(overhead, (int, float))) or not isinstance(residual, (int, float)) \
                    or not isinstance(volume, int) or volume < 0:
                raise NetslimError(f"{self.path}: corrupt overhead or calibration")
        except (NetslimError, OSError) as exc:
            warnings.warn(f"ignoring the latency table {self.path} ({str(exc)[:200]}); starting empty",
                          stacklevel=3)
            return
        self.entries = {k: float(v) for k, v in entries.items()}
        self.overhead_ms = None if overhead is None else float(overhead)
        self.residual_ms, self.reference_volume = float(residual), int(volume)

    def save(self) -> None:
        """Write the table atomically (temp file + ``os.replace``), only when something changed."""
        if not self.dirty:
            return
        from ..io import save_json

        save_json({"format": TABLE_FORMAT, "device": self.device.key, "overhead_ms": self.overhead_ms,
                   "calibration": {"residual_ms": self.residual_ms, "reference_volume": self.reference_volume},
                   "entries": self.entries}, self.path)
        self.dirty = False

    # -------------------------------------------------------------------------------- lookups
    def _executes_int8(self, quantized: bool) -> bool:
        return bool(quantized) and self.device.name == "ort-cpu"

    def signature(self, module: nn.Module, input_shape: tuple[int, ...], quantized: bool = False) -> str:
        """The table key of ``module`` on ``input_shape`` (batch replaced by ``device.batch``). On torch-*
        the quantized flag is dropped: those layers run, and are timed, as float."""
        shape = (self.device.batch, *tuple(int(s) for s in input_shape)[1:])
        q = "int8" if self._executes_int8(quantized) else "float"
        return f"{_base_class(module)}({module.extra_repr()})|in={list(shape)}|{q}"

    def unit_ms(self, module: nn.Module, input_shape: tuple[int, ...], quantized: bool = False) -> float:
        """Latency in ms of ``module`` alone on an input of ``input_shape`` (batch set to ``device.batch``),
        from the table or measured now (then stored; :meth:`save` writes it)."""
        key = self.signature(module, input_shape, quantized)
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        shape = (self.device.batch, *tuple(int(s) for s in input_shape)[1:])
        ms = max(self._time_alone(module, shape, self._executes_int8(quantized)) - self._overhead(), 0.0)
        self.entries[key] = ms
        self.dirty = True
        return ms

    def _overhead(self) -> float:
        """The runtime's fixed cost of one call: a ReLU on a tiny input, timed once per table."""
        if self.overhead_ms is None:
            self.overhead_ms = self._time_alone(nn.ReLU(), (self.device.batch, 8), False, repeats=max(self.repeats, 50))
            self.dirty = True
        return self.overhead_ms

    def _time_alone(self, module: nn.Module, shape: tuple[int, ...], int8: bool, repeats: int | None = None) -> float:
        from ..profile import deployable_copy

        repeats = repeats or self.repeats
        layer = deployable_copy(module).cpu().float().eval()  # parametrizations (fake-quant, masks) baked in
        x = torch.randn(1, *shape[1:])
        if self.device.name != "ort-cpu":
            return _torch_ms(self.device, layer, x, self.warmup, repeats)
        if int8:
            from ..quant import QuantConfig, quantize
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = quantize(nn.Sequential(layer), x, [torch.randn(shape)], QuantConfig(weight_bits=8, act_bits=8),
                                 device="cpu")
        return _ort_ms(self.device, layer, x, self.warmup, repeats)

    def units(self, model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...], bool]]:
        """The cost units of ``model``: every conv/linear layer (the factors inside a low-rank ``Sequential``
        or a compact block too), as ``(name, module, input shape at device.batch, quantized)``; quantized
        means int8 weights *and* int8 input activations (a netslim-quantized model)."""
        return [(u.name, u.module, u.input_shape, u.quantized) for u in _scan(model, example_input, self.device.batch)]

    def _units_ms(self, units: list[_Unit]) -> dict[str, float]:
        return {u.name: self.unit_ms(u.module, u.input_shape, u.quantized) for u in units}

    def calibrate(self, model: nn.Module, example_input: torch.Tensor) -> float:
        """Measure the reference ``model`` whole (:func:`measure_ms`) and fit the residual: the measured time
        less the sum of its layers' table latencies, i.e. everything that is not a conv/linear (batch norm,
        activations, adds, pooling, per-call overhead); its output volume becomes the reference volume
        :meth:`predict` scales the residual by. Returns the measured ms."""
        units = _scan(model, example_input, self.device.batch)
        units_ms = self._units_ms(units)
        measured = measure_ms(self.device, model, example_input, warmup=self.warmup, repeats=self.repeats)
        self.residual_ms = measured - sum(units_ms.values())
        self.reference_volume = sum(u.output_volume for u in units)
        self.dirty = True
        self.save()
        return measured

    def predict(self, model: nn.Module, example_input: torch.Tensor) -> Prediction:
        """Predicted latency of ``model``: its layers' table latencies (measuring the missing ones) plus the
        calibrated residual scaled by this model's layer output volume over the reference's (0 before
        :meth:`calibrate`)."""
        units = _scan(model, example_input, self.device.batch)
        units_ms = self._units_ms(units)
        residual = 0.0
        if self.reference_volume:
            residual = self.residual_ms * sum(u.output_volume for u in units) / self.reference_volume
        self.save()
        return Prediction(total_ms=sum(units_ms.values()) + residual, units_ms=units_ms, residual_ms=residual)


def check_prediction(table: LatencyTable, model: nn.Module, example_input: torch.Tensor) -> dict:
    """How good the table is on ``model``: ``{"predicted_ms", "measured_ms", "error"}``, ``error`` being
    predicted / measured - 1."""
    predicted = table.predict(model, example_input).total_ms
    measured = measure_ms(table.device, model, example_input, warmup=table.warmup, repeats=table.repeats)
    return {"predicted_ms": predicted, "measured_ms": measured,
            "error": predicted / measured - 1 if measured > 0 else float("inf")}


__all__ = ["DEVICES", "FORMULAS", "Device", "parse_device", "measure_ms", "paired_ms", "formula", "Prediction", "LatencyTable",
           "check_prediction"]
