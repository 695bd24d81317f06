"""One way to save a compressed model and get it back: :func:`save` and :func:`load`.

``netslim.save(model, path, arch="resnet20")`` picks the format from the suffix of ``path``:

* ``.nsz``: entropy-coded sparse tensors (:mod:`netslim.encode.nsz`). The JSON header's ``arch`` object
  holds ``name`` (the reference), ``num_classes`` and ``structure``.
* ``.nsq``: a model quantized by :mod:`netslim.quant` (PTQ or QAT), its weights packed at their bit width
  (:mod:`netslim.quant.pack`). The JSON header's ``model`` object holds ``format``, ``arch``,
  ``num_classes``, ``structure`` (of the float model under the quantizers) and ``quant``: ``config`` (the
  :class:`~netslim.quant.QuantConfig` fields; per-layer bit widths in ``layer_bits``), ``input_shape``
  (of the example input the quantized graph was traced with) and ``learn`` (``ste``, ``lsq``, ``pact``).
  Loading replays :func:`netslim.quant.ptq.prepare` + ``quantize_weights_`` on the rebuilt float model
  (:func:`netslim.quant.ptq.rebuild_quantized`), then loads the packed state.
* anything else (``.pt``): ``torch.save`` of plain containers, read back with ``weights_only=True``:
  ``{"format": "netslim-model-v1", "arch", "num_classes", "structure", "state_dict", "sha256"}``. ``sha256``
  (:func:`digest`) covers the other fields and every tensor's bytes; ``torch.load`` does not verify the zip's
  CRCs, so it is what catches a changed byte. A file without it (written before it existed) loads with a
  warning; a file whose digest differs is refused.

No format holds pickled code. ``arch`` is a model reference as :func:`netslim.zoo.get` takes it (a zoo
name, ``torchvision:<name>``, ``timm:<name>``, ``path/to/file.py:factory``, ``package.module:factory``);
``structure`` records, for every module that differs from the model ``arch`` builds, what it became,
from an allowlist of module types (:data:`MODULE_TYPES`) and their constructor arguments::

    {"version": 1,
     "modules": {"layer1.0.bn1": {"type": "BatchNorm2d", "args": {"num_features": 8, "eps": 1e-05, ...}},
                 "layer1.0.conv2": {"type": "Sequential", "children": [
                     ["0", {"type": "Conv2d", "args": {"in_channels": 8, "out_channels": 4, ...}}],
                     ["1", {"type": "Conv2d", "args": {...}}]]}}}

Loading builds ``arch`` (or takes the ``model=`` given), puts the recorded modules in place and loads the
tensors strictly. The format is recognised by the file's first bytes, not by its suffix. Every field read
back is checked (integers are integers and not booleans, sizes positive and no larger than the largest
dimension of the file's tensors, no module with more parameters than the file holds); a bad field is a
:class:`~netslim.errors.NetslimError` naming the file and the field.

A file's claims are bounded before anything is allocated: ``arch`` with ``num_classes`` is sized on the meta
device first and refused when larger than 64x the file's tensors plus 4 M elements (at most 2**28); the
tensors' names and shapes are compared with the rebuilt model before an ``.nsz`` tensor is decoded; a
recorded structure is run once on the meta device (at the architecture's input size) so that channel counts
or ``groups`` that do not fit together are refused at load; an ``.nsq`` file's quantizer flags (bits,
symmetric, per_channel, narrow) must equal those of the model rebuilt from its record.

Old files stay loadable: ``.nsz`` files without ``structure``, ``.nsq`` files without a ``model`` record
(into the quantized model given as ``model=``), and ``netslim-pruned-v1`` files of
:func:`netslim.prune.structured.serialize.save_pruned`.

A reference to a user's factory (``file.py:factory``, ``package.module:factory``) runs that factory when
the file is loaded without ``model=``, as :func:`netslim.zoo.get` would; load a file of unknown origin with
``model=`` to run nothing it names.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .compact.modules import Concat, NegConcat
from .errors import NetslimError
from .io import load_checkpoint, save_torch

FORMAT = "netslim-model-v1"
LEGACY_PRUNED_FORMAT = "netslim-pruned-v1"
STRUCTURE_VERSION = 1
MAX_SMALL = 1 << 16            # strides, paddings, dilations, pooling sizes
MAX_CHILDREN = 4096            # modules in one recorded Sequential
MAX_DEPTH = 16                 # Sequentials nested in one record
MAX_RECORDS = 1 << 16          # recorded modules
MAX_NAME = 1024
MAX_ARCH = 4096
MAX_CLASSES = 1 << 24
MAX_INPUT_ELEMENTS = 1 << 26   # the example input recorded in an .nsq file ...
MAX_SAMPLE_ELEMENTS = 1 << 22  # ... of which one sample (4 M elements at most) is traced on load
FILE_MODEL_FACTOR = 64         # a file's arch may build a model of at most 64x its tensors' elements ...
FILE_MODEL_SLACK = 1 << 22     # ... plus 4 M elements (pruning removes channels, biases, whole layers)
_CHILD_NAME = re.compile(r"^[A-Za-z0-9_]{1,128}$")

# ------------------------------------------------------------------ the allowlist
_CONV = (("in_channels", "size"), ("out_channels", "size"), ("kernel_size", "sizes"), ("stride", "small"),
         ("padding", "padding"), ("dilation", "small"), ("groups", "size"), ("bias", "bool"),
         ("padding_mode", "padding_mode"))
_BN = (("num_features", "size"), ("eps", "eps"), ("momentum", "momentum"), ("affine", "bool"),
       ("track_running_stats", "bool"))
_INPLACE = (("inplace", "bool"),)
_MAXPOOL = (("kernel_size", "small"), ("stride", "small"), ("padding", "nonneg"), ("dilation", "small"),
            ("ceil_mode", "bool"), ("return_indices", "bool"))
_AVGPOOL1 = (("kernel_size", "small"), ("stride", "small"), ("padding", "nonneg"), ("ceil_mode", "bool"),
             ("count_include_pad", "bool"))

#: module types a structure record may hold: name -> (class, ((constructor argument, kind), ...));
#: ``Sequential`` (of recorded children) comes on top.
MODULE_TYPES: dict[str, tuple[type[nn.Module], tuple[tuple[str, str], ...]]] = {
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "Linear": (nn.Linear, (("in_features", "size"), ("out_features", "size"), ("bias", "bool"))),
    "BatchNorm1d": (nn.BatchNorm1d, _BN),
    "BatchNorm2d": (nn.BatchNorm2d, _BN),
    "LayerNorm": (nn.LayerNorm, (("normalized_shape", "sizes"), ("eps", "eps"), ("elementwise_affine", "bool"),
                                 ("bias", "bool"))),
    "GroupNorm": (nn.GroupNorm, (("num_groups", "size"), ("num_channels", "size"), ("eps", "eps"),
                                 ("affine", "bool"))),
    "PReLU": (nn.PReLU, (("num_parameters", "size"),)),
    "Identity": (nn.Identity, ()),
    "ReLU": (nn.ReLU, _INPLACE),
    "ReLU6": (nn.ReLU6, _INPLACE),
    "LeakyReLU": (nn.LeakyReLU, (("negative_slope", "real"), ("inplace", "bool"))),
    "SiLU": (nn.SiLU, _INPLACE),
    "GELU": (nn.GELU, (("approximate", "approximate"),)),
    "Hardswish": (nn.Hardswish, _INPLACE),
    "Hardsigmoid": (nn.Hardsigmoid, _INPLACE),
    "Sigmoid": (nn.Sigmoid, ()),
    "Tanh": (nn.Tanh, ()),
    "Dropout": (nn.Dropout, (("p", "prob"), ("inplace", "bool"))),
    "Flatten": (nn.Flatten, (("start_dim", "dim"), ("end_dim", "dim"))),
    "MaxPool1d": (nn.MaxPool1d, _MAXPOOL),
    "MaxPool2d": (nn.MaxPool2d, _MAXPOOL),
    "AvgPool1d": (nn.AvgPool1d, _AVGPOOL1),
    "AvgPool2d": (nn.AvgPool2d, _AVGPOOL1 + (("divisor_override", "optsmall"),)),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, (("output_size", "outsize"),)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, (("output_size", "outsize"),)),
    "NegConcat": (NegConcat, (("channels", "size"),)),  # compact filters (CReLU)
}
_TYPE_NAMES = {cls: name for name, (cls, _) in MODULE_TYPES.items()}
_CHOICES = {"padding_mode": ("zeros", "reflect", "replicate", "circular"), "approximate": ("none", "tanh")}
_REQUIREMENTS = {
    "bool": "true or false", "size": "an integer in 1..{limit}", "sizes": "an integer or a list of integers in 1..{limit}",
    "small": f"an integer or a list of integers in 1..{MAX_SMALL}",
    "nonneg": f"an integer or a list of integers in 0..{MAX_SMALL}",
    "padding": f"'same', 'valid', or an integer or list of integers in 0..{MAX_SMALL}",
    "optsmall": f"null or an integer in 1..{MAX_SMALL}",
    "outsize": f"an integer in 1..{MAX_SMALL} or a list of such integers or nulls",
    "eps": "a number in (0, 1)", "momentum": "null or a number in [0, 1]", "prob": "a number in [0, 1]",
    "real": "a finite number", "dim": "an integer in -8..8",
    "padding_mode": "one of " + ", ".join(_CHOICES["padding_mode"]), "approximate": "one of none, tanh",
}


def allowed_types() -> list[str]:
    """Names of the module types a structure record may hold."""
    return ["Sequential", *MODULE_TYPES, "Concat"]


def _module_type(m: nn.Module) -> type:
    return parametrize.type_before_parametrizations(m)


def _has_tensor(m: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(m, name) or m._parameters.get(name) is not None


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list, torch.Size)):
        return [_plain(v) for v in value]
    return value


def module_spec(m: nn.Module, where: str = "") -> dict:
    """The record of one module (a ``Sequential`` with its children): ``{"type", "args"}`` or
    ``{"type": "Sequential", "children": [[name, record], ...]}``. A type outside :data:`MODULE_TYPES` is a
    :class:`NetslimError` naming it."""
    cls = _module_type(m)
    if cls is nn.Sequential:
        return {"type": "Sequential",
                "children": [[k, module_spec(c, f"{where}.{k}" if where else k)] for k, c in m.named_children()]}
    if cls is Concat:  # parallel branches (compact filters' fire module): a Sequential with a channel count
        return {"type": "Concat", "args": {"channels": m.channels},
                "children": [[k, module_spec(c, f"{where}.{k}" if where else k)] for k, c in m.named_children()]}
    name = _TYPE_NAMES.get(cls)
    if name is None:
        raise NetslimError(f"cannot record module {where or '(the model)'!r}: its type {cls.__module__}.{cls.__qualname__} "
                           f"is not one netslim rebuilds without code (allowed: {', '.join(allowed_types())})")
    args = {}
    for field, _ in MODULE_TYPES[name][1]:
        args[field] = _has_tensor(m, field) if field == "bias" else _plain(getattr(m, field))
    return {"type": name, "args": args}


def _spec_or_none(m: nn.Module) -> dict | None:
    try:
        return module_spec(m)
    except NetslimError:
        return None


def _own_tensors(m: nn.Module) -> dict[str, tuple[int, ...]]:
    own = {k: tuple(v.shape) for k, v in m._parameters.items() if v is not None}
    own.update({k: tuple(v.shape) for k, v in m._buffers.items() if v is not None})
    if parametrize.is_parametrized(m):
        own.update({k: tuple(p.original.shape) for k, p in m.parametrizations.items() if hasattr(p, "original")})
    return own


def _diff(name: str, base: nn.Module, comp: nn.Module, out: dict[str, dict]) -> None:
    tb, tc = _module_type(base), _module_type(comp)
    if tc in _TYPE_NAMES:  # an allowlisted leaf: recorded whenever it differs
        spec = module_spec(comp, name)
        if tb is not tc or _spec_or_none(base) != spec:
            out[name] = spec
        return
    if tb is tc:
        bc, cc = OrderedDict(base.named_children()), OrderedDict(comp.named_children())
        if list(bc) != list(cc):
            if tc is nn.Sequential:
                out[name] = module_spec(comp, name)
                return
            added, removed = sorted(set(cc) - set(bc)), sorted(set(bc) - set(cc))
            raise NetslimError(f"cannot record module {name or '(the model)'!r} ({tc.__qualname__}): its submodules "
                               f"differ from the architecture's (added: {added or '-'}, removed: {removed or '-'})")
        if tc is not nn.Sequential and _own_tensors(base) != _own_tensors(comp):
            raise NetslimError(f"cannot record module {name or '(the model)'!r}: a {tc.__qualname__}'s own tensors changed "
                               f"shape ({_own_tensors(base)} -> {_own_tensors(comp)}), and that type is not one netslim "
                               f"rebuilds without code (allowed: {', '.join(allowed_types())})")
        for k in cc:
            _diff(f"{name}.{k}" if name else k, bc[k], cc[k], out)
        return
    if not name:
        raise NetslimError(f"the model is a {tc.__qualname__}, but its arch builds a {tb.__qualname__}: "
                           "give the reference the model was made from")
    out[name] = module_spec(comp, name)


def structure_record(base: nn.Module, model: nn.Module) -> dict:
    """What differs between ``base`` (the model ``arch`` builds) and ``model``: ``{"version": 1, "modules":
    {name: record}}`` with :func:`module_spec` records, plain JSON-able data."""
    modules: dict[str, dict] = {}
    _diff("", base, model, modules)
    return {"version": STRUCTURE_VERSION, "modules": modules}


# ------------------------------------------------------------------ rebuilding, every field checked
@dataclass
class _Limits:
    """Bounds from the tensors a file holds: the largest dimension and the number of elements."""

    source: str
    limit: int
    total: int
    budget: int = 0

    @classmethod
    def of(cls, source: str, tensors: dict[str, Any]) -> "_Limits":
        """From the tensors (or their shapes) a file holds."""
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for t in tensors.values()]
        dims = [int(d) for s in shapes for d in s]
        total = sum(math.prod(s) for s in shapes)
        return cls(source, max(dims, default=1), total, 2 * total + 4096)


def _bad(limits: _Limits, where: str, value: Any, requirement: str) -> NetslimError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return NetslimError(f"{limits.source}: bad field {where} = {shown} (must be {requirement})")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(v: Any, lo: int, hi: int, allow_none: bool = False) -> bool:
    def one(x):
        return (allow_none and x is None) or _is_int(x, lo, hi)
    return one(v) if not isinstance(v, list) else (1 <= len(v) <= 8 and all(one(x) for x in v))


def _field(value: Any, kind: str, where: str, limits: _Limits) -> Any:
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "size": lambda v: _is_int(v, 1, limits.limit),
        "sizes": lambda v: _ints(v, 1, limits.limit),
        "small": lambda v: _ints(v, 1, MAX_SMALL),
        "nonneg": lambda v: _ints(v, 0, MAX_SMALL),
        "padding": lambda v: v in ("same", "valid") or _ints(v, 0, MAX_SMALL),
        "optsmall": lambda v: v is None or _is_int(v, 1, MAX_SMALL),
        "outsize": lambda v: _ints(v, 1, MAX_SMALL, allow_none=isinstance(v, list)),
        "eps": lambda v: _is_real(v) and 0 < v < 1,
        "momentum": lambda v: v is None or (_is_real(v) and 0 <= v <= 1),
        "prob": lambda v: _is_real(v) and 0 <= v <= 1,
        "real": _is_real,
        "dim": lambda v: _is_int(v, -8, 8),
    }.get(kind, lambda v: isinstance(v, str) and v in _CHOICES.get(kind, ()))(value)
    if not ok:
        raise _bad(limits, where, value, _REQUIREMENTS[kind].format(limit=limits.limit))
    return tuple(value) if isinstance(value, list) else value


def _prod(v: Any) -> int:
    return math.prod(v) if isinstance(v, tuple) else int(v)


def _param_count(kind: str, a: dict) -> int:
    if kind in ("Conv1d", "Conv2d"):
        return a["out_channels"] * (a["in_channels"] // a["groups"]) * _prod(a["kernel_size"]) + a["out_channels"]
    if kind == "Linear":
        return (a["in_features"] + 1) * a["out_features"]
    if kind.startswith("BatchNorm"):
        return 4 * a["num_features"]
    if kind == "LayerNorm":
        return 2 * _prod(a["normalized_shape"])
    if kind == "GroupNorm":
        return 2 * a["num_channels"]
    if kind == "PReLU":
        return a["num_parameters"]
    return 0


def _build(spec: Any, where: str, limits: _Limits, depth: int = 0) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise _bad(limits, where, spec, "an object with a 'type'")
    kind = spec["type"]
    if kind in ("Sequential", "Concat"):
        children = spec.get("children")
        if depth >= MAX_DEPTH:
            raise _bad(limits, where, "...", f"Sequentials nested at most {MAX_DEPTH} deep")
        keys = {"type", "children"} | ({"args"} if kind == "Concat" else set())
        if set(spec) != keys or not isinstance(children, list) or len(children) > MAX_CHILDREN:
            raise _bad(limits, f"{where}.children", children, f"a list of at most {MAX_CHILDREN} [name, record] pairs")
        built: OrderedDict[str, nn.Module] = OrderedDict()
        for i, item in enumerate(children):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and _CHILD_NAME.match(item[0]) and item[0] not in built):
                raise _bad(limits, f"{where}.children[{i}]", item, "a [name, record] pair with a new, simple name")
            built[item[0]] = _build(item[1], f"{where}.children[{i}]", limits, depth + 1)
        if kind == "Sequential":
            return nn.Sequential(built)
        args = spec["args"]
        if not (isinstance(args, dict) and set(args) == {"channels"}):
            raise _bad(limits, f"{where}.args", args, "an object with exactly the field channels")
        channels = _field(args["channels"], "size", f"{where}.args.channels", limits)
        block = Concat(channels)
        for name, child in built.items():
            block.add_module(name, child)
        return block
    if kind not in MODULE_TYPES:
        raise _bad(limits, f"{where}.type", kind, f"a module type netslim rebuilds: {', '.join(allowed_types())}")
    cls, fields = MODULE_TYPES[kind]
    args = spec.get("args")
    names = [f for f, _ in fields]
    if set(spec) != {"type", "args"} or not isinstance(args, dict) or set(args) != set(names):
        raise _bad(limits, f"{where}.args", args, f"an object with exactly the fields {', '.join(names) or '(none)'}")
    kwargs = {f: _field(args[f], k, f"{where}.args.{f}", limits) for f, k in fields}
    if kind in ("Conv1d", "Conv2d"):
        dims = 1 if kind == "Conv1d" else 2
        for f in ("kernel_size", "stride", "dilation") + (() if isinstance(kwargs["padding"], str) else ("padding",)):
            if isinstance(kwargs[f], tuple) and len(kwargs[f]) != dims:
                raise _bad(limits, f"{where}.args.{f}", args[f], f"{dims} value(s) for a {kind}")
        if kwargs["in_channels"] % kwargs["groups"] or kwargs["out_channels"] % kwargs["groups"]:
            raise _bad(limits, f"{where}.args.groups", args["groups"], "a divisor of in_channels and out_channels")
    if kind == "GroupNorm" and kwargs["num_channels"] % kwargs["num_groups"]:
        raise _bad(limits, f"{where}.args.num_groups", args["num_groups"], "a divisor of num_channels")
    count = _param_count(kind, kwargs)
    limits.budget -= count
    if count > limits.total or limits.budget < 0:
        raise _bad(limits, where, f"{kind} of {count:,} parameters", f"no larger than the {limits.total:,} elements "
                                                                      "of the file's tensors")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise NetslimError(f"{limits.source}: bad record {where} ({kind}): {str(exc).splitlines()[0]}") from None


def apply_structure_record(model: nn.Module, structure: Any, limits: _Limits) -> nn.Module:
    """Put the modules ``structure`` records in place in ``model`` (built from ``arch``); new modules have
    fresh weights, to be loaded after. Every field is checked against ``limits``."""
    from .surgery import replace_module_

    if not (isinstance(structure, dict) and set(structure) <= {"version", "modules"}
            and structure.get("version") == STRUCTURE_VERSION):
        raise _bad(limits, "structure", structure, f"an object with version {STRUCTURE_VERSION} and modules")
    modules = structure.get("modules")
    if not isinstance(modules, dict) or len(modules) > MAX_RECORDS:
        raise _bad(limits, "structure.modules", modules, f"an object of at most {MAX_RECORDS} records")
    known = dict(model.named_modules())
    for name in modules:
        where = f"structure.modules[{name!r}]"
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME and name in known):
            raise NetslimError(f"{limits.source}: bad field {where[:MAX_NAME]}: the architecture has no module of that name")
        parent = name.rpartition(".")[0]
        while parent:
            if parent in modules:
                raise NetslimError(f"{limits.source}: bad field {where}: it lies inside the recorded {parent!r}")
            parent = parent.rpartition(".")[0]
    for name, spec in modules.items():
        replace_module_(model, name, _build(spec, f"structure.modules[{name!r}]", limits))
    return model


# ------------------------------------------------------------------ fields of a file
def _check_arch(arch: Any, num_classes: Any, source: str) -> None:
    if not (arch is None or (isinstance(arch, str) and 0 < len(arch) <= MAX_ARCH)):
        raise NetslimError(f"{source}: bad field arch = {str(arch)[:80]!r} (must be a model reference string or null)")
    if not (num_classes is None or _is_int(num_classes, 1, MAX_CLASSES)):
        raise NetslimError(f"{source}: bad field num_classes = {num_classes!r} (must be null or an integer in "
                           f"1..{MAX_CLASSES})")


def _build_arch(arch: str, num_classes: int | None, source: str, from_file: bool,
                max_elements: int | None = None) -> nn.Module:
    from . import zoo
    from .zoo.references import is_factory_reference
    from .zoo.registry import check_file_model

    if from_file and is_factory_reference(arch):
        if not _TRUST_CODE.get():
            raise NetslimError(f"{source} names the Python factory {arch!r}; building it runs that code. Load it "
                               "with netslim.load(path, trust_code=True) if you trust the file, or pass model=")
        top = arch.rpartition(":")[0].split(".")[0]
        if not arch.rpartition(":")[0].endswith(".py") and top in sys.stdlib_module_names:
            raise NetslimError(f"{source}: arch {arch!r} names a standard-library function, not a model factory; "
                               "load it with netslim.load(path, model=...)")
    if from_file:  # sized on the meta device first: a file cannot make netslim build a model it cannot fill
        check_file_model(arch, num_classes, source, FILE_MODEL_FACTOR * (max_elements or 0) + FILE_MODEL_SLACK)
    return zoo.get(arch, num_classes=num_classes)


def _base(source: str, arch: Any, num_classes: Any, model: nn.Module | None, max_elements: int = 0) -> nn.Module:
    _check_arch(arch, num_classes, source)
    if model is not None:
        return model
    if not arch:
        raise NetslimError(f"{source} names no architecture; pass the model: netslim.load(path, model=...)")
    return _build_arch(arch, num_classes, source, from_file=True, max_elements=max_elements)


def _dry_run(model: nn.Module, arch: Any, source: str) -> None:
    """Run ``model`` once on the meta device (no memory, no arithmetic) on its architecture's input size: channel
    counts or ``groups`` that do not fit together are refused at load, not in the first ``forward``."""
    from . import zoo
    from torch.func import functional_call

    if not isinstance(arch, str):
        return
    try:
        size = zoo.spec(arch).input_size
    except NetslimError:
        return
    if not size:
        return
    was = model.training
    model.eval()
    try:
        meta = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
        with torch.no_grad():
            functional_call(model, meta, (torch.empty(size, device="meta"),), strict=False)
    except NotImplementedError:
        return  # an operation without a meta kernel: nothing to learn here
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise NetslimError(f"{source}: the recorded structure does not fit together ({type(exc).__name__}: "
                           f"{lines[0][:200] if lines else ''})") from None
    finally:
        model.train(was)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise NetslimError(f"{source} does not fit the model: {lines[-1] if lines else type(exc).__name__}") from None
    return model


def _rebuilt(source: str, arch: Any, num_classes: Any, structure: Any, tensors: dict[str, Any],
             model: nn.Module | None) -> nn.Module:
    """The model a file's fields describe; ``tensors`` (name -> tensor or shape) bound every size."""
    limits = _Limits.of(source, tensors)
    model = _base(source, arch, num_classes, model, limits.total)
    if structure is not None:
        apply_structure_record(model, structure, limits)
        _dry_run(model, arch, source)
    return model


def digest(payload: dict) -> str:
    """SHA-256 (hex) of a ``.pt`` model payload: its ``format``, ``arch``, ``num_classes`` and ``structure`` as
    canonical JSON, then every tensor of ``state_dict`` in key order (name, dtype, shape, bytes).
    ``torch.load`` does not verify the zip's CRCs; this does."""
    import hashlib
    import json

    h = hashlib.sha256()
    meta = {k: payload.get(k) for k in ("format", "arch", "num_classes", "structure")}
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name in sorted(payload["state_dict"]):
        t = payload["state_dict"][name].detach().cpu().contiguous()
        h.update(f"\n{name}\n{t.dtype}\n{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _verify_digest(payload: dict, state: dict[str, torch.Tensor], source: str) -> None:
    stored = payload.get("sha256")
    if stored is None:
        import warnings

        warnings.warn(f"{source} holds no sha256 (written before netslim checked its model files): its integrity "
                      "is not verified; save it again to add one", stacklevel=4)
        return
    if not (isinstance(stored, str) and len(stored) == 64):
        raise NetslimError(f"{source}: bad field sha256 (must be 64 hex digits)")
    for t in state.values():
        if t.is_sparse or t.layout != torch.strided or t.is_quantized:
            raise NetslimError(f"{source}: bad field state_dict (only dense tensors)")
    if digest({**payload, "state_dict": state}) != stored:
        raise NetslimError(f"{source}: checksum mismatch (sha256): the file was altered or is damaged")


def _state_dict(payload: Any, source: str) -> dict[str, torch.Tensor]:
    if not (isinstance(payload, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in payload.items())):
        raise NetslimError(f"{source}: bad field state_dict (must map names to tensors)")
    return payload


# ------------------------------------------------------------------ .nsz
def load_nsz(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Decode an ``.nsz`` file into ``model`` (or the model its ``arch`` rebuilds), structure applied first."""
    from .encode.nsz import header_shapes, read_nsz, read_nsz_header

    header, payload = read_nsz_header(path)
    shapes = header_shapes(header)
    arch = header.get("arch") or {}
    if not set(arch) <= {"name", "num_classes", "structure"}:
        raise NetslimError(f"{path}: bad field arch (unknown keys {str(sorted(set(arch) - {'name', 'num_classes', 'structure'}))[:200]})")
    model = _rebuilt(str(path), arch.get("name"), arch.get("num_classes"), arch.get("structure"), shapes, model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _, tensors = read_nsz(path, expected=expected, header=(header, payload))  # shapes compared before decoding
    return _load_state(model, tensors, str(path))


# ------------------------------------------------------------------ .nsq
#: the QuantConfig fields that shape the quantized model, and what each must be; the other recorded
#: fields (weight_range, bias_correction, adaround, ...) only changed values, which the file holds
_REPLAY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "weight_bits": (lambda v: _is_int(v, 2, 16), "an integer in 2..16"),
    "act_bits": (lambda v: v == 0 or _is_int(v, 2, 16), "0 or an integer in 2..16"),
    "per_channel": (lambda v: isinstance(v, bool), "true or false"),
    "calibrator": (lambda v: isinstance(v, str) and len(v) <= 64, "a calibrator name"),
    "percentile": (lambda v: _is_real(v) and 0 < v <= 100, "a number in (0, 100]"),
    "symmetric_activations": (lambda v: isinstance(v, bool), "true or false"),
    "cle": (lambda v: isinstance(v, bool), "true or false"),
    "relu6_to_relu": (lambda v: isinstance(v, bool), "true or false"),
    "quantize_output": (lambda v: isinstance(v, bool), "true or false"),
    "layer_bits": (lambda v: isinstance(v, dict) and len(v) <= MAX_RECORDS and all(
        isinstance(k, str) and len(k) <= MAX_NAME and _is_int(b, 2, 16) for k, b in v.items()),
        "an object of layer names to integers in 2..16"),
    "exclude": (lambda v: isinstance(v, list) and len(v) <= MAX_RECORDS and all(
        isinstance(n, str) and len(n) <= MAX_NAME for n in v), "a list of layer names"),
}


def _quant_config(value: Any, source: str):
    from .quant.ptq import QuantConfig

    if not (isinstance(value, dict) and set(_REPLAY_FIELDS) <= set(value)):
        raise NetslimError(f"{source}: bad field quant.config (must be an object with {', '.join(_REPLAY_FIELDS)})")
    for key, (ok, requirement) in _REPLAY_FIELDS.items():
        if not ok(value[key]):
            shown = repr(value[key])
            raise NetslimError(f"{source}: bad field quant.config.{key} = {shown[:80]} (must be {requirement})")
    try:
        return QuantConfig(**{k: value[k] for k in _REPLAY_FIELDS})
    except (NetslimError, ValueError, TypeError) as exc:
        raise NetslimError(f"{source}: bad field quant.config: {str(exc).splitlines()[0]}") from None


def _quant_fields(quant: Any, source: str) -> tuple[Any, list[int], str]:
    from .quant.qat import LEARNERS

    if not (isinstance(quant, dict) and set(quant) == {"config", "input_shape", "learn"}):
        raise NetslimError(f"{source}: bad field quant (must hold config, input_shape and learn)")
    config = _quant_config(quant["config"], source)
    shape = quant["input_shape"]
    if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(_is_int(s, 1, MAX_INPUT_ELEMENTS) for s in shape)
            and math.prod(shape) <= MAX_INPUT_ELEMENTS and math.prod(shape[1:]) <= MAX_SAMPLE_ELEMENTS):
        raise NetslimError(f"{source}: bad field quant.input_shape = {str(shape)[:80]} (must be 1..8 positive integers, "
                           f"at most {MAX_INPUT_ELEMENTS:,} elements, {MAX_SAMPLE_ELEMENTS:,} per sample)")
    if quant["learn"] not in LEARNERS:
        raise NetslimError(f"{source}: bad field quant.learn = {str(quant['learn'])[:40]!r} "
                           f"(must be one of {', '.join(LEARNERS)})")
    return config, shape, quant["learn"]


def _is_quantized(model: nn.Module) -> bool:
    from .quant.modules import ActQuant, WeightQuant

    return any(isinstance(m, (ActQuant, WeightQuant)) for m in model.modules())


def _learn_of(model: nn.Module) -> str:
    from .quant.modules import ActQuant

    learned = {m.learn for m in model.modules() if isinstance(m, ActQuant)}
    return "lsq" if "lsq" in learned else ("pact" if "pact" in learned else "ste")


def _replay(float_model: nn.Module, shape: list[int], config, learn: str) -> nn.Module:
    from .quant.ptq import rebuild_quantized

    # the weight ranges are overwritten by the stored steps: min-max finds them fastest
    return rebuild_quantized(float_model, shape, dataclasses.replace(config, weight_range="minmax"), learn)


def _load_nsq(path: Path, model: nn.Module | None) -> nn.Module:
    from .quant.pack import check_specs, load_quantized_, read_nsq_specs

    info, state, specs = read_nsq_specs(path)
    source = str(path)
    if model is not None and _is_quantized(model):
        return load_quantized_(model, path)
    if info is None:
        raise NetslimError(f"{source} records no architecture (written by netslim.quant.save_quantized); pass the "
                           "quantized model it came from: netslim.load(path, model=quantized_model)")
    keys = {"format", "arch", "num_classes", "structure", "quant"}
    if not (isinstance(info, dict) and set(info) == keys and info["format"] == FORMAT):
        raise NetslimError(f"{source}: bad field model (must hold {', '.join(sorted(keys))}; format {FORMAT!r})")
    config, shape, learn = _quant_fields(info["quant"], source)
    float_model = _rebuilt(source, info["arch"], info["num_classes"], info["structure"], state, model)
    try:
        qmodel = _replay(float_model.cpu().eval(), [1, *shape[1:]], config, learn)  # one sample is enough
    except NetslimError:
        raise
    except Exception as exc:  # the recorded model does not trace or quantize
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise NetslimError(f"{source}: the recorded model cannot be quantized again ({type(exc).__name__}: "
                           f"{lines[0][:200] if lines else ''})") from None
    check_specs(qmodel, specs, source)
    return _load_state(qmodel, state, source)


# ------------------------------------------------------------------ .pt and other suffixes
def _load_plain(path: Path, model: nn.Module | None) -> nn.Module:
    payload = load_checkpoint(path)
    source = str(path)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == LEGACY_PRUNED_FORMAT:
        from .prune.structured.serialize import apply_structure_

        if not set(payload) <= {"format", "arch", "num_classes", "structure", "state_dict", "sha256"}:
            raise NetslimError(f"{source}: bad fields of a {LEGACY_PRUNED_FORMAT} file")
        state = _state_dict(payload.get("state_dict"), source)
        model = _base(source, payload.get("arch"), payload.get("num_classes"), model, _Limits.of(source, state).total)
        try:
            apply_structure_(model, payload.get("structure"))
        except NetslimError as exc:
            raise NetslimError(f"{source}: {exc}") from None
        _dry_run(model, payload.get("arch"), source)
        _verify_digest(payload, state, source)
        return _load_state(model, state, source)
    if fmt != FORMAT:
        raise NetslimError(f"{source}: not a netslim model file (format {str(fmt)[:40]!r}; expected {FORMAT!r}, "
                           "an .nsz or an .nsq file)")
    keys = {"format", "arch", "num_classes", "structure", "state_dict"}
    if set(payload) not in (keys, keys | {"sha256"}):
        raise NetslimError(f"{source}: bad fields {str(sorted(map(str, set(payload) ^ keys)))[:200]} (a {FORMAT} file "
                           f"holds {', '.join(sorted(keys))} and sha256)")
    state = _state_dict(payload["state_dict"], source)
    model = _rebuilt(source, payload["arch"], payload["num_classes"], payload["structure"], state, model)
    _verify_digest(payload, state, source)  # after the field checks: a bad field is named first
    return _load_state(model, state, source)


# ------------------------------------------------------------------ the API
_TRUST_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("netslim_trust_code", default=False)


def load(path: str | Path, *, model: nn.Module | None = None, trust_code: bool = False) -> nn.Module:
    """The model saved in ``path`` by :func:`save` (or the older writers), in eval mode.

    The format is recognised by the file's first bytes (``NSZ1``, ``NSQ1``, else a ``torch.save`` file read
    with ``weights_only=True``). Without ``model`` the file's ``arch`` is built; with it, ``model`` is the
    base the recorded structure is applied to (in place) and the tensors loaded into: for a file without a
    rebuildable ``arch``. An ``.nsq`` file loads into ``model`` directly when ``model`` is already quantized.
    A file whose ``arch`` is a ``file.py:factory`` or ``package.module:factory`` reference is rebuilt by calling
    that factory only with ``trust_code=True`` (zoo, torchvision and timm names need no trust).
    """
    token = _TRUST_CODE.set(bool(trust_code))
    try:
        return _load(Path(path), model)
    except NetslimError as exc:  # every error about a file names the file
        if str(path) in str(exc):
            raise
        raise NetslimError(f"{path}: {exc}") from None
    finally:
        _TRUST_CODE.reset(token)


def _load(path: Path, model: nn.Module | None) -> nn.Module:
    if not path.is_file():
        raise NetslimError(f"model file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"NSZ1":
        loaded = load_nsz(path, model)
    elif magic == b"NSQ1":
        loaded = _load_nsq(path, model)
    else:
        loaded = _load_plain(path, model)
    return loaded.eval()


def _outputs_match(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4,
                                                                                      atol=1e-5, equal_nan=True)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_outputs_match, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_outputs_match(a[k], b[k]) for k in a)
    return True


def _verify(saved: nn.Module, rebuilt: nn.Module, state: dict[str, torch.Tensor], example_input: torch.Tensor | None,
            arch: str) -> None:
    """The rebuilt model takes the state strictly and, on ``example_input``, gives the saved model's outputs."""
    _load_state(rebuilt, state, f"the model rebuilt from {arch!r} and the recorded structure")
    if example_input is None:
        return
    device = next((p.device for p in saved.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        return  # another device computes differently; the strict load above is the check
    was = saved.training
    saved.eval()
    rebuilt.eval()
    try:
        with torch.no_grad():
            same = _outputs_match(saved(example_input), rebuilt(example_input))
    finally:
        saved.train(was)
    if not same:
        raise NetslimError(f"cannot save: the model rebuilt from {arch!r} and the recorded structure computes "
                           "different outputs on example_input (does a module depend on attributes the record "
                           "does not hold?)")


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _save_nsq(model: nn.Module, path: Path, arch: str | None, num_classes: int | None,
              example_input: torch.Tensor | None) -> Path:
    from .quant.pack import save_quantized
    from .quant.ptq import QuantConfig, quant_record

    record = quant_record(model)
    if record is None:
        what = "has no record of how it was quantized" if _is_quantized(model) else "is not quantized"
        raise NetslimError(f"cannot save {path}: an .nsq file holds a model quantized by netslim.quant "
                           f"(quantize, QAT), and this model {what}; save it as .nsz or .pt")
    if any(parametrize.is_parametrized(m) for m in record["float_model"].modules()):
        raise NetslimError(f"cannot save {path}: the model was quantized with masks or shared weights still "
                           "parametrized; bake them in first (netslim.surgery.bake_parametrizations_), then quantize")
    from .quant.modules import weight_quantizers

    # the QuantConfig fields (a subclass's own are left out), with every layer's actual weight bit width
    fields = {f.name: record["config"][f.name] for f in dataclasses.fields(QuantConfig) if f.name in record["config"]}
    fields["layer_bits"] = {name: q.spec.bits for name, q in weight_quantizers(model).items()}
    if "target" in fields:
        fields["target"] = None  # what a size target chose is in layer_bits
    config = QuantConfig(**fields)
    shape = [int(s) for s in (example_input.shape if example_input is not None else record["input_shape"])]
    learn = _learn_of(model)
    structure = None
    if arch is not None:
        base = _build_arch(arch, num_classes, str(path), from_file=False)
        structure = structure_record(base, record["float_model"])
        state = _cpu_state(model)
        apply_structure_record(base, structure, _Limits.of(str(path), state))
        _verify(model, _replay(base.eval(), shape, config, learn), state, example_input, arch)
    meta = {"format": FORMAT, "arch": arch, "num_classes": num_classes, "structure": structure,
            "quant": {"config": dataclasses.asdict(config), "input_shape": shape, "learn": learn}}
    return save_quantized(model, path, meta=meta)


def save(model: nn.Module, path: str | Path, *, arch: str | None, num_classes: int | None = None,
         example_input: torch.Tensor | None = None) -> Path:
    """Write ``model``, made from the model reference ``arch``, to ``path`` in the format its suffix names:
    ``.nsz`` (entropy-coded), ``.nsq`` (packed integers of a model quantized by :mod:`netslim.quant`), any
    other (``.pt``): ``torch.save`` of plain containers. See the module docstring for the fields.

    ``arch`` (with ``num_classes``) is built, every module of ``model`` that differs from it is recorded
    (:func:`structure_record`), and the rebuild is checked before the file is written: the tensors must fit
    strictly and, when ``example_input`` is given, the outputs must match. ``arch=None`` records no
    structure (load with ``model=``). For ``.nsq`` the example input's shape is recorded (default: the one
    the model was quantized with). Masks and shared weights are baked in. Writes are atomic.
    """
    from .profile import deployable_copy

    path = Path(path)
    _check_arch(arch, num_classes, "netslim.save")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise NetslimError(f"example_input must be a tensor, got {type(example_input).__name__}")
    suffix = path.suffix.lower()
    if suffix == ".nsq":
        return _save_nsq(model, path, arch, num_classes, example_input)
    if _is_quantized(model):
        raise NetslimError(f"cannot save {path}: the model is quantized by netslim.quant; save it as .nsq")
    deployed = deployable_copy(model)
    state = _cpu_state(deployed)
    structure = None
    if arch is not None:
        base = _build_arch(arch, num_classes, str(path), from_file=False)
        structure = structure_record(base, deployed)
        apply_structure_record(base, structure, _Limits.of(str(path), state))
        _verify(deployed, base, state, example_input, arch)
    if suffix == ".nsz":
        from .encode import save as save_nsz

        save_nsz(deployed, path, arch=arch, num_classes=num_classes, structure=structure)
        return path
    payload = {"format": FORMAT, "arch": arch, "num_classes": num_classes, "structure": structure, "state_dict": state}
    payload["sha256"] = digest(payload)
    return save_torch(payload, path)


__all__ = ["save", "load", "structure_record", "apply_structure_record", "module_spec", "load_nsz", "MODULE_TYPES",
           "FORMAT", "allowed_types"]
