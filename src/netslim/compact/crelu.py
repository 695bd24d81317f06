"""CReLU-style transferred filters (Shang, Sohn, Almeida & Lee 2016, "Understanding and Improving
Convolutional Neural Networks via Concatenated Rectified Linear Units", Sec. 3): half of a layer's
filters are learned, the other half are their negations, so the layer computes ``C_out / 2`` outputs
and gets the rest by ``cat(h, -h)``. Shang et al. observed that the lower layers of trained CNNs learn
such negated pairs; the following ReLU keeps the positive and the negative phase of each.

Conversion from a trained layer: filters are paired greedily by most negative cosine similarity, and
each pair ``(a, b)`` is replaced by the least-squares filter ``h = (W_a - W_b) / 2`` (so ``W_a ~ h``,
``W_b ~ -h``). Valid only where the layer's output goes (through a BatchNorm at most) into a ReLU, the
setting of the paper; elsewhere the layer is skipped with that reason (see :func:`relu_follows`).
MACs and weights are halved; there is no width knob.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .cost import Cost, bias, positions, spatial
from .modules import NegConcat

_PASS = {"batch_norm"}
_RELU = {"relu", "relu_"}


class _Consumers(TorchFunctionMode):
    """Records which torch functions read each tensor (by id; outputs are kept alive so ids stay unique)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[int, list[tuple[str, int]]] = {}
        self.keep: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        out_id = id(out) if isinstance(out, torch.Tensor) else -1
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor):
                self.reads.setdefault(id(leaf), []).append((name, out_id))
        self.keep.append(out)
        return out


def relu_follows(model: nn.Module, example_input: torch.Tensor, names: list[str]) -> dict[str, str | None]:
    """For each conv in ``names``: None when its output is read only by a ReLU (possibly through one
    BatchNorm), else the reason CReLU's negated filters are not valid there."""
    outputs: dict[str, int] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: outputs.__setitem__(n, id(o))) for n in names]
    mode = _Consumers()
    try:
        with torch.no_grad(), mode:
            model.eval()(example_input)
    finally:
        for h in handles:
            h.remove()
    verdict: dict[str, str | None] = {}
    for n in names:
        tensor, path = outputs.get(n), []
        reason = "the layer did not run on the example input"
        while tensor is not None:
            reads = [r for r in mode.reads.get(tensor, []) if r[0] not in ("size", "dim", "__get__")]
            if reads and reads[0][0] in _RELU and reads[0][1] == tensor:  # an in-place ReLU reads it first
                reason = None
                break
            if len(reads) != 1:
                reason = f"its output is read by {len(reads)} operations ({', '.join(r[0] for r in reads) or 'none'})"
                break
            op, tensor = reads[0]
            path.append(op)
            if op in _RELU:
                reason = None
                break
            if op not in _PASS or len(path) > 1:
                reason = f"its output goes to {' -> '.join(path)}, not to a ReLU"
                break
        verdict[n] = reason
    return verdict


def pair_filters(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a, b) of C_out / 2 pairs of filters, greedily by most negative cosine similarity."""
    flat = w.detach().double().flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = flat @ flat.T
    n = sim.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    order = torch.argsort(sim[i, j])
    used = torch.zeros(n, dtype=torch.bool)
    a, b = [], []
    for k in order.tolist():
        p, q = int(i[k]), int(j[k])
        if not used[p] and not used[q]:
            used[p] = used[q] = True
            a.append(p)
            b.append(q)
            if len(a) == n // 2:
                break
    return torch.tensor(a), torch.tensor(b)


def crelu(conv: nn.Conv2d) -> nn.Sequential:
    """A conv to C_out / 2 channels (``h = (W_a - W_b) / 2``) and ``NegConcat`` back to the layer's order."""
    w = conv.weight.detach()
    o = w.shape[0]
    a, b = pair_filters(w)
    m = o // 2
    half = nn.Conv2d(conv.in_channels, m, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1,
                     conv.bias is not None, conv.padding_mode)
    neg = NegConcat(o)
    with torch.no_grad():
        half.weight.copy_((w[a] - w[b]) / 2)
        if conv.bias is not None:
            half.bias.copy_((conv.bias[a] - conv.bias[b]) / 2)
        index = torch.empty(o, dtype=torch.long)
        index[a] = torch.arange(m)
        index[b] = torch.arange(m, 2 * m)
        neg.index.copy_(index)
    return nn.Sequential(half, neg).to(w.device, w.dtype)


def crelu_cost(conv: nn.Conv2d, in_hw, out_hw) -> Cost:
    weights = conv.out_channels // 2 * conv.in_channels * spatial(conv)
    return Cost(weights + bias(conv) // 2, weights * positions(out_hw))


def crelu_heads(block: nn.Sequential) -> list:
    """The half conv, mixed into the layer's channels by +1 (channel a) and -1 (channel b)."""
    half, neg = block[0], block[1]
    m = half.out_channels
    mix = torch.zeros(m, neg.channels, dtype=torch.float64)
    where = torch.argsort(neg.index).cpu()  # position p of cat(h, -h) holds layer channel where[p]
    mix[torch.arange(m), where[:m]] = 1.0
    mix[torch.arange(m), where[m:]] = -1.0
    return [(half, mix)]


__all__ = ["crelu", "crelu_cost", "relu_follows", "pair_filters"]
