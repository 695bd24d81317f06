"""Entropy coding of integer symbol streams: canonical Huffman (Deep Compression, Han et al. 2016 §4,
through ``bitarray``'s C implementation) and asymmetric numeral systems (ANS, Duda 2013, through
``constriction``), choosing whichever is smaller, with the Shannon bound of each stream.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import NetslimError

CODERS = ("const", "huffman", "ans")


@dataclass
class CodedStream:
    """One coded stream: the coder, its table, and the payload bytes.

    ``table`` holds what the decoder needs besides the payload: for Huffman the canonical
    ``count`` (codes per length) and ``symbol`` lists, for ANS the present symbols and their
    counts, for ``const`` the single symbol.
    """

    coder: str
    n: int
    table: dict = field(default_factory=dict)
    payload: bytes = b""

    def table_bytes(self) -> int:
        """Bytes the table takes when stored: its compact JSON (the ``.nsz`` header holding it is
        zlib-compressed, so this is an upper bound)."""
        return len(json.dumps(self.table, separators=(",", ":")))

    @property
    def size_bytes(self) -> int:
        return len(self.payload) + self.table_bytes()


def shannon_bits(symbols: np.ndarray) -> float:
    """n · H(empirical distribution): the least number of bits any order-0 coder can reach."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def _huffman_encode(symbols: np.ndarray, uniques: np.ndarray, counts: np.ndarray) -> CodedStream:
    from bitarray import bitarray
    from bitarray.util import canonical_huffman

    freq = {int(s): int(c) for s, c in zip(uniques, counts)}
    codedict, count, order = canonical_huffman(freq)
    bits = bitarray(endian="big")
    bits.encode(codedict, symbols.tolist())
    return CodedStream("huffman", int(symbols.size), {"count": [int(c) for c in count],
                                                      "symbol": [int(s) for s in order]}, bits.tobytes())


def _huffman_decode(stream: CodedStream) -> np.ndarray:
    from bitarray import bitarray
    from bitarray.util import canonical_decode

    count, order = stream.table["count"], stream.table["symbol"]
    bits = bitarray(endian="big")
    bits.frombytes(stream.payload)
    # islice stops after n symbols: the padding bits of the last byte are never decoded
    try:
        out = np.fromiter(itertools.islice(canonical_decode(bits, count, order), stream.n), dtype=np.int64,
                          count=-1)
    except ValueError as exc:
        raise NetslimError(f"corrupt Huffman stream: {exc}") from None
    if out.size < stream.n:
        raise NetslimError(f"Huffman stream ends after {out.size} of {stream.n} symbols")
    return out


def _ans_model(counts: list[int]):
    import constriction  # a compiled module: submodules are attributes, not importable paths

    c = np.asarray(counts, dtype=np.float64)
    return constriction.stream.model.Categorical(c / c.sum(), perfect=False)


def _ans_encode(symbols: np.ndarray, uniques: np.ndarray, counts: np.ndarray) -> CodedStream:
    import constriction

    AnsCoder = constriction.stream.stack.AnsCoder
    dense = np.searchsorted(uniques, symbols).astype(np.int32)
    coder = AnsCoder()
    coder.encode_reverse(dense, _ans_model(counts.tolist()))
    payload = coder.get_compressed().astype("<u4").tobytes()
    return CodedStream("ans", int(symbols.size), {"symbol": [int(s) for s in uniques],
                                                  "counts": [int(c) for c in counts]}, payload)


def _ans_decode(stream: CodedStream) -> np.ndarray:
    import constriction

    AnsCoder = constriction.stream.stack.AnsCoder
    if len(stream.payload) % 4:
        raise NetslimError("corrupt ANS stream: payload is not a whole number of 32-bit words")
    words = np.frombuffer(stream.payload, dtype="<u4").astype(np.uint32)
    try:
        coder = AnsCoder(words)
        dense = coder.decode(_ans_model(stream.table["counts"]), stream.n)
        consumed = coder.is_empty()
    except Exception as exc:  # constriction raises on exhausted or invalid data
        raise NetslimError(f"corrupt ANS stream: {exc}") from None
    if not consumed:
        raise NetslimError("corrupt ANS stream: data left over after the last symbol")
    return np.asarray(stream.table["symbol"], dtype=np.int64)[np.asarray(dense, dtype=np.int64)]


def encode_stream(symbols: np.ndarray, coders: tuple[str, ...] = ("huffman", "ans")) -> CodedStream:
    """Code ``symbols`` (non-negative integers) with each coder in ``coders``; keep the smallest."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int64).ravel()
    uniques, counts = np.unique(symbols, return_counts=True)
    if uniques.size <= 1:
        return CodedStream("const", int(symbols.size), {"symbol": [int(uniques[0])] if uniques.size else [0]})
    candidates = []
    if "huffman" in coders:
        candidates.append(_huffman_encode(symbols, uniques, counts))
    if "ans" in coders:
        candidates.append(_ans_encode(symbols, uniques, counts))
    return min(candidates, key=lambda s: s.size_bytes)


def decode_stream(stream: CodedStream) -> np.ndarray:
    if stream.coder == "const":
        return np.full(stream.n, stream.table["symbol"][0], dtype=np.int64)
    if stream.coder == "huffman":
        return _huffman_decode(stream)
    if stream.coder == "ans":
        return _ans_decode(stream)
    raise NetslimError(f"unknown coder {stream.coder!r}; valid coders: {', '.join(CODERS)}")


def overhead_vs_bound(stream: CodedStream, symbols: np.ndarray) -> float:
    """Coded payload bits / Shannon bound - 1 (0.05 = within 5 %)."""
    bound = shannon_bits(symbols)
    if bound == 0:
        return 0.0 if not stream.payload else math.inf
    return 8 * len(stream.payload) / bound - 1
