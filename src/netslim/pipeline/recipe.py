"""Recipe files: YAML naming a model, its data and the stages to run in order.

.. code-block:: yaml

    model: lenet5                 # zoo name, torchvision:<name>, timm:<name>, file.py:factory or package.module:factory
    weights: shared               # a state_dict path, "shared" (../shared/models), or omitted
    data: fashion-mnist           # dataset name, ImageFolder path, or file.py:factory returning (train, test)
    stages:
      - prune: {method: magnitude, sparsity: 0.9}
      - finetune: {epochs: 1, lr: 0.01}

Everything is validated before any work: unknown top-level keys, stage names, stage keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import NetslimError
from ..zoo.references import resolve_reference
from .stages import build_config, stage_for_config

TOP_LEVEL_KEYS = ("name", "model", "weights", "data", "data_root", "num_classes", "device", "seed",
                  "latency_batch_sizes", "test_limit", "calib_size", "augment", "stages")


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
    augment: bool = True
    base_dir: Path = Path(".")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("stages", "base_dir")}
        d["stages"] = [{s.name: s.options} for s in self.stages]
        return d

    def fingerprint(self) -> str:
        """Hash of everything that changes the run's results (to refuse resuming a different recipe)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def resolve_reference(self, value: str) -> str:
        """A ``file.py:factory`` reference with its file found relative to the recipe file."""
        return resolve_reference(value, self.base_dir)

    def resolve_path(self, value: str | None) -> str | None:
        """Paths in a recipe are relative to the recipe file, unless absolute or a keyword."""
        if value is None or value == "shared" or Path(value).is_absolute():
            return value
        candidate = self.base_dir / value
        return str(candidate) if candidate.exists() else value


def _parse_stage(item: Any, index: int) -> StageSpec:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        name = stage_for_config(item)
        options = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
        return StageSpec(name, options, item)
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
    stages = parse_stages(doc["stages"])
    fields = {k: v for k, v in doc.items() if k != "stages"}
    check_top_level_types(fields)
    if not isinstance(fields.get("augment", True), bool):
        raise NetslimError(f"recipe key 'augment' must be true or false, got {fields['augment']!r}")
    bs = fields.get("latency_batch_sizes", [1])
    if not isinstance(bs, list) or not all(isinstance(b, int) and b > 0 for b in bs):
        raise NetslimError(f"latency_batch_sizes must be a list of positive integers, got {bs!r}")
    return Recipe(stages=stages, base_dir=base_dir, **fields)


_TOP_LEVEL_TYPES = {"name": str, "model": str, "weights": str, "data": str, "data_root": str, "num_classes": int,
                    "device": str, "seed": int, "test_limit": int, "calib_size": int}


def check_top_level_types(fields: dict[str, Any], required: tuple[str, ...] = ("model", "data")) -> None:
    for key, kind in _TOP_LEVEL_TYPES.items():
        value = fields.get(key)
        if value is None and key not in required:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise NetslimError(f"recipe key {key!r} must be {'an integer' if kind is int else 'a string'}, "
                               f"got {value!r}")
        if kind is int and key != "seed" and value < 1:
            raise NetslimError(f"recipe key {key!r} must be >= 1, got {value}")


def parse_stages(items: Any) -> list[StageSpec]:
    """Stages from a list of names, ``{name: {options}}`` mappings or stage config objects
    (``ChannelPruneConfig(target="macs:2")``: the stage is the one registered with that config class)."""
    if not isinstance(items, (list, tuple)) or not items:
        raise NetslimError("stages must be a non-empty list of stage names, {name: options} mappings or configs")
    return [_parse_stage(item, i) for i, item in enumerate(items)]


MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: recipes are a few hundred bytes
MAX_RECIPE_NODES = 20_000  # YAML values after expanding every alias (billion laughs); a recipe holds ~100
MAX_RECIPE_DEPTH = 64


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose composed graph, with every alias expanded, holds more
    than ``MAX_RECIPE_NODES`` nodes or nests deeper than ``MAX_RECIPE_DEPTH`` (checked before any Python
    object is built, so an expansion bomb costs nothing)."""

    _composed = 0

    def compose_node(self, parent, index):
        self._composed += 1  # counted while parsing, so a long list stops here, not after it is all read
        if self._composed > MAX_RECIPE_NODES:
            raise NetslimError(f"recipe expands to more than {MAX_RECIPE_NODES:,} YAML values (aliases or long "
                               "lists); a recipe is a short list of stages")
        return super().compose_node(parent, index)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root) -> None:
    sizes: dict[int, int] = {}

    def size(node, depth: int) -> int:
        if depth > MAX_RECIPE_DEPTH:
            raise NetslimError(f"recipe nests deeper than {MAX_RECIPE_DEPTH} levels")
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = MAX_RECIPE_NODES + 1  # a node reached again while being sized: a recursive alias
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1
            for child in node.value:
                total += size(child, depth + 1)
                if total > MAX_RECIPE_NODES:
                    break
        else:
            total = 1
        if total > MAX_RECIPE_NODES:
            raise NetslimError(f"recipe expands to more than {MAX_RECIPE_NODES:,} YAML values (aliases or long "
                               "lists); a recipe is a short list of stages")
        sizes[key] = total
        return total

    size(root, 0)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file: at most 1 MiB of UTF-8 YAML, parsed safely (no tags that build
    objects), aliases and list lengths bounded."""
    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"recipe file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise NetslimError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise NetslimError(f"{path} is larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a short YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NetslimError(f"{path} is not a text (UTF-8) YAML file: undecodable byte at offset {exc.start}") from None
    if "\x00" in text:
        raise NetslimError(f"{path} is not a text YAML file (it holds NUL bytes)")
    try:
        doc = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        raise NetslimError(f"{path} is not valid YAML: {lines[0]}") from None
    except RecursionError:
        raise NetslimError(f"{path} nests too deeply to be a recipe") from None
    return parse_recipe(doc, path.parent.resolve())
