"""User-facing errors.

Every mistake a user can make (unknown model, bad ratio, missing file) raises
:class:`NetslimError`; the CLI prints its message on one line and exits non-zero. It is a
:class:`ValueError`, so ``except ValueError`` written against older releases still catches it.
"""
from __future__ import annotations

from typing import Iterable


class NetslimError(ValueError):
    """A problem with the user's input, reported as one clear line."""


def unknown_choice(kind: str, given: object, valid: Iterable[str]) -> NetslimError:
    """Build the standard message: ``unknown stage 'prun'; valid stages: ...``."""
    choices = ", ".join(sorted(valid))
    return NetslimError(f"unknown {kind} {given!r}; valid {kind}s: {choices}")
