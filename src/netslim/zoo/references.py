"""Model and data references beyond the zoo's names: a user's own Python factory, or a timm model.

A *reference* is the string a recipe's ``model:`` or ``data:`` key (or the CLI's ``--model``) holds:

* ``path/to/file.py:factory``: the function ``factory`` defined in that file;
* ``package.module:factory``: the function ``factory`` of an importable module;
* ``timm:<name>``: ``timm.create_model(name, pretrained=False)`` (timm is an optional extra).

Loading a user's Python file runs that file's code: it is an explicit act of whoever wrote the
recipe or typed the command, exactly as ``python file.py`` would be. netslim never loads code from
a checkpoint, a ``.nsz``/``.nsq`` file or a run directory (those hold tensors and JSON only); a
resumed run rebuilds the model by calling the same reference again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import NetslimError

TIMM_PREFIX = "timm:"
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_factory_reference(text: str) -> bool:
    """``file.py:factory`` or ``package.module:factory`` (not ``torchvision:``/``timm:`` names)."""
    if not isinstance(text, str) or ":" not in text or text.startswith(("torchvision:", TIMM_PREFIX)):
        return False
    source, _, factory = text.rpartition(":")
    return bool(_IDENTIFIER.match(factory)) and (source.endswith(".py") or bool(_MODULE_PATH.match(source)))


def resolve_reference(text: str, base_dir: Path | None) -> str:
    """A ``file.py:factory`` reference with its file made absolute against ``base_dir`` (a recipe's folder)
    when the relative path exists there; other references unchanged."""
    if not is_factory_reference(text):
        return text
    source, _, factory = text.rpartition(":")
    if source.endswith(".py") and not Path(source).is_absolute() and base_dir is not None:
        candidate = Path(base_dir) / source
        if candidate.is_file():
            return f"{candidate.resolve()}:{factory}"
    return text


def load_factory(text: str) -> Callable[..., Any]:
    """The callable a ``file.py:factory`` or ``package.module:factory`` reference names."""
    source, _, factory = text.rpartition(":")
    module = _load_file(source) if source.endswith(".py") else _import(source)
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise NetslimError(f"{source} has no function {factory!r}; its functions: {', '.join(public[:20]) or '(none)'}")
    return fn


def _load_file(source: str):
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise NetslimError(f"model/data file not found: {source}")
    name = "netslim_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NetslimError(f"cannot load Python file {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except NetslimError:
        raise
    except Exception as exc:
        del sys.modules[name]
        raise NetslimError(f"{source} failed to load: {type(exc).__name__}: {_first_line(exc)}") from None
    return module


def _import(source: str):
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        raise NetslimError(f"cannot import module {source!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def call_model_factory(text: str, num_classes: int | None = None):
    """Build a model from a factory reference; ``num_classes`` is passed only when given."""
    from torch import nn

    fn = load_factory(text)
    kwargs = {}
    if num_classes is not None:
        params = inspect.signature(fn).parameters
        if "num_classes" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise NetslimError(f"{text} takes no num_classes argument; remove num_classes or add it to the factory")
        kwargs["num_classes"] = num_classes
    try:
        model = fn(**kwargs)
    except NetslimError:
        raise
    except Exception as exc:
        raise NetslimError(f"{text} raised {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise NetslimError(f"{text} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_timm(name: str, num_classes: int | None = None):
    """``timm:<name>`` built with random weights (nothing is downloaded)."""
    try:
        import timm
    except ImportError:
        raise NetslimError(f"model {name!r} needs timm, an optional extra: pip install 'netslim[timm]'") from None
    tname = name[len(TIMM_PREFIX):]
    if tname not in timm.list_models():
        close = timm.list_models(f"*{tname[:5]}*")[:12]
        raise NetslimError(f"unknown timm model {tname!r}; similar names: {', '.join(close) or '(none)'}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(tname, pretrained=False, **kwargs)
