"""Atomic artifact writing: write to a temporary file in the same folder, then rename."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path`` and rename it into place.

    A reader never sees a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically, indented, with a trailing newline."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda f: f.write(text), mode="w")


def save_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint safely (``weights_only=True``); a missing file is a :class:`NetslimError`."""
    from .errors import NetslimError

    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or pickled-code files
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        detail = f": {lines[0][:200]}" if lines else ""
        raise NetslimError(f"cannot load checkpoint {path}: {type(exc).__name__}{detail}") from None


MAX_JSON_DEPTH = 64
MAX_JSON_INT_DIGITS = 16          # |n| < 10**16 covers every integer up to 2**53
_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    value = int(text)
    if abs(value) > 1 << 53:
        raise ValueError("integer beyond 2**53")
    return value


def _parse_constant(text: str):
    raise ValueError(f"{text} is not allowed")


class InflateError(ValueError):
    """:func:`bounded_inflate` refused its data; ``reason`` is ``"not zlib"``, ``"too large"`` or ``"truncated"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def bounded_inflate(data: bytes, limit: int) -> bytes:
    """zlib ``data`` decompressed to at most ``limit`` bytes and consumed exactly (a header of ``.nsz`` or ``.nsq``);
    anything else raises :class:`InflateError`, and the caller words it for its file."""
    import zlib

    d = zlib.decompressobj()
    try:
        text = d.decompress(data, limit + 1)
    except zlib.error:
        raise InflateError("not zlib") from None
    if len(text) > limit or d.unconsumed_tail:
        raise InflateError("too large")
    if not d.eof or d.unused_data:
        raise InflateError("truncated")
    return text


def bounded_json(data: bytes, source: str, what: str = "header", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON ``data``: UTF-8, nesting at most ``max_depth`` deep, integers within 2**53, no
    NaN/Infinity; any violation is a :class:`NetslimError` naming ``source`` and ``what``."""
    import numpy as np

    from .errors import NetslimError

    bare = _JSON_STRINGS.sub(b"", data)
    if bare:
        codes = np.frombuffer(bare, dtype=np.uint8)
        steps = np.isin(codes, (91, 123)).astype(np.int32) - np.isin(codes, (93, 125)).astype(np.int32)
        if steps.size and int(np.cumsum(steps).max()) > max_depth:
            raise NetslimError(f"{source}: corrupt {what} (JSON nested deeper than {max_depth})")
    try:
        return json.loads(data.decode("utf-8"), parse_int=_parse_int, parse_constant=_parse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NetslimError(f"{source}: corrupt {what} (not valid JSON: {str(exc)[:120]})") from None
