"""Where netslim looks for shared material and keeps its caches."""
from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path | None:
    """The project's ``shared/`` folder: ``$NETSLIM_SHARED``, else ``../shared`` from the working
    directory or from the source checkout, when it exists."""
    env = os.environ.get("NETSLIM_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd().parent / "shared", Path(__file__).resolve().parents[3] / "shared"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def cache_dir() -> Path:
    """netslim's cache: ``$NETSLIM_CACHE``, else ``$XDG_CACHE_HOME/netslim``, else ``~/.cache/netslim``."""
    env = os.environ.get("NETSLIM_CACHE")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "netslim"
    root.mkdir(parents=True, exist_ok=True)
    return root
