"""Relative sparse indexing with filler zeros (Deep Compression, Han et al. 2016 §4, Fig. 2).

Non-zero positions of a tensor flattened in row-major (CSR-like) or column-major (CSC-like)
order are stored as gaps: ``gap = position - previous position - 1`` in ``bits`` bits. A gap
larger than ``2**bits - 1`` is bridged by filler entries, each an explicit zero advancing the
position by ``2**bits``. Row pointers are implicit in the flattened positions.

A pruned layer's whole dead output units (dim-0 slices) and input units (dim-1 slices) need not be
walked at all: :func:`active_slices` finds the slices that hold a non-zero, and only the sub-tensor
:func:`take_active` cuts out of them is gap-coded (:func:`put_active` puts it back).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import NetslimError

LAYOUTS = ("csr", "csc")


def flatten_order(shape: tuple[int, ...], layout: str) -> np.ndarray | None:
    """Permutation taking row-major flat positions to the layout's traversal order (None: identity)."""
    if layout == "csr" or len(shape) < 2:
        return None
    if layout != "csc":
        raise NetslimError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    rows, cols = shape[0], int(np.prod(shape[1:]))
    return np.arange(rows * cols).reshape(rows, cols).T.ravel()


def encode_gaps(values: np.ndarray, bits: int, zero_symbol: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, symbols) of the non-zero entries of the 1-D symbol array ``values``.

    ``values`` holds codebook indices (or any symbols) with ``zero_symbol`` meaning zero.
    """
    if not 1 <= bits <= 16:
        raise NetslimError(f"gap bits must be in 1..16, got {bits}")
    positions = np.flatnonzero(values != zero_symbol)
    span = 1 << bits
    diffs = np.diff(positions, prepend=-1) - 1  # zeros skipped before each non-zero
    fillers = diffs // span
    gaps_last = diffs % span
    counts = fillers + 1
    total = int(counts.sum())
    gaps = np.full(total, span - 1, dtype=np.int64)
    symbols = np.full(total, zero_symbol, dtype=np.int64)
    ends = np.cumsum(counts) - 1
    gaps[ends] = gaps_last
    symbols[ends] = values[positions]
    return gaps, symbols


def gap_positions(gaps: np.ndarray, is_filler: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """Flat positions (in traversal order) of the entries that are not fillers."""
    span = 1 << bits
    if gaps.size and (gaps.min() < 0 or gaps.max() >= span):
        raise NetslimError(f"gap out of range for {bits}-bit gaps")
    if np.any(is_filler & (gaps != span - 1)):
        raise NetslimError("a filler entry with a short gap")
    steps = np.where(is_filler, span, gaps + 1)
    positions = (np.cumsum(steps) - 1)[~is_filler]
    if positions.size and positions[-1] >= numel:
        raise NetslimError(f"sparse positions run past the tensor's {numel} elements")
    return positions


def decode_gaps(gaps: np.ndarray, symbols: np.ndarray, bits: int, numel: int, zero_symbol: int) -> np.ndarray:
    """Inverse of :func:`encode_gaps`: the full 1-D symbol array of length ``numel``."""
    if gaps.shape != symbols.shape:
        raise NetslimError("gap and value streams differ in length")
    is_filler = symbols == zero_symbol
    positions = gap_positions(gaps, is_filler, bits, numel)
    out = np.full(numel, zero_symbol, dtype=np.int64)
    out[positions] = symbols[~is_filler]
    return out


# ------------------------------------------------------------------ active rows and columns
def active_slices(nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols): boolean masks of the dim-0 and dim-1 slices of ``nonzero`` (a boolean array of at least
    2 dimensions) that hold a non-zero. A pruned layer's dead output and input units are the False ones."""
    m = nonzero.reshape(nonzero.shape[0], nonzero.shape[1], -1)
    return m.any(axis=(1, 2)), m.any(axis=(0, 2))


def take_active(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The sub-tensor ``values[rows][:, cols]`` (trailing dimensions kept), contiguous."""
    return np.ascontiguousarray(values[rows][:, cols])


def put_active(sub: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape, fill) -> np.ndarray:
    """Inverse of :func:`take_active`: an array of ``shape`` filled with ``fill`` and ``sub`` at the active
    rows and columns."""
    out = np.full((shape[0], shape[1], math.prod(shape[2:])), fill, dtype=sub.dtype)
    out[np.ix_(np.flatnonzero(rows), np.flatnonzero(cols))] = sub.reshape(int(rows.sum()), int(cols.sum()), -1)
    return out.reshape(shape)
