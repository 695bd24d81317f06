"""The model zoo: ``netslim.zoo.get("resnet56", weights=path)``; ``"torchvision:<name>"`` for torchvision's."""
from . import lenet, mobilenet, resnet_cifar, vgg  # noqa: F401  (registration)
from .registry import SHARED_CHECKPOINTS, ModelSpec, get, load_weights, names, register, resolve_weights, spec

__all__ = ["get", "names", "register", "spec", "load_weights", "resolve_weights", "ModelSpec", "SHARED_CHECKPOINTS"]
