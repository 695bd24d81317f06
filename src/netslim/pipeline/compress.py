"""``netslim.compress``: the recipe pipeline (run directory, measurement after every stage, resume, report)
on any ``nn.Module`` and any dataset.

.. code-block:: python

    import netslim
    from netslim.prune.structured import ChannelPruneConfig

    result = netslim.compress(model, [ChannelPruneConfig(target="macs:2"), {"finetune": {"epochs": 1}},
                                      {"quantize": {"method": "ptq"}}, "export"],
                              train_data=train_set, eval_data=val_set, out="runs/mine")
    print(result.table())
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import NetslimError
from ..surgery import safe_deepcopy
from ..train import check_device, default_device, seed_everything
from .databundle import DatasetBundle
from .recipe import Recipe, check_top_level_types, load_recipe, parse_stages
from .report import stage_table
from .runner import RunInputs, first_input, inputs_from_recipe, run_stages, validate_inputs


@dataclass
class CompressResult:
    """The compressed model, the metrics rows (baseline first, then one per stage) and the run directory."""

    model: nn.Module
    metrics: list[dict]
    run_dir: Path
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float | None]:
        """The six ratios (and ``r_T_ort`` after an export stage) of the final model against the original."""
        return self.metrics[-1]["ratios"]

    def table(self) -> str:
        return stage_table(self.metrics)


def model_digest(model: nn.Module) -> str:
    """A hash of the model's class, tensor names, shapes and values: a run directory resumes only the same model."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _described(data: Any) -> str:
    return "none" if data is None else f"{type(data).__module__}.{type(data).__qualname__}[{len(data)}]"


def _batch_sizes(values: Sequence[int]) -> list[int]:
    try:
        sizes = [int(b) for b in values]
    except (TypeError, ValueError):
        raise NetslimError(f"latency_batch_sizes must be a list of positive integers, got {values!r}") from None
    if not sizes or any(b < 1 for b in sizes) or any(isinstance(b, bool) for b in values):
        raise NetslimError(f"latency_batch_sizes must be a list of positive integers, got {values!r}")
    return sizes


def compress(model: nn.Module | str, stages: str | Path | Recipe | Sequence[Any], *, train_data: Any = None,
             eval_data: Any = None, calib_data: Any = None, example_input: torch.Tensor | None = None,
             metric: Callable[[nn.Module, Any], float] | None = None, out: str | Path = "runs/compress",
             weights: str | Path | None = None, device: str | torch.device | None = None, seed: int | None = None,
             latency_batch_sizes: Sequence[int] | None = None, test_limit: int | None = None,
             calib_size: int | None = None, restart: bool = False, progress: bool = True) -> CompressResult:
    """Run recipe stages on ``model`` into the run directory ``out`` and return the compressed model.

    ``model``: an ``nn.Module`` (copied; yours is not changed) or a reference string (``resnet56``,
    ``torchvision:<name>``, ``timm:<name>``, ``path/to/file.py:factory``, ``package.module:factory``, with
    ``weights``). ``stages``: a recipe file (its ``model:``/``data:`` are replaced by the arguments given here),
    or a list whose items are stage names, ``{name: {options}}`` mappings or stage config objects.
    ``train_data`` / ``eval_data`` / ``calib_data``: Datasets or DataLoaders of ``(input, target)``;
    ``eval_data`` is what ``metric`` is computed on (default top-1 accuracy; a function
    ``metric(model, eval_data) -> float``, higher is better, e.g. mIoU for segmentation). ``calib_data``
    defaults to a fixed subset of ``train_data``. ``example_input`` defaults to the first item of ``eval_data``.
    Rerunning with the same arguments resumes a killed run; ``restart=True`` discards ``out`` first.
    """
    recipe = _recipe_from(stages)
    overrides = {"device": None if device is None else str(device), "seed": seed, "test_limit": test_limit,
                 "calib_size": calib_size,
                 "latency_batch_sizes": None if latency_batch_sizes is None else _batch_sizes(latency_batch_sizes)}
    check_top_level_types({k: v for k, v in overrides.items() if k in ("seed", "test_limit", "calib_size")},
                           required=())
    for key, value in overrides.items():
        if value is not None:
            setattr(recipe, key, value)
    run_device = check_device(recipe.device) if recipe.device else default_device()
    if isinstance(model, str) and eval_data is None and train_data is None:
        recipe.model = model
        recipe.weights = None if weights is None else str(weights)
        validate_inputs(recipe)
        make_inputs = lambda: inputs_from_recipe(recipe, run_device)  # noqa: E731
    else:
        if eval_data is None:
            raise NetslimError("eval_data is required with your own model: the dataset the metric is measured on")
        module = _module_from(model, weights)
        bundle = DatasetBundle(train_data, eval_data, calib_data, None, recipe.calib_size, recipe.test_limit)
        recipe.model = model if isinstance(model, str) else f"python:{type(module).__qualname__}#{model_digest(module)}"
        recipe.data = f"python:{_described(bundle.train_data)}/{_described(bundle.eval_data)}"
        recipe.weights = None if weights is None else str(weights)
        x = example_input if example_input is not None else first_input(bundle.test)
        if not isinstance(x, torch.Tensor):
            raise NetslimError(f"example_input must be a tensor, got {type(x).__name__}")
        name = getattr(metric, "__name__", "metric") if metric is not None else "top1"
        ref = model if isinstance(model, str) else None
        make_inputs = lambda: RunInputs(module, bundle, x.to(run_device), metric, name, ref)  # noqa: E731
    seed_everything(recipe.seed)
    metrics, final = run_stages(recipe, make_inputs, out, restart=restart, progress=progress)
    run_dir = Path(out)
    files = {p.name: p for p in sorted(run_dir.glob("*.onnx"))}
    return CompressResult(final, metrics, run_dir, files)


def _module_from(model: nn.Module | str, weights) -> nn.Module:
    from .. import zoo

    if isinstance(model, nn.Module):
        return safe_deepcopy(model)
    if isinstance(model, str):
        return zoo.get(model, weights)
    raise NetslimError(f"model must be an nn.Module or a model reference string, got {type(model).__name__}")


def _recipe_from(stages: Any) -> Recipe:
    if isinstance(stages, Recipe):
        return copy.copy(stages)
    if isinstance(stages, (str, Path)):
        return load_recipe(stages)
    return Recipe(model="python", data="python", stages=parse_stages(stages))
