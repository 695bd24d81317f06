"""Which layers a technique touches: one ``exclude`` (and ``layers``) for every family.

A name is a module name as ``model.named_modules()`` gives it (``"features.0"``, ``"layer1.0.conv1"``).
Every name given is checked against the model, so a misspelled one is an error that lists the valid
names instead of being silently ignored, and a name covers its submodules: ``exclude=["layer1"]``
leaves every layer inside ``layer1`` alone.
"""
from __future__ import annotations

import difflib
from typing import Iterable

from torch import nn

from .errors import NetslimError

MAX_LISTED = 120  # longer layer lists are cut in error messages (the count of the rest is given)


def layer_names(model: nn.Module) -> list[str]:
    """Names of every submodule of ``model`` in definition order (what :meth:`nn.Module.get_submodule` takes)."""
    return [name for name, _ in model.named_modules() if name]


def unknown_layer(model: nn.Module, name: str, what: str = "", where: str = "") -> NetslimError:
    """``[what: ]unknown layer 'conv9'[ where] (did you mean conv1?); valid layers: conv1, bn1, ...``."""
    names = layer_names(model)
    shown = ", ".join(names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        shown += f", ... ({len(names) - MAX_LISTED} more)"
    close = difflib.get_close_matches(str(name), names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    prefix = f"{what}: " if what else ""
    return NetslimError(f"{prefix}unknown layer {name!r}{where}{hint}; valid layers: {shown or '(none)'}")


def check_layer_names(model: nn.Module, names: Iterable[str], what: str = "exclude") -> tuple[str, ...]:
    """``names`` as a tuple, each checked to be a submodule of ``model`` (else :func:`unknown_layer`)."""
    if isinstance(names, str):
        raise NetslimError(f"{what} must be a list of layer names, got the string {names!r}; write [{names!r}]")
    names = tuple(names or ())
    known = {n for n, _ in model.named_modules()}
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise unknown_layer(model, name, what)
    return names


def covers(names: Iterable[str], name: str) -> bool:
    """Whether ``name`` is one of ``names`` or inside one of them (``"layer1"`` covers ``"layer1.0.conv1"``)."""
    return any(n == "" or name == n or name.startswith(n + ".") for n in names)


def select_layers(model: nn.Module, kinds: type | tuple[type, ...] = (nn.Module,), layers: Iterable[str] | None = None,
                  exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The modules of ``kinds``, in model order, inside one of ``layers`` (every one when ``layers`` is
    empty or None) and not inside any of ``exclude``. Every name in ``layers`` and ``exclude`` must be a
    module of ``model``."""
    wanted = check_layer_names(model, layers or (), "layers")
    skipped = check_layer_names(model, exclude, "exclude")
    return {n: m for n, m in model.named_modules()
            if isinstance(m, kinds) and (not wanted or covers(wanted, n)) and not covers(skipped, n)}


__all__ = ["select_layers", "check_layer_names", "covers", "unknown_layer", "layer_names"]
