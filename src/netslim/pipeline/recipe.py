"""Recipe files: YAML naming a model, its data and the stages to run in order.

.. code-block:: yaml

    model: lenet5                 # zoo name or torchvision:<name>
    weights: shared               # a state_dict path, "shared" (../shared/models), or omitted
    data: fashion-mnist           # dataset name or ImageFolder path
    stages:
      - prune: {method: magnitude, sparsity: 0.9}
      - finetune: {epochs: 1, lr: 0.01}

Everything is validated before any work: unknown top-level keys, stage names, stage keys.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import NetslimError
from .stages import build_config

TOP_LEVEL_KEYS = ("name", "model", "weights", "data", "data_root", "num_classes", "device", "seed",
                  "latency_batch_sizes", "test_limit", "calib_size", "stages")


@dataclass
class StageSpec:
    name: str
    options: dict[str, Any]
    config: Any


@dataclass
class Recipe:
    model: str
    data: str
    stages: list[StageSpec]
    weights: str | None = None
    name: str | None = None
    data_root: str | None = None
    num_classes: int | None = None
    device: str | None = None
    seed: int = 0
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1])
    test_limit: int | None = None
    calib_size: int = 512
    base_dir: Path = Path(".")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("stages", "base_dir")}
        d["stages"] = [{s.name: s.options} for s in self.stages]
        return d

    def fingerprint(self) -> str:
        """Hash of everything that changes the run's results (to refuse resuming a different recipe)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def resolve_path(self, value: str | None) -> str | None:
        """Paths in a recipe are relative to the recipe file, unless absolute or a keyword."""
        if value is None or value == "shared" or Path(value).is_absolute():
            return value
        candidate = self.base_dir / value
        return str(candidate) if candidate.exists() else value


def _parse_stage(item: Any, index: int) -> StageSpec:
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, options = next(iter(item.items()))
        options = options or {}
    else:
        raise NetslimError(f"stage #{index + 1} must be a name or a one-key mapping 'name: {{options}}', got {item!r}")
    if not isinstance(options, dict):
        raise NetslimError(f"options of stage #{index + 1} ({name}) must be a mapping, got {options!r}")
    return StageSpec(str(name), options, build_config(str(name), options))


def parse_recipe(doc: Any, base_dir: Path = Path(".")) -> Recipe:
    if not isinstance(doc, dict):
        raise NetslimError("a recipe must be a YAML mapping with keys model, data, stages")
    unknown = [k for k in doc if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise NetslimError(f"unknown recipe key {unknown[0]!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    for key in ("model", "data", "stages"):
        if key not in doc:
            raise NetslimError(f"recipe is missing the key {key!r}")
    if not isinstance(doc["stages"], list) or not doc["stages"]:
        raise NetslimError("recipe 'stages' must be a non-empty list")
    stages = [_parse_stage(item, i) for i, item in enumerate(doc["stages"])]
    fields = {k: v for k, v in doc.items() if k != "stages"}
    bs = fields.get("latency_batch_sizes", [1])
    if not isinstance(bs, list) or not all(isinstance(b, int) and b > 0 for b in bs):
        raise NetslimError(f"latency_batch_sizes must be a list of positive integers, got {bs!r}")
    return Recipe(stages=stages, base_dir=base_dir, **fields)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (``yaml.safe_load``)."""
    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"recipe file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise NetslimError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_recipe(doc, path.parent.resolve())
