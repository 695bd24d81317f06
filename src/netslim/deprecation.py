"""Old names kept for one release: a renamed keyword argument or function still works, with a
:class:`DeprecationWarning` naming the new one."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

from .errors import NetslimError


def renamed_argument(new_value: Any, old_value: Any, old: str, new: str, where: str, default: Any = None) -> Any:
    """The value of argument ``new``, taking the deprecated ``old`` one when only that was given."""
    if old_value is None:
        return new_value
    if new_value is not default:
        raise NetslimError(f"{where}: give {new}= (the new name of {old}=), not both")
    warnings.warn(f"{where}: {old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return old_value


def deprecated_alias(fn: Callable, old: str) -> Callable:
    """``fn`` under its old name ``old``, warning at each call."""
    @functools.wraps(fn)
    def alias(*args, **kwargs):
        warnings.warn(f"{old} is deprecated; use {fn.__module__}.{fn.__name__}", DeprecationWarning, stacklevel=2)
        return fn(*args, **kwargs)
    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated name of :func:`{fn.__module__}.{fn.__name__}`."
    return alias
