"""Model registry: a builder per name, looked up by :func:`get` (timm's ``create_model`` pattern)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import NetslimError, unknown_choice
from ..io import load_checkpoint
from ..paths import shared_dir
from .references import TIMM_PREFIX, build_timm, call_model_factory, is_factory_reference

TORCHVISION_PREFIX = "torchvision:"

# checkpoints in ../shared/models, used when weights="shared"
SHARED_CHECKPOINTS = {
    "lenet300": "mnist_lenet300.pt",
    "lenet5": "mnist_lenet5.pt",
    "resnet20": "cifar10_resnet20.pt",
    "resnet56": "cifar10_resnet56.pt",
    "mobilenetv2": "cifar10_mobilenetv2.pt",
    "vgg16": "cifar10_vgg16.pt",
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    input_size: tuple[int, ...]
    dataset: str | None


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, input_size: tuple[int, ...], dataset: str | None = None):
    """Decorator: register a builder ``fn(num_classes=...) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, fn, tuple(input_size), dataset)
        return fn

    return wrap


def names() -> list[str]:
    """Names of the zoo's own models."""
    return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec`; torchvision and timm names get a 224x224 ImageNet spec, a user's
    factory (``file.py:factory``, ``package.module:factory``; see :mod:`netslim.zoo.references`) no input size."""
    if not isinstance(name, str):
        raise NetslimError(f"model must be a name or reference string, got {name!r}")
    if is_factory_reference(name):
        return ModelSpec(name, lambda **kw: call_model_factory(name, **kw), (), None)
    if name.startswith(TIMM_PREFIX):
        return ModelSpec(name, lambda **kw: build_timm(name, **kw), (1, 3, 224, 224), None)
    if name.startswith(TORCHVISION_PREFIX):
        _torchvision_builder(name)  # validates the name
        return ModelSpec(name, lambda **kw: _build_torchvision(name, **kw), (1, 3, 224, 224), None)
    if name not in _REGISTRY:
        raise unknown_choice("model", name, names() + ["torchvision:<name>", "timm:<name>", "file.py:factory",
                                                       "package.module:factory"])
    return _REGISTRY[name]


def _torchvision_builder(name: str):
    import torchvision

    tv_name = name[len(TORCHVISION_PREFIX):]
    available = set(torchvision.models.list_models(module=torchvision.models))
    if tv_name not in available:
        close = sorted(n for n in available if tv_name[:4] in n) or sorted(available)[:10]
        raise NetslimError(f"unknown torchvision model {tv_name!r}; similar names: {', '.join(close[:12])}")
    return tv_name


def _build_torchvision(name: str, num_classes: int | None = None) -> nn.Module:
    import torchvision

    tv_name = _torchvision_builder(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if tv_name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(tv_name, weights=None, **kwargs)


def get(name: str, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """Build model ``name`` (a zoo name or ``torchvision:<name>``) and optionally load ``weights``.

    ``weights`` is a path to a ``state_dict`` file (loaded with ``weights_only=True`` and
    ``strict=True``), or ``"shared"`` for the matching checkpoint in ``../shared/models``.
    """
    s = spec(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = s.build(**kwargs)
    if weights is not None:
        load_weights(model, resolve_weights(name, weights))
    return model


def resolve_weights(name: str, weights: str | Path) -> Path:
    if str(weights) != "shared":
        return Path(weights)
    if name not in SHARED_CHECKPOINTS:
        raise unknown_choice("model with shared weights", name, SHARED_CHECKPOINTS)
    root = shared_dir()
    if root is None:
        raise NetslimError("weights='shared' but no shared/ folder found (set $NETSLIM_SHARED)")
    return root / "models" / SHARED_CHECKPOINTS[name]


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain ``state_dict`` strictly; a layout mismatch is one clear error."""
    state = load_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # netslim training checkpoints
    if not isinstance(state, dict):
        raise NetslimError(f"{path} does not hold a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).split("\n")[1].strip() if "\n" in str(exc) else str(exc)
        raise NetslimError(f"weights {path} do not fit the model: {first}") from None
    return model


#: the most tensor elements a model built from a file's reference may have
MAX_FILE_MODEL_ELEMENTS = 1 << 28


def estimate_elements(name: str, num_classes: int | None = None) -> int:
    """Elements of the parameters and buffers of model ``name``, built on the meta device (nothing allocated)."""
    import torch

    s = spec(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with torch.device("meta"):
            model = s.build(**kwargs)
    except NetslimError:
        raise
    except Exception as exc:  # a builder refusing its arguments
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise NetslimError(f"cannot build {name!r} with num_classes={num_classes!r}: {type(exc).__name__}"
                           f"{': ' + lines[0][:200] if lines else ''}") from None
    return sum(int(t.numel()) for t in model.state_dict().values())


def check_file_model(name: str, num_classes: int | None, source: str, max_elements: int) -> None:
    """Refuse, before building it, a model named by a file that is larger than ``max_elements`` (what the file's
    tensors can justify) or than :data:`MAX_FILE_MODEL_ELEMENTS`; ``num_classes`` must be null or 1..2**24."""
    if not (num_classes is None or (isinstance(num_classes, int) and not isinstance(num_classes, bool)
                                    and 1 <= num_classes <= 1 << 24)):
        raise NetslimError(f"{source}: bad field num_classes = {str(num_classes)[:40]} (must be null or an integer "
                           f"in 1..{1 << 24})")
    size = estimate_elements(name, num_classes)
    limit = min(max_elements, MAX_FILE_MODEL_ELEMENTS)
    if size > limit:
        raise NetslimError(f"{source}: bad field arch = {name[:80]!r} with num_classes={num_classes}: that model has "
                           f"{size:,} elements, more than the file's tensors can fill (at most {limit:,})")
