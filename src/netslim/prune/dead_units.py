"""Dead units of a sparse model, removed exactly before storage.

After heavy unstructured pruning (sparse variational dropout leaves LeNet-5's ``fc1`` with a few dozen live
rows and columns) many units are dead in one of two ways, and each can be cleaned up without changing a
single output:

* **unused**: a unit whose outgoing weights in the next layer are all zero feeds nothing, so its incoming
  weights and its bias can be zeroed;
* **constant**: a unit whose incoming weights are all zero outputs a constant (its bias, through whatever
  elementwise activation or pooling follows). The next layer's bias absorbs that constant times the
  outgoing weights, after which the unit is unused.

Both leave zeros that :mod:`netslim.encode` stores for nearly nothing (the biases of a pruned LeNet cost
more than its weights otherwise). The layers are taken in execution order and the constant is read from
the next layer's actual input, so the ops in between need not be known; every change is verified on
example inputs and undone if any output moves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..surgery import forward_once

FOLDABLE = (nn.Linear, nn.Conv2d)


@dataclass
class DeadUnitReport:
    """Units made exactly zero per layer, and whether the outputs were verified unchanged."""

    unused: dict[str, int]
    constant: dict[str, int]
    biases_zeroed: int
    max_output_change: float
    applied: bool


def _execution_order(model: nn.Module, example_input) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Names of the foldable layers in the order they run, and each one's input on ``example_input``."""
    order, inputs, handles = [], {}, []
    for name, m in model.named_modules():
        if isinstance(m, FOLDABLE) and m.bias is not None:
            def hook(mod, args, out, name=name):
                if name not in inputs:
                    order.append(name)
                    inputs[name] = args[0].detach()
            handles.append(m.register_forward_hook(hook))
    forward_once(model, example_input, handles)
    return order, inputs


def _columns_per_unit(prev: nn.Module, nxt: nn.Module) -> int | None:
    """How many input positions of ``nxt`` each output unit of ``prev`` occupies (None: not a chain link)."""
    units = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
    if isinstance(nxt, nn.Conv2d):
        return 1 if nxt.in_channels == units and nxt.groups == 1 else None
    if nxt.in_features % units:
        return None
    return nxt.in_features // units


def _outgoing(nxt: nn.Module, unit: int, span: int) -> torch.Tensor:
    if isinstance(nxt, nn.Conv2d):
        return nxt.weight[:, unit]
    return nxt.weight[:, unit * span:(unit + 1) * span]


def _fold_pair(prev: nn.Module, nxt: nn.Module, nxt_input: torch.Tensor, span: int) -> tuple[int, int]:
    """Zero the unused units of ``prev`` and fold its constant units into ``nxt``'s bias; (unused, constant)."""
    unused = constant = 0
    units = prev.weight.shape[0]
    with torch.no_grad():
        for u in range(units):
            out_w = _outgoing(nxt, u, span)
            if not bool(out_w.any()):
                if prev.weight[u].any() or prev.bias[u] != 0:
                    prev.weight[u].zero_()
                    prev.bias[u] = 0
                    unused += 1
                continue
            if prev.weight[u].any():
                continue
            if isinstance(nxt, nn.Conv2d):
                if any(p != 0 for p in nxt.padding) or isinstance(nxt.padding, str):
                    continue
                values = nxt_input[:, u]
                if values.numel() == 0 or values.max() != values.min():
                    continue
                nxt.bias += float(values.flatten()[0]) * out_w.sum(dim=(1, 2))
            else:
                values = nxt_input.flatten(1)[:, u * span:(u + 1) * span]
                if not torch.equal(values, values[:1].expand_as(values)):
                    continue
                nxt.bias += out_w @ values[0]
            out_w.zero_()
            prev.bias[u] = 0
            constant += 1
    return unused, constant


def fold_dead_units_(model: nn.Module, example_input: torch.Tensor, atol: float = 1e-5,
                     max_rounds: int = 8) -> DeadUnitReport:
    """Zero the dead units of ``model`` in place (see the module docstring) and verify on ``example_input``.

    The model must carry its final weights (parametrizations baked). If any output changes by more than
    ``atol`` relative to the output's scale, every change is undone and the report says so.
    """
    model.eval()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(example_input)
    unused: dict[str, int] = {}
    constant: dict[str, int] = {}
    for _ in range(max_rounds):
        changed = 0
        order, inputs = _execution_order(model, example_input)
        for a, b in zip(order, order[1:]):
            prev, nxt = model.get_submodule(a), model.get_submodule(b)
            span = _columns_per_unit(prev, nxt)
            if span is None:
                continue
            n_unused, n_const = _fold_pair(prev, nxt, inputs[b], span)
            unused[a] = unused.get(a, 0) + n_unused
            constant[a] = constant.get(a, 0) + n_const
            changed += n_unused + n_const
        if not changed:
            break
    with torch.no_grad():
        after = model(example_input)
    change = float((after - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    applied = change <= atol * scale
    if not applied:
        model.load_state_dict(saved)
    biases = sum(int((m.bias == 0).sum()) for m in model.modules() if isinstance(m, FOLDABLE) and m.bias is not None)
    return DeadUnitReport(unused, constant, biases, change, applied)
