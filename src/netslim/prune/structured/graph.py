"""Channel dependency graph: which slices of which tensors must be removed together.

Removing output channel ``j`` of a convolution also removes input channel ``j`` of every layer that
reads it, the matching entries of its BatchNorm, and - through a residual add, a concat, a
depthwise or grouped convolution, a flatten into a linear layer or a channel shuffle - channels of
other layers. Torch-Pruning (DepGraph, Fang et al., CVPR 2023) calls these coupled sets *groups*.

How we trace: the model is run once on an example input under a ``TorchFunctionMode`` that sees
every torch function and tensor method with real tensors. We chose execution over ``torch.fx``
symbolic tracing because real shapes let Python control flow and size arithmetic run as written
(ShuffleNet's ``channel_shuffle`` unpacks ``x.size()``, which a symbolic proxy cannot), and over
``torch.export`` because its ATen-level graph is far slower to build and names ops the user never
wrote. Every channel a layer creates gets an integer *label*; labels flow through the ops:

* conv / linear create fresh labels for their outputs and *consume* their inputs' labels;
  depthwise convs pass labels through; grouped convs tie the same position of every group;
* elementwise ops with several inputs (residual add, SE's multiply) unite the labels they meet
  position by position (a union-find); parameters met there (ConvNeXt's layer scale) follow;
* shape ops (view, flatten, permute, cat, chunk, indexing) are re-run on the label tensors
  themselves, so the labels land exactly where the values do; a view that splits the channel
  axis (channel shuffle) ties the same column of every row, and an equal ``chunk`` ties the same
  position of every part, so pruning keeps the shapes those ops compute consistent;
* anything else is handled conservatively: its channels are marked *fixed* (never pruned).

The model's input and output channels are fixed, so the pruned model keeps its interface.
A *group* is one union-find class: one channel of possibly many layers. Groups touching the same
layers form a *layer group* (the residual stream of a ResNet stage is one), the unit to which a
per-layer ratio applies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger("netslim.prune.structured")

FIXED = 0   # the label of channels that must not be pruned
NONE = -1   # no label: constants, scalars

_SHAPE_OPS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "cat", "concat",
    "concatenate", "stack", "chunk", "split", "tensor_split", "__getitem__", "unsqueeze", "squeeze",
    "narrow", "select", "view_as", "reshape_as", "expand", "expand_as", "repeat", "movedim", "swapaxes",
    "swapdims", "unbind", "clone", "detach", "to", "float", "double", "half", "bfloat16", "type",
    "contiguous", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"}
_EQUAL_SPLITS = {"chunk"}
_IGNORED = {"size", "dim", "numel", "__get__", "__len__", "__format__", "__repr__", "_is_view", "is_floating_point",
            "data_ptr", "element_size", "is_contiguous", "stride", "__bool__", "item", "tolist", "__setstate__"}


@dataclass
class Slice:
    """Entries ``labels[i]`` of ``module.<param>`` along ``dim`` belong to channel ``labels[i]``."""

    module: str
    param: str          # parameter or buffer name inside the module
    dim: int
    labels: torch.Tensor
    role: str           # "out" (a filter producing the channel), "in" (a consumer's input slice), "norm", "other"


@dataclass
class ConvRule:
    """How a convolution's ``groups`` follows pruning: dense, depthwise (groups = channels), or fixed groups."""

    kind: str           # "dense" | "depthwise" | "grouped"
    multiplier: int = 1  # output channels per input channel of a depthwise conv


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FIXED]

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        if a < 0 or b < 0:
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra == FIXED or (rb != FIXED and ra < rb):
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb

    def unite_arrays(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
            if x != y:
                self.union(x, y)

    def fix(self, labels: torch.Tensor) -> None:
        for x in torch.unique(labels).tolist():
            self.union(FIXED, x)


class _UntraceableOp(Exception):
    """A shape op the label replay cannot follow; caught by the tracer, which fixes the channels involved."""


def _compress(lab: torch.Tensor) -> torch.Tensor:
    """Shrink every dimension along which the labels do not vary to size 1 (broadcastable)."""
    for d in range(lab.dim()):
        if lab.shape[d] > 1 and bool((lab == lab.narrow(d, 0, 1)).all()):
            lab = lab.narrow(d, 0, 1)
    return lab.contiguous()


def _const(value: int, ndim: int) -> torch.Tensor:
    return torch.full((1,) * max(ndim, 0), value, dtype=torch.long)


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    return []


def _func_name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


def _arg(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


@dataclass
class DependencyGraph:
    """The traced channel labels of a model; see the module docstring."""

    slices: list[Slice] = field(default_factory=list)
    conv_rules: dict[str, ConvRule] = field(default_factory=dict)
    uf: _UnionFind = field(default_factory=_UnionFind)
    fixed_reasons: dict[str, str] = field(default_factory=dict)

    def root(self, label: int) -> int:
        return FIXED if label < 0 else self.uf.find(label)

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.root(x) for x in labels.tolist()], dtype=torch.long)

    def groups(self) -> dict[int, list[tuple[int, int]]]:
        """Prunable groups: root label -> [(slice index, position)] of every entry it covers."""
        out: dict[int, list[tuple[int, int]]] = {}
        for si, s in enumerate(self.slices):
            for pos, r in enumerate(self.roots(s.labels).tolist()):
                if r != FIXED:
                    out.setdefault(r, []).append((si, pos))
        return out

    def layer_groups(self) -> list[list[int]]:
        """Groups that touch the same set of layer slices, e.g. all channels of one conv, or of one residual stream."""
        by_signature: dict[tuple, list[int]] = {}
        for root, entries in self.groups().items():
            signature = tuple(sorted({si for si, _ in entries}))
            by_signature.setdefault(signature, []).append(root)
        return list(by_signature.values())


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module, graph: DependencyGraph) -> None:
        super().__init__()
        self.graph = graph
        self.labels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(tensor) -> (tensor, label tensor)
        self.params: dict[int, tuple[str, str, torch.Tensor]] = {}
        for mname, module in model.named_modules():
            for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if p is not None:
                    self.params[id(p)] = (mname, pname, p)

    # ---------------------------------------------------------------- label bookkeeping
    def lab(self, t: torch.Tensor) -> torch.Tensor:
        got = self.labels.get(id(t))
        if got is not None and got[0] is t:
            return got[1]
        return _const(NONE, t.dim())

    def set_lab(self, t: torch.Tensor, lab: torch.Tensor) -> None:
        self.labels[id(t)] = (t, lab)

    def channel_labels(self, t: torch.Tensor, dim: int, why: str) -> torch.Tensor:
        """The labels along ``dim`` (length ``t.shape[dim]``), provided they vary along no other dimension."""
        lab = self.lab(t)
        dim = dim % max(t.dim(), 1)
        if lab.dim() != t.dim():
            return torch.full((t.shape[dim],), NONE, dtype=torch.long)
        others = [d for d in range(lab.dim()) if d != dim and lab.shape[d] > 1]
        if others:
            self.fix(lab, why + ": channel labels spread over several dimensions")
            return torch.full((t.shape[dim],), FIXED, dtype=torch.long)
        return lab.reshape(-1).expand(t.shape[dim]).clone() if lab.numel() == 1 else lab.reshape(-1).clone()

    def fix(self, lab: torch.Tensor, why: str) -> None:
        labels = lab[lab > 0]
        if labels.numel():
            self.graph.uf.fix(labels)
            self.graph.fixed_reasons.setdefault(why, why)

    def add_slice(self, param: torch.Tensor | None, dim: int, labels: torch.Tensor, role: str) -> None:
        if param is None or id(param) not in self.params:
            return
        mname, pname, _ = self.params[id(param)]
        if param.shape[dim] != labels.numel():
            self.fix(labels, f"{mname}.{pname}: shape does not match its channels")
            return
        self.graph.slices.append(Slice(mname, pname, dim, labels.clone(), role))

    # ---------------------------------------------------------------- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _func_name(func)
        if name == "__setitem__":
            self._guarded(name, args, kwargs, None, lambda: self._setitem(args))
            return out
        if name in _IGNORED or not _tensors_in(out):
            return out
        handler = getattr(self, f"_op_{name}", None)
        if handler is None:
            for prefix in ("conv_transpose", "conv", "batch_norm", "instance_norm"):
                if name.startswith(prefix):
                    handler = getattr(self, f"_op_{prefix}")
                    break
        try:
            if handler is not None:
                handler(args, kwargs, out)
            elif name in _SHAPE_OPS:
                self._shape_op(func, args, kwargs, out)
            elif name in _REDUCTIONS and not isinstance(_arg(args, kwargs, 1, "dim"), torch.Tensor):
                self._reduction(args, kwargs, out, name)
            else:
                self._elementwise(args, kwargs, out, name)
        except Exception as exc:  # never let a bookkeeping gap break the user's forward pass
            for t in _tensors_in(args) + _tensors_in(kwargs):
                self.fix(self.lab(t), f"{name}: {exc}")
            for t in _tensors_in(out):
                self.set_lab(t, _const(FIXED, t.dim()))
        return out

    def _guarded(self, name, args, kwargs, out, handle) -> None:
        try:
            handle()
        except Exception as exc:
            for t in _tensors_in(args) + _tensors_in(kwargs):
                self.fix(self.lab(t), f"{name}: {exc}")
            for t in _tensors_in(out):
                self.set_lab(t, _const(FIXED, t.dim()))

    def _setitem(self, args) -> None:
        """``target[index] = value`` writes ``value``'s channels into ``target`` (torchvision's multi-scale
        RoI align fills a zeros tensor level by level): when every labelled axis of ``value`` is a whole
        axis of ``target`` the two share labels there; otherwise both keep all their channels."""
        target, value = args[0], args[2] if len(args) > 2 else None
        if not isinstance(target, torch.Tensor):
            return
        if not isinstance(value, torch.Tensor):  # a constant written at fixed positions: keep them where they are
            self.fix(self.lab(target), "__setitem__ of a constant into a channel axis")
            return
        t_lab, v_lab = self.lab(target), self.lab(value)
        lines_up = (value.dim() == target.dim() == t_lab.dim() == v_lab.dim()
                    and all(v_lab.shape[d] == 1 or value.shape[d] == target.shape[d] for d in range(value.dim()))
                    and all(t_lab.shape[d] == 1 or value.shape[d] == target.shape[d] for d in range(value.dim())))
        if lines_up:
            self._broadcast_unite([target, value], [target])
        else:
            self.fix(t_lab, "__setitem__ into a channel axis")
            self.fix(v_lab, "__setitem__ into a channel axis")
            self.set_lab(target, _const(FIXED, target.dim()))

    # ---------------------------------------------------------------- layers
    def _op_conv(self, args, kwargs, out) -> None:
        x, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        groups = int(_arg(args, kwargs, 6, "groups", 1))
        mname = self.params.get(id(weight), ("?",))[0]
        cin, cout = x.shape[1], weight.shape[0]
        chan = self.channel_labels(x, 1, f"{mname} input")
        if groups == 1:
            self.add_slice(weight, 1, chan, "in")
            new = self.graph.uf.new(cout)
            self.graph.conv_rules[mname] = ConvRule("dense")
        elif groups == cin and cout % cin == 0:
            mult = cout // cin
            new = chan.repeat_interleave(mult)
            self.graph.conv_rules[mname] = ConvRule("depthwise", mult)
        elif cin == cout and cin % groups == 0:
            per = cin // groups
            rows = chan.view(groups, per)
            for g in range(1, groups):
                self.graph.uf.unite_arrays(rows[0], rows[g])
            self.add_slice(weight, 1, rows[0], "in")
            new = chan
            self.graph.conv_rules[mname] = ConvRule("grouped")
        else:
            self.fix(chan, f"{mname}: grouped convolution with in != out channels")
            new = torch.full((cout,), FIXED, dtype=torch.long)
            self.graph.conv_rules[mname] = ConvRule("grouped")
        self.add_slice(weight, 0, new, "out")
        self.add_slice(bias, 0, new, "out")
        shape = [1] * out.dim()
        shape[1] = cout
        self.set_lab(out, new.view(shape))

    def _op_conv_transpose(self, args, kwargs, out) -> None:
        x = args[0]
        self.fix(self.lab(x), "transposed convolution (not pruned)")
        self.set_lab(out, _const(FIXED, out.dim()))

    def _op_linear(self, args, kwargs, out) -> None:
        x, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        mname = self.params.get(id(weight), ("?",))[0]
        chan = self.channel_labels(x, -1, f"{mname} input")
        self.add_slice(weight, 1, chan, "in")
        new = self.graph.uf.new(weight.shape[0])
        self.add_slice(weight, 0, new, "out")
        self.add_slice(bias, 0, new, "out")
        shape = [1] * out.dim()
        shape[-1] = weight.shape[0]
        self.set_lab(out, new.view(shape))

    def _norm(self, x, out, params, dim: int, why: str) -> None:
        chan = self.channel_labels(x, dim, why)
        for p in params:
            if p is not None and p.dim() == 1 and p.shape[0] == chan.numel():
                self.add_slice(p, 0, chan, "norm")
        self.set_lab(out, self.lab(x))

    def _op_batch_norm(self, args, kwargs, out) -> None:
        x = args[0]
        params = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        self._norm(x, out, params, 1, "batch norm")

    def _op_instance_norm(self, args, kwargs, out) -> None:
        params = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        self._norm(args[0], out, params, 1, "instance norm")

    def _op_layer_norm(self, args, kwargs, out) -> None:
        x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
        params = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")]
        if len(shape) == 1:
            self._norm(x, out, params, -1, "layer norm")
        else:
            self.fix(self.lab(x), "layer norm over several dimensions")
            self.set_lab(out, self.lab(x))

    def _op_group_norm(self, args, kwargs, out) -> None:
        x, groups = args[0], int(_arg(args, kwargs, 1, "num_groups"))
        params = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")]
        if groups == 1:
            self._norm(x, out, params, 1, "group norm")
        else:
            self.fix(self.lab(x), "group norm with several groups")
            self.set_lab(out, self.lab(x))

    def _op_prelu(self, args, kwargs, out) -> None:
        x, weight = args[0], args[1]
        if weight.numel() > 1:
            self._norm(x, out, [weight], 1, "prelu")
        else:
            self.set_lab(out, self.lab(x))

    # ---------------------------------------------------------------- generic ops
    def _full_label(self, t: torch.Tensor) -> torch.Tensor:
        lab = self.lab(t)
        if lab.dim() != t.dim():
            lab = _const(NONE, t.dim())
        return lab.expand(t.shape).clone() if t.dim() else lab.reshape(())

    def _shape_op(self, func, args, kwargs, out) -> None:
        name = _func_name(func)
        tracked = {id(t) for t in _tensors_in(args) + _tensors_in(kwargs)}
        if name in ("to", "type", "float", "double", "half", "bfloat16", "clone", "detach", "contiguous"):
            src = args[0]
            self.set_lab(out, self.lab(src))
            return

        def swap(obj):
            if isinstance(obj, torch.Tensor) and id(obj) in tracked and (obj.dtype.is_floating_point or obj.dtype.is_complex):
                return self._full_label(obj)
            if isinstance(obj, (list, tuple)):
                return type(obj)(swap(o) for o in obj)
            return obj

        if name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            raise _UntraceableOp("boolean mask indexing")
        lab_args = swap(list(args))
        lab_kwargs = {k: swap(v) for k, v in kwargs.items()}
        lab_out = func(*lab_args, **lab_kwargs)
        outs, labs = _tensors_in(out), _tensors_in(lab_out)
        if len(outs) != len(labs):
            raise _UntraceableOp("label shapes diverged")
        src = _tensors_in(args)[0] if _tensors_in(args) else None
        if name in _EQUAL_SPLITS and src is not None and len(labs) > 1:
            self._tie_equal_parts(labs)
        elif name in ("split", "tensor_split", "unbind", "__getitem__", "narrow", "select") and src is not None:
            self._fix_cut_channels(src, outs, name)
        for o, lab in zip(outs, labs):
            lab = _compress(lab)
            self._tie_split_channel_axis(lab, name)
            self.set_lab(o, lab)

    def _tie_equal_parts(self, parts: list[torch.Tensor]) -> None:
        """``chunk`` into equal parts recomputes the cut from the pruned size: keep the parts equal."""
        if len({tuple(p.shape) for p in parts}) != 1:
            for p in parts:
                self.fix(p, "chunk into unequal parts")
            return
        first = _compress(parts[0])
        for p in parts[1:]:
            other = _compress(p)
            shape = torch.broadcast_shapes(first.shape, other.shape)
            self.graph.uf.unite_arrays(first.expand(shape), other.expand(shape))

    def _fix_cut_channels(self, src: torch.Tensor, outs: list[torch.Tensor], name: str) -> None:
        """A hard-coded cut through a labelled axis would move once channels are removed: fix those channels."""
        lab = self.lab(src)
        for d in range(lab.dim()):
            if lab.shape[d] > 1 and any(o.dim() != src.dim() or o.shape[d] != src.shape[d] for o in outs):
                self.fix(lab, f"{name} cuts through a channel axis")
                return

    def _tie_split_channel_axis(self, lab: torch.Tensor, name: str) -> None:
        """A view that splits a channel axis into (rows, columns) (channel shuffle) computes the column count from
        the channel count: rows must keep equal length and the same columns, so tie each column across rows."""
        varying = [d for d in range(lab.dim()) if lab.shape[d] > 1]
        if len(varying) < 2 or name not in ("view", "reshape", "unflatten"):
            return
        keep = max(varying, key=lambda d: (lab.shape[d], d))
        moved = lab.movedim(keep, -1).reshape(-1, lab.shape[keep])
        for row in moved[1:]:
            self.graph.uf.unite_arrays(moved[0], row)

    def _reduction(self, args, kwargs, out, name: str) -> None:
        x = args[0]
        outs = _tensors_in(out)
        lab = self.lab(x)
        dims = _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        if dims is None or lab.dim() != x.dim():
            self.fix(lab, f"{name} over all dimensions")
            for o in outs:
                self.set_lab(o, _const(FIXED, o.dim()))
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted({d % x.dim() for d in dims})
        if any(lab.shape[d] > 1 for d in dims):
            self.fix(lab, f"{name} across a channel axis")
        reduced = lab
        for d in reversed(dims):
            reduced = reduced.narrow(d, 0, 1) if keepdim else reduced.narrow(d, 0, 1).squeeze(d)
        for o in outs:
            self.set_lab(o, reduced if reduced.dim() == o.dim() else _const(FIXED, o.dim()))

    def _elementwise(self, args, kwargs, out, name: str) -> None:
        inputs = _tensors_in(args) + _tensors_in(kwargs)
        outs = _tensors_in(out)
        o = outs[0]
        try:
            shape = torch.broadcast_shapes(*[t.shape for t in inputs]) if inputs else o.shape
        except RuntimeError:
            shape = None
        if shape is not None and tuple(shape) == tuple(o.shape):
            self._broadcast_unite(inputs, outs)
        elif len(inputs) >= 1 and self._preserves_channels(inputs[0], o):
            for extra in inputs[1:]:
                self.fix(self.lab(extra), f"{name}: extra tensor input")
            for t in outs:
                self.set_lab(t, self.lab(inputs[0]) if t.dim() == inputs[0].dim() else _const(FIXED, t.dim()))
        else:
            for t in inputs:
                self.fix(self.lab(t), f"{name}: unknown effect on channels")
            for t in outs:
                self.set_lab(t, _const(FIXED, t.dim()))

    def _preserves_channels(self, x: torch.Tensor, o: torch.Tensor) -> bool:
        """Pooling, interpolation, padding: same rank, and every labelled axis keeps its size."""
        lab = self.lab(x)
        return (lab.dim() == x.dim() == o.dim()
                and all(lab.shape[d] == 1 or o.shape[d] == x.shape[d] for d in range(x.dim())))

    def _broadcast_unite(self, inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        ndim = outs[0].dim()
        labs = []
        for t in inputs:
            if id(t) in self.params and t.dim() > 0 and t.numel() > 1:
                continue
            lab = self.lab(t)
            if lab.dim() != t.dim():
                continue
            labs.append(lab.reshape((1,) * (ndim - lab.dim()) + tuple(lab.shape)))
        if labs:
            shape = torch.broadcast_shapes(*[lab.shape for lab in labs])
            result = torch.full(shape, NONE, dtype=torch.long)
            for lab in labs:
                lab = lab.expand(shape)
                both = (result >= 0) & (lab >= 0)
                if both.any():
                    self.graph.uf.unite_arrays(result[both], lab[both])
                result = torch.where(result >= 0, result, lab)
            result = _compress(result)
        else:
            result = _const(NONE, ndim)
        for t in inputs:  # parameters broadcast against labelled channels (e.g. a layer scale) follow them
            if id(t) in self.params and t.dim() > 0 and t.numel() > 1:
                self._follow_param(t, result, ndim)
        for t in outs:
            self.set_lab(t, result)

    def _follow_param(self, p: torch.Tensor, result: torch.Tensor, ndim: int) -> None:
        offset = ndim - p.dim()
        big = [d for d in range(p.dim()) if p.shape[d] > 1]
        if len(big) != 1 or offset < 0:
            self.fix(result, f"parameter {self.params[id(p)][0]}.{self.params[id(p)][1]} broadcast in several dims")
            return
        d = big[0]
        others = [k for k in range(result.dim()) if k != d + offset and result.shape[k] > 1]
        if result.shape[d + offset] != p.shape[d] or others:
            self.fix(result, "parameter broadcast against unlabelled channels")
            return
        self.add_slice(p, d, result.movedim(d + offset, 0).reshape(-1), "other")


def trace(model: nn.Module, example_input) -> DependencyGraph:
    """Trace ``model`` once on ``example_input`` into a :class:`DependencyGraph`: a tensor, a tuple of
    positional arguments, or one list of tensors (a detection model's images); the output may be any
    structure of tensors (every tensor of it keeps its channels)."""
    graph = DependencyGraph()
    tracer = _Tracer(model, graph)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            for t in _tensors_in(inputs):
                tracer.set_lab(t, _const(FIXED, t.dim()))
            out = model(*inputs)
        for t in _tensors_in(out):
            tracer.fix(tracer.lab(t), "model output")
    finally:
        model.train(was_training)
    _tie_repeated_uses(graph)
    _fix_untraceable_params(model, graph)
    return graph


def _tie_repeated_uses(graph: DependencyGraph) -> None:
    """A layer called more than once gets one slice per call; its channels must be removed consistently."""
    first: dict[tuple[str, str, int], Slice] = {}
    for s in graph.slices:
        key = (s.module, s.param, s.dim)
        if key in first:
            graph.uf.unite_arrays(first[key].labels, s.labels)
        else:
            first[key] = s


def _fix_untraceable_params(model: nn.Module, graph: DependencyGraph) -> None:
    """A layer whose parameters were met in an unhandled way keeps all its channels (every slice of it is fixed)."""
    seen = {(s.module, s.param) for s in graph.slices}
    modules = dict(model.named_modules())
    for s in graph.slices:
        module = modules[s.module]
        for pname, p in module.named_parameters(recurse=False):
            if (s.module, pname) not in seen and p.dim() > 0 and p.shape[0] > 1:
                graph.uf.fix(s.labels[s.labels > 0])
                graph.fixed_reasons.setdefault(f"{s.module}.{pname} not traced", f"{s.module}.{pname} not traced")
