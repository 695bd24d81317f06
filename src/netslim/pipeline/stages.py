"""The one registry of recipe stages.

A stage is a config dataclass and a function ``run(ctx, cfg) -> nn.Module``; the YAML keys of a
stage are exactly the config's fields, so unknown keys are caught with the valid ones listed.
A stage that changes the model's structure also gives ``restore(model, cfg, artifacts) -> nn.Module``,
which rebuilds that structure without data (``artifacts``: what the stage recorded, such as the
ranks it chose) so a resumed run can load the stage's checkpoint (checkpoints are plain
``state_dict``\\ s: no pickled code).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import NetslimError, unknown_choice
from .databundle import DataBundle

log = logging.getLogger("netslim.pipeline")


@dataclass
class StageContext:
    """What a stage may use: the current and original models, the data, and its own folder."""

    model: nn.Module
    original: nn.Module
    data: DataBundle
    stage_dir: Path
    device: torch.device
    example_input: torch.Tensor
    progress: bool = True
    artifacts: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    num_classes: int | None = None
    run_dir: Path | None = None
    latency_batch_sizes: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class StageDef:
    name: str
    config: type
    run: Callable[[StageContext, Any], nn.Module]
    restore: Callable[[nn.Module, Any, dict], nn.Module] | None
    doc: str


_STAGES: dict[str, StageDef] = {}
TECHNIQUE_STAGE_MODULES = ("netslim.prune.stages", "netslim.quant.stages", "netslim.encode.stages",
                           "netslim.lowrank.stages", "netslim.distill.stages",
                           "netslim.prune.structured.stages", "netslim.compact.stages")


def stage(name: str, config: type, restore: Callable[[nn.Module, Any, dict], nn.Module] | None = None):
    """Decorator registering ``run(ctx, cfg)`` as recipe stage ``name`` with config class ``config``."""

    def wrap(fn: Callable[[StageContext, Any], nn.Module]):
        if name in _STAGES:
            raise RuntimeError(f"stage {name!r} registered twice")
        _STAGES[name] = StageDef(name, config, fn, restore, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def stage_names() -> list[str]:
    _load_builtin_stages()
    return sorted(_STAGES)


def get_stage(name: str) -> StageDef:
    _load_builtin_stages()
    if name not in _STAGES:
        raise unknown_choice("stage", name, _STAGES)
    return _STAGES[name]


def stage_for_config(config: Any) -> str:
    """The name of the stage whose config class ``config`` is an instance of (the most specific one)."""
    _load_builtin_stages()
    matches = [s for s in _STAGES.values() if type(config) is s.config]
    if not matches:
        valid = ", ".join(f"{s.config.__name__} ({s.name})" for s in sorted(_STAGES.values(), key=lambda s: s.name))
        raise NetslimError(f"{type(config).__name__} is not a stage config; valid configs: {valid}")
    return matches[0].name


def build_config(stage_name: str, options: dict[str, Any] | None) -> Any:
    """Instantiate the stage's config from recipe keys; unknown keys and bad types are clear errors."""
    sdef = get_stage(stage_name)
    options = dict(options or {})
    valid = [f.name for f in dataclasses.fields(sdef.config)]
    for key in options:
        if key not in valid:
            raise NetslimError(f"unknown key {key!r} in stage {stage_name!r}; valid keys: {', '.join(valid)}")
    try:
        return sdef.config(**options)
    except NetslimError as exc:
        raise NetslimError(f"stage {stage_name!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise NetslimError(f"stage {stage_name!r}: {exc}") from None


def _load_builtin_stages() -> None:
    import importlib

    from . import builtin  # noqa: F401  (registers finetune)

    for module in TECHNIQUE_STAGE_MODULES:
        importlib.import_module(module)
