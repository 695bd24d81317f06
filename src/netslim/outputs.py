"""Model outputs of any structure: one tensor, or tuples, lists and dicts of them, nested.

torchvision's segmentation models return ``OrderedDict(out=..., aux=...)``, its detection models (in eval
mode) a list with one dict of boxes, labels and scores per image. Everything in netslim that looks at a
model's output - the shape check after structured pruning, the profiler, the ONNX exporter and runner -
goes through these helpers, so every output counts, in one order: the *flattened order* of
``torch.utils._pytree`` (tuple and list items in order, dict values in insertion order, depth first).
Leaves that are not tensors (``None``, numbers, strings) are skipped.

Inputs follow one rule too (:func:`as_args`): a tuple is the model's positional arguments, anything else
(a tensor, a detection model's list of images) is its one argument.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """Every tensor in ``output``, in flattened order (a single tensor gives a one-element list)."""
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def as_args(example_input: Any) -> tuple:
    """The positional arguments ``model(*as_args(x))`` takes: a tuple as given, anything else as the one
    argument (a tensor, or the list of images a torchvision detection model takes)."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


def tree_to(obj: Any, device: str | torch.device) -> Any:
    """``obj`` with every tensor in it moved to ``device`` (other leaves unchanged)."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def batch_size(example_input: Any) -> int | None:
    """The batch size of a tensor input or of the first tensor of a tuple of positional inputs; ``None``
    for a list of images (each image is its own tensor) or an input without tensors."""
    first = next((a for a in as_args(example_input) if isinstance(a, torch.Tensor)), None)
    if first is None or first.dim() == 0 or not all(isinstance(a, torch.Tensor) for a in as_args(example_input)):
        return None
    return int(first.shape[0])


def output_names(output: Any, prefix: str = "output") -> list[str]:
    """A name for every tensor of ``output`` in flattened order: ``output`` for a single tensor, else the
    path inside the structure, e.g. ``out`` and ``aux`` for a dict, ``output_0`` for a tuple's first item,
    ``output_0.boxes`` for the boxes of a detection model's first image."""
    if isinstance(output, torch.Tensor):
        return [prefix]
    leaves, _ = pytree.tree_flatten_with_path(output)
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(_key(k)) for k in path]
        name = ".".join(parts) if parts and not parts[0].isdigit() else f"{prefix}_{'.'.join(parts)}"
        names.append(name)
    if len(set(names)) != len(names):  # keys that only differ in punctuation: fall back to positions
        names = [f"{prefix}_{i}" for i in range(len(names))]
    return names


def _key(entry) -> object:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def output_shapes(output: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor of ``output``, in flattened order."""
    return [tuple(t.shape) for t in flatten_outputs(output)]


def output_nbytes(output: Any) -> int:
    """Bytes of every tensor of ``output`` together."""
    return sum(t.numel() * t.element_size() for t in flatten_outputs(output))


def unflatten_like(template: Any, tensors: list[torch.Tensor]) -> Any:
    """Put ``tensors`` (flattened order) back into the structure of ``template``; non-tensor leaves stay."""
    leaves, spec = pytree.tree_flatten(template)
    it = iter(tensors)
    filled = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return pytree.tree_unflatten(filled, spec)


def shape_mismatch(reference: Any, got: Any) -> str | None:
    """``None`` when ``got`` has as many tensors as ``reference``, each of the same rank and the same size in
    every dimension but the first, else one line naming the output that differs and how.

    The first dimension is the batch, or a count that depends on the data (the boxes a detection model
    found in an image): a model whose channels were removed keeps the first and must keep all the others.
    """
    ref, new = flatten_outputs(reference), flatten_outputs(got)
    if len(ref) != len(new):
        return f"{len(ref)} output tensors became {len(new)}"
    for name, a, b in zip(output_names(reference), ref, new):
        if a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
            return f"output {name!r} changed shape {tuple(a.shape)} -> {tuple(b.shape)}"
    return None


__all__ = ["as_args", "tree_to", "batch_size", "flatten_outputs", "output_names", "output_shapes", "output_nbytes", "unflatten_like",
           "shape_mismatch"]
