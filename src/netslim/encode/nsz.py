"""The ``.nsz`` compressed model file (netslim sparse, shared, entropy-coded).

Layout, little-endian::

    b"NSZ1"                magic (every version)
    u32  header_length
    header                 UTF-8 JSON, zlib-compressed (version 2) or plain (version 1): format tag, version,
                           model architecture, one entry per tensor
    payload                the tensors' blobs (codebooks, coded streams, bitmaps, raw bytes), back to back
    u32  crc32             of every byte before it

A tensor entry holds ``name``, ``dtype``, ``shape``, ``encoding``, ``blobs`` and its encoding's fields. In
version 2 ``blobs`` lists the byte length of each of the tensor's blobs, which follow each other and the previous
tensor's (the lengths of all entries add up to the payload); in version 1 it lists ``[offset, length]`` pairs.

Tensor encodings (the smallest is chosen per tensor, ``raw`` the fallback; version 2 tries every one on every
float32 tensor, biases and small tensors included):

* ``raw``            the tensor's bytes.
* ``shared_dense``   a codebook (``codebook`` values) + an entropy-coded index per element (weight sharing).
* ``shared_sparse``  a codebook with exact zero (at index ``zero``) + relative-index gaps (``bits`` wide, filler
                     zeros, ``layout`` CSR or CSC order) and codebook indices of the non-zeros, both
                     entropy-coded (Deep Compression's storage, Han et al. 2016 §4).
* ``float_sparse``   gaps as above + the non-zero values raw (pruned but not shared; a filler stores 0.0).

Version 2 adds two optional fields:

* ``stored`` (``"float16"`` or ``"bfloat16"``, float32 tensors only): the float values of the entry's float
  blob (a ``raw`` tensor, a codebook, ``float_sparse`` values) take 2 bytes each, because every one of them
  round-trips exactly; they are widened back to the very same float32 bits. Absent: 4 bytes.
* ``active`` (any encoding but ``raw``, of a tensor of 2 or more dimensions):
  ``{"rows": R, "cols": C, "maps": [rows_map, cols_map]}``: bitmaps of the dim-0 slices (output units) and
  dim-1 slices (input units) that hold a non-zero, R and C of them; the gaps (``shared_dense``: the indices,
  with ``zero`` naming the codebook's 0.0 that fills the rest) then cover only the sub-tensor
  ``t[rows][:, cols]`` (R x C x the trailing dimensions). A map is the smallest of: packed bits
  (``{"coder": "bits", "n": N}``, most significant bit first, padding bits zero), the increasing positions of
  its set bits (``{"coder": "indices", "n": N}``, each ceil(log2 N) bits wide, packed the same way) or an
  entropy-coded stream of 0/1 symbols; the two map blobs follow the encoding's others.

A stream's coder table (Huffman code lengths and symbols, ANS counts) lives in its entry in the header.
Values are bit-exact, except that a zero's sign is not kept by the sparse and shared encodings (-0.0 loads
as 0.0, which compares equal).

Every field is bounds-checked on load; a truncated or bit-flipped file fails the CRC or a check with a
:class:`~netslim.errors.NetslimError`, never a crash or a silently wrong model. Claims are bounded by what the
file holds before anything is allocated: the header (zlib-decompressed to at most 16 MiB, so a decompression
bomb or a truncated stream is refused; a version-1 header is plain JSON and a later one compressed; nested at
most 64 deep, integers within 2**53, no NaN) and every field's type (a bool is not an integer) are checked
first; a tensor has at most 2**27 elements and a file claims at most 256 elements per byte of its size (4 M
for a small file, 2**28 in all); blob lengths add up to the payload exactly (version 2); ``stored`` names one
of its two types on a float32 tensor and the blob holds 2 bytes per value; an ``active`` map codes exactly as
many slices as the shape's dimension, R and C lie in 1..that dimension and equal the maps' counts of set bits,
and every active slice of the decoded sub-tensor holds a non-zero; a Huffman stream holds at most 8 symbols per
payload byte, an ANS stream's counts must add up to its length and its payload hold their entropy, and the
stream must be consumed exactly; a constant stream has no payload. With ``expected`` (:func:`netslim.load`
passes the rebuilt model's tensors) names and shapes are compared before any tensor is decoded.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import NetslimError
from ..io import InflateError, atomic_write, bounded_inflate, bounded_json
from .entropy import CODERS, CodedStream, decode_stream, encode_stream, shannon_bits
from .sparse_index import (LAYOUTS, active_slices, decode_gaps, encode_gaps, flatten_order, gap_positions,
                           put_active, take_active)

MAGIC = b"NSZ1"
VERSION = 2                     # what write_nsz writes
VERSIONS = (1, 2)               # what read_nsz reads
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
ENCODINGS = ("raw", "shared_dense", "shared_sparse", "float_sparse")
STORED = ("float16", "bfloat16")  # the 2-byte types a float32 blob may be stored at (version 2)
MAX_ELEMENTS = 1 << 27          # elements of one tensor
MAX_TOTAL_ELEMENTS = 1 << 28    # elements of all tensors of one file
ELEMENTS_PER_BYTE = 256
MIN_ELEMENTS = 1 << 22
MAX_HEADER = 1 << 24            # bytes of the (decompressed) JSON header
MAX_TENSORS = 1 << 16
MAX_CODEBOOK = 1 << 16
MAX_BLOBS = {1: 3, 2: 5}        # blobs of one tensor, per version
GAP_BITS = tuple(range(2, 9))
HEADER_COST = {1: 1.0, 2: 0.25}  # file bytes per byte of an entry's JSON: zlib leaves ~0.28 of a v2 header
_JSON = {"separators": (",", ":")}


@dataclass
class TensorReport:
    """What one tensor costs in the file, next to its entropy bounds.

    ``value_bits`` and ``index_bits`` are the payload bits of the value and gap streams (raw values for ``raw``
    and ``float_sparse``), each next to its Shannon bound (0: none); ``codebook_bits`` and ``structure_bits``
    (the active-row and -column bitmaps) are counted apart, so the coded streams can be held to their bounds.
    ``total_bytes`` adds the entry's header fields (coder tables), estimated at their compressed size.
    """

    name: str
    encoding: str
    numel: int
    nonzeros: int
    total_bytes: int
    value_bits: int = 0
    index_bits: int = 0
    value_bound_bits: float = 0.0
    index_bound_bits: float = 0.0
    value_coder: str = ""
    index_coder: str = ""
    detail: dict = field(default_factory=dict)
    codebook_bits: int = 0
    structure_bits: int = 0

    @property
    def bits_per_nonzero(self) -> float:
        return self.value_bits / max(self.nonzeros, 1)

    @property
    def bits_per_index(self) -> float:
        return self.index_bits / max(self.nonzeros, 1)

    def overhead(self) -> tuple[float | None, float | None]:
        """Coded bits / Shannon bound - 1 for the value and index streams (None: no such stream)."""
        v = self.value_bits / self.value_bound_bits - 1 if self.value_bound_bits else None
        i = self.index_bits / self.index_bound_bits - 1 if self.index_bound_bits else None
        return v, i


# ------------------------------------------------------------------ floats at their own precision
def _narrowest(values: np.ndarray) -> str | None:
    """The 2-byte type (of :data:`STORED`) every float32 value round-trips through bit-exactly, or None."""
    v = np.ascontiguousarray(values, dtype=np.float32).ravel()
    if not v.size:
        return None
    bits = v.view(np.uint32)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.array_equal(v.astype(np.float16).astype(np.float32).view(np.uint32), bits):
            return "float16"
    if not np.any(bits & 0xFFFF):
        return "bfloat16"
    return None


def _pack_floats(values: np.ndarray, stored: str | None) -> bytes:
    v = np.ascontiguousarray(values, dtype=np.float32).ravel()
    if stored == "float16":
        return v.astype("<f2").tobytes()
    if stored == "bfloat16":
        return (v.view(np.uint32) >> 16).astype("<u2").tobytes()
    return v.astype("<f4").tobytes()


def _unpack_floats(blob: bytes, stored: str | None) -> np.ndarray:
    if stored == "float16":
        return np.frombuffer(blob, dtype="<f2").astype(np.float32)
    if stored == "bfloat16":
        return (np.frombuffer(blob, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _stored_field(stored: str | None) -> dict:
    return {"stored": stored} if stored else {}


# ------------------------------------------------------------------ encoding one tensor
def _np_dtype_name(t: torch.Tensor) -> str:
    for name, dt in DTYPES.items():
        if t.dtype == dt:
            return name
    raise NetslimError(f"cannot store dtype {t.dtype}; storable dtypes: {', '.join(DTYPES)}")


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def _stream_entry(stream: CodedStream) -> dict:
    return {"coder": stream.coder, "n": stream.n, "table": stream.table}


@dataclass
class _Candidate:
    """One way to store a tensor: the entry's encoding fields, its blobs and its report."""

    fields: dict
    blobs: list[bytes]
    report: TensorReport

    def cost(self, version: int) -> float:
        return sum(map(len, self.blobs)) + HEADER_COST[version] * len(json.dumps(self.fields, **_JSON))


@dataclass
class _Region:
    """The active rows and columns, whose sub-tensor alone an encoding codes (None stands for the whole
    tensor), with the ``active`` header field and the two map blobs that describe them."""

    rows: np.ndarray
    cols: np.ndarray
    fields: dict
    blobs: list[bytes]

    def shape(self, shape) -> tuple[int, ...]:
        return (int(self.rows.sum()), int(self.cols.sum()), *shape[2:])

    def take(self, values: np.ndarray, shape) -> np.ndarray:
        return take_active(values.reshape(shape), self.rows, self.cols).ravel()


def _index_width(n: int) -> int:
    """Bits of one set bit's position in an ``indices`` map of ``n`` bits."""
    return max(1, (n - 1).bit_length())


def _encode_map(mask: np.ndarray, coders, version: int) -> tuple[dict, bytes]:
    """A bitmap as packed bits, as the positions of its set bits, or as an entropy-coded 0/1 stream, whichever
    costs least."""
    n = int(mask.size)
    width = _index_width(n)
    positions = np.flatnonzero(mask)
    indices = np.packbits(((positions[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)).tobytes()
    stream = encode_stream(mask.astype(np.int64), coders)
    options = [({"coder": "bits", "n": n}, np.packbits(mask).tobytes()), ({"coder": "indices", "n": n}, indices),
               (_stream_entry(stream), stream.payload)]
    return min(options, key=lambda c: len(c[1]) + HEADER_COST[version] * len(json.dumps(c[0], **_JSON)))


def _regions(nonzero: np.ndarray, shape, coders, version: int) -> list[_Region | None]:
    """The whole tensor and, in version 2 where some whole dim-0 or dim-1 slice is zero, its active part."""
    out: list[_Region | None] = [None]
    if version < 2 or len(shape) < 2 or not nonzero.any():
        return out
    rows, cols = active_slices(nonzero.reshape(shape))
    if rows.all() and cols.all():
        return out
    maps = [_encode_map(rows, coders, version), _encode_map(cols, coders, version)]
    out.append(_Region(rows, cols, {"rows": int(rows.sum()), "cols": int(cols.sum()), "maps": [m[0] for m in maps]},
                       [m[1] for m in maps]))
    return out


def _with_region(fields: dict, blobs: list[bytes], detail: dict, region: _Region | None, shape) -> int:
    """Add the region's field and map blobs to a candidate's; the maps' bits."""
    if region is None:
        return 0
    fields["active"] = region.fields
    blobs += region.blobs
    detail["active"] = list(region.shape(shape)[:2])
    return 8 * sum(map(len, region.blobs))


def _candidates_shared(flat: np.ndarray, shape: tuple[int, ...], coders, version: int) -> list[_Candidate]:
    """Encodings through a codebook of the tensor's distinct values."""
    codebook, symbols = np.unique(flat, return_inverse=True)
    symbols = symbols.astype(np.int64).ravel()
    stored = _narrowest(codebook) if version >= 2 else None
    cb_bytes = _pack_floats(codebook, stored)
    cb_fields = {"codebook": len(codebook), **_stored_field(stored)}
    nonzeros = int(np.count_nonzero(flat))
    zero = np.flatnonzero(codebook == 0)
    zero = int(zero[0]) if zero.size else None
    regions = [None] if zero is None else _regions(symbols != zero, shape, coders, version)
    out = []
    for region in regions:  # an index per element of the whole tensor, or of its active rows and columns
        seq = symbols if region is None else region.take(symbols, shape)
        values = encode_stream(seq, coders)
        fields = {"encoding": "shared_dense", **cb_fields, "streams": {"values": _stream_entry(values)}}
        blobs = [cb_bytes, values.payload]
        detail = _stored_field(stored)
        if region is not None:
            fields["zero"] = zero
        structure = _with_region(fields, blobs, detail, region, shape)
        rep = TensorReport("", "shared_dense", flat.size, nonzeros, 0, value_bits=8 * len(values.payload),
                           value_bound_bits=shannon_bits(seq), value_coder=values.coder,
                           codebook_bits=8 * len(cb_bytes), structure_bits=structure, detail=detail)
        out.append(_Candidate(fields, blobs, rep))
    if zero is not None:
        out += _candidates_sparse(symbols, zero, shape, coders, cb_bytes, cb_fields, regions)
    return out


def _best_gap_coding(symbols: np.ndarray, zero: int, shape, value_bytes) -> tuple[str, int, np.ndarray, np.ndarray]:
    """The (layout, gap bits) whose streams have the smallest entropy bound, and those streams.

    ``value_bytes(vals)`` estimates the value stream's bytes. Estimating by the Shannon bound and
    entropy-coding only the winner keeps encoding fast on large layers.
    """
    best = None
    for layout in LAYOUTS if len(shape) >= 2 else ("csr",):
        order = flatten_order(shape, layout)
        seq = symbols if order is None else symbols[order]
        for bits in GAP_BITS:
            gaps, vals = encode_gaps(seq, bits, zero)
            estimate = shannon_bits(gaps) / 8 + value_bytes(vals) + 4 * bits  # small tables
            if best is None or estimate < best[0]:
                best = (estimate, layout, bits, gaps, vals)
    return best[1], best[2], best[3], best[4]


def _candidates_sparse(symbols: np.ndarray, zero: int, shape, coders, cb_bytes: bytes, cb_fields: dict,
                       regions: list[_Region | None]) -> list[_Candidate]:
    nonzeros = int(np.count_nonzero(symbols != zero))
    out = []
    for region in regions:
        seq, sub_shape = (symbols, shape) if region is None else (region.take(symbols, shape), region.shape(shape))
        layout, bits, gaps, vals = _best_gap_coding(seq, zero, sub_shape, lambda v: shannon_bits(v) / 8)
        g = encode_stream(gaps, coders)
        v = encode_stream(vals, coders)
        fields = {"encoding": "shared_sparse", **cb_fields, "zero": zero, "bits": bits, "layout": layout,
                  "streams": {"gaps": _stream_entry(g), "values": _stream_entry(v)}}
        blobs = [cb_bytes, g.payload, v.payload]
        detail = {"bits": bits, "layout": layout, "fillers": int(len(gaps) - nonzeros),
                  **_stored_field(cb_fields.get("stored"))}
        structure = _with_region(fields, blobs, detail, region, shape)
        rep = TensorReport("", "shared_sparse", symbols.size, nonzeros, 0, value_bits=8 * len(v.payload),
                           index_bits=8 * len(g.payload), value_bound_bits=shannon_bits(vals),
                           index_bound_bits=shannon_bits(gaps), value_coder=v.coder, index_coder=g.coder,
                           detail=detail, codebook_bits=8 * len(cb_bytes), structure_bits=structure)
        out.append(_Candidate(fields, blobs, rep))
    return out


def _candidates_float_sparse(flat: np.ndarray, shape, coders, version: int) -> list[_Candidate]:
    """Pruned but not shared: gaps entropy-coded, values raw (a filler stores 0.0)."""
    nonzero = flat != 0
    nonzeros = int(np.count_nonzero(nonzero))
    stored = _narrowest(flat[nonzero]) if version >= 2 else None
    itemsize = 2 if stored else 4
    out = []
    for region in _regions(nonzero, shape, coders, version):
        sub, sub_shape = (flat, shape) if region is None else (region.take(flat, shape), region.shape(shape))
        marker = (sub != 0).astype(np.int64)
        layout, bits, gaps, kept = _best_gap_coding(marker, 0, sub_shape, lambda v: itemsize * v.size)
        order = flatten_order(sub_shape, layout)
        seq = sub if order is None else sub[order]
        g = encode_stream(gaps, coders)
        values = np.zeros(gaps.size, dtype=np.float32)
        values[kept != 0] = seq[seq != 0]
        raw = _pack_floats(values, stored)
        fields = {"encoding": "float_sparse", **_stored_field(stored), "bits": bits, "layout": layout,
                  "streams": {"gaps": _stream_entry(g)}}
        blobs = [g.payload, raw]
        detail = {"bits": bits, "layout": layout, "fillers": int(gaps.size - nonzeros), **_stored_field(stored)}
        structure = _with_region(fields, blobs, detail, region, shape)
        rep = TensorReport("", "float_sparse", flat.size, nonzeros, 0, value_bits=8 * len(raw),
                           index_bits=8 * len(g.payload), index_bound_bits=shannon_bits(gaps),
                           index_coder=g.coder, detail=detail, structure_bits=structure)
        out.append(_Candidate(fields, blobs, rep))
    return out


def encode_tensor(name: str, t: torch.Tensor, coders=("huffman", "ans"),
                  version: int = VERSION) -> tuple[dict, list[bytes], TensorReport]:
    """The smallest encoding of one tensor: (header entry without blob lengths, blobs, report).

    Version 2 tries every encoding on every float32 tensor; version 1 (kept to write files for older readers)
    only on those of 2 or more dimensions and 64 or more elements, with 4-byte floats and no active regions.
    """
    dtype = _np_dtype_name(t)
    shape = tuple(int(s) for s in t.shape)
    nonzeros = int(torch.count_nonzero(t))
    is_f32 = t.dtype == torch.float32
    flat = t.detach().cpu().contiguous().numpy().ravel() if is_f32 else None
    stored = _narrowest(flat) if is_f32 and version >= 2 else None
    raw = _pack_floats(flat, stored) if stored else _raw_bytes(t)
    candidates = [_Candidate({"encoding": "raw", **_stored_field(stored)}, [raw],
                             TensorReport(name, "raw", t.numel(), nonzeros, 0, value_bits=8 * len(raw),
                                          detail=_stored_field(stored)))]
    if is_f32 and t.numel() and (version >= 2 or (t.dim() >= 2 and t.numel() >= 64)):
        flat = flat.copy()
        flat[flat == 0] = 0.0  # -0.0 from masks becomes +0.0
        if np.unique(flat).size <= MAX_CODEBOOK and not np.isnan(flat).any():
            candidates += _candidates_shared(flat, shape, coders, version)
        if np.count_nonzero(flat) < 0.6 * flat.size:
            candidates += _candidates_float_sparse(flat, shape, coders, version)
    best = min(candidates, key=lambda c: c.cost(version))  # the first (raw) wins a tie
    best.report.name = name
    best.report.total_bytes = round(best.cost(version))
    entry = {"name": name, "dtype": dtype, "shape": list(shape), **best.fields}
    return entry, best.blobs, best.report


# ------------------------------------------------------------------ file writing
def write_nsz(tensors: dict[str, torch.Tensor], path: str | Path, arch: dict | None = None,
              coders: tuple[str, ...] = ("huffman", "ans"), version: int = VERSION) -> list[TensorReport]:
    """Encode ``tensors`` into ``path`` atomically; return one report per tensor. ``version=1`` writes the
    first format (plain JSON header, 4-byte floats), which netslim releases before version 2 read."""
    for c in coders:
        if c not in CODERS:
            raise NetslimError(f"unknown coder {c!r}; valid coders: huffman, ans")
    if version not in VERSIONS:
        raise NetslimError(f"unknown .nsz version {version!r}; valid versions: {', '.join(map(str, VERSIONS))}")
    chunks: list[bytes] = []
    offset = 0
    entries, reports = [], []
    for name, t in tensors.items():
        entry, blobs, report = encode_tensor(name, t, coders, version)
        if version == 1:
            entry["blobs"] = []
            for b in blobs:
                entry["blobs"].append([offset, len(b)])
                offset += len(b)
        else:
            entry["blobs"] = [len(b) for b in blobs]
        chunks += blobs
        entries.append(entry)
        reports.append(report)
    header = json.dumps({"format": "netslim-nsz", "version": version, "arch": arch, "tensors": entries},
                        **_JSON).encode()
    if version >= 2:
        header = zlib.compress(header, 9)
    body = MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)
    data = body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
    atomic_write(path, lambda f: f.write(data))
    return reports


# ------------------------------------------------------------------ file reading
def _check(cond: bool, path, what: str) -> None:
    if not cond:
        raise NetslimError(f"{path}: corrupt .nsz file ({what})")


def _int(v, path, what, lo=0, hi=MAX_ELEMENTS) -> int:
    _check(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, path, f"{what} = {v!r} out of range")
    return v


def _read_stream(entry: dict, blob: bytes, path, what: str, alphabet: int, max_n: int) -> np.ndarray:
    """Decode one stream after bounding its claimed length by ``max_n`` and by what its payload can hold."""
    _check(isinstance(entry, dict) and set(entry) == {"coder", "n", "table"} and entry.get("coder") in CODERS,
           path, f"{what}: unknown coder or fields")
    n = _int(entry.get("n"), path, f"{what}.n", 0, max_n)
    table = entry.get("table")
    _check(isinstance(table, dict), path, f"{what}: table")
    for key, values in table.items():
        _check(key in ("count", "symbol", "counts") and isinstance(values, list) and len(values) <= MAX_CODEBOOK + 64
               and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOTAL_ELEMENTS
                       for v in values), path, f"{what}: table {key}")
    symbols = table.get("symbol", [])
    _check(all(s < alphabet for s in symbols), path, f"{what}: symbol outside the alphabet")
    coder = entry["coder"]
    if coder == "ans":
        counts = table.get("counts", [])
        _check(set(table) == {"symbol", "counts"} and len(counts) == len(symbols) and len(symbols) >= 2,
               path, f"{what}: ANS table")
        _check(all(c > 0 for c in counts) and sum(counts) == n, path, f"{what}: ANS counts do not add up to n")
        # the payload must hold at least the stream's entropy (less 2 words of coder state)
        c = np.asarray(counts, dtype=np.float64)
        bound = float(-(c * np.log2(c / c.sum())).sum())
        _check(bound <= 8 * len(blob) + 64, path, f"{what}: {n} symbols claimed from {len(blob)} payload bytes")
    if coder == "huffman":
        count = table.get("count", [])
        _check(set(table) == {"count", "symbol"} and 0 < len(count) <= 64 and sum(count) == len(symbols)
               and count[0] == 0 and len(set(symbols)) == len(symbols), path, f"{what}: Huffman table")
        # every code is at least one bit long
        _check(n <= 8 * len(blob), path, f"{what}: {n} symbols claimed from {len(blob)} payload bytes")
    if coder == "const":
        _check(set(table) == {"symbol"} and len(symbols) == 1 and not blob, path, f"{what}: constant stream")
    try:
        out = decode_stream(CodedStream(coder, n, table, blob))
    except ValueError as exc:
        raise NetslimError(f"{path}: corrupt .nsz file ({what}: {exc})") from None
    _check(out.size == n and (n == 0 or (out.min() >= 0 and out.max() < alphabet)), path, f"{what}: decoded symbols")
    return out


def _read_map(entry, blob: bytes, path, what: str, n: int, ones: int) -> np.ndarray:
    """An ``active`` bitmap of exactly ``n`` bits, ``ones`` of them set."""
    coder = entry.get("coder") if isinstance(entry, dict) else None
    if coder in ("bits", "indices"):
        _check(set(entry) == {"coder", "n"}, path, f"{what}: fields")
        _int(entry.get("n"), path, f"{what}.n", n, n)
        size = n if coder == "bits" else ones * _index_width(n)
        _check(len(blob) == (size + 7) // 8, path, f"{what}: {len(blob)} bytes for {size} bits")
        bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))
        _check(not bits[size:].any(), path, f"{what}: padding bits set")
        if coder == "bits":
            mask = bits[:n].astype(bool)
        else:  # the set bits' positions, each in _index_width(n) bits, increasing
            width = _index_width(n)
            positions = bits[:size].reshape(ones, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))
            _check(bool(np.all(np.diff(positions) > 0)) and (ones == 0 or positions[-1] < n), path,
                   f"{what}: positions not increasing within {n}")
            mask = np.zeros(n, dtype=bool)
            mask[positions] = True
    else:
        _check(isinstance(entry, dict) and entry.get("n") == n, path, f"{what}: {n} bits needed")
        mask = _read_stream(entry, blob, path, what, 2, n).astype(bool)
    _check(int(mask.sum()) == ones, path, f"{what}: {int(mask.sum())} bits set, {ones} claimed")
    return mask


_ENTRY_KEYS = {1: {"name", "dtype", "shape", "encoding", "blobs", "codebook", "streams", "zero", "bits", "layout"}}
_ENTRY_KEYS[2] = _ENTRY_KEYS[1] | {"stored", "active"}


def _blob_spans(entries: list, version: int, size: int, path) -> list[list[tuple[int, int]]]:
    """Each entry's blobs as (offset, length) in a payload of ``size`` bytes, every one checked."""
    out, offset = [], 0
    for e in entries:
        name = str(e.get("name"))[:80]
        spans = e.get("blobs")
        _check(isinstance(spans, list) and len(spans) <= MAX_BLOBS[version], path, f"{name}: blobs")
        mine = []
        for span in spans:
            if version == 1:
                _check(isinstance(span, list) and len(span) == 2, path, f"{name}: blobs")
                off = _int(span[0], path, f"{name}: blob offset", 0, size)
                mine.append((off, _int(span[1], path, f"{name}: blob length", 0, size - off)))
            else:
                mine.append((offset, _int(span, path, f"{name}: blob length", 0, size - offset)))
                offset += span
        out.append(mine)
    if version >= 2:
        _check(offset == size, path, f"blob lengths add up to {offset:,} bytes, the payload holds {size:,}")
    return out


def _decode_tensor(entry: dict, blobs: list[bytes], path, expected: dict | None = None,
                   version: int = VERSION) -> tuple[str, torch.Tensor]:
    _check(isinstance(entry, dict) and set(entry) <= _ENTRY_KEYS[version], path, "tensor entry")
    name = entry.get("name")
    _check(isinstance(name, str) and 0 < len(name) < 1024, path, "tensor name")
    dtype = entry.get("dtype")
    _check(isinstance(dtype, str) and dtype in DTYPES, path, f"{name}: dtype {str(dtype)[:40]!r}")
    shape = entry.get("shape")
    _check(isinstance(shape, list) and len(shape) <= 8, path, f"{name}: shape")
    shape = [_int(s, path, f"{name}: shape") for s in shape]
    numel = math.prod(shape)
    _check(numel <= MAX_ELEMENTS, path, f"{name}: {numel} elements (at most {MAX_ELEMENTS})")
    if expected is not None:
        _check(name in expected, path, f"{name}: the model has no tensor of that name")
        _check(list(expected[name]) == shape, path, f"{name}: shape {shape} (the model's is {list(expected[name])})")
    encoding = entry.get("encoding")
    _check(isinstance(encoding, str) and encoding in ENCODINGS, path, f"{name}: encoding {str(encoding)[:40]!r}")
    stored = entry.get("stored")
    if "stored" in entry:
        _check(isinstance(stored, str) and stored in STORED and dtype == "float32", path,
               f"{name}: stored {str(stored)[:40]!r} (float32 tensors may be stored as {' or '.join(STORED)})")
    itemsize = 2 if stored else 4  # of a float32 blob
    torch_dtype = DTYPES[dtype]

    if encoding == "raw":
        _check("active" not in entry, path, f"{name}: active on a raw tensor")
        _check(len(blobs) == 1, path, f"{name}: blobs")
        if stored:
            _check(len(blobs[0]) == numel * itemsize, path, f"{name}: raw size")
            return name, torch.from_numpy(_unpack_floats(blobs[0], stored).copy()).reshape(shape)
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        _check(len(blobs[0]) == numel * itemsize, path, f"{name}: raw size")
        if torch_dtype == torch.bfloat16:
            arr = np.frombuffer(blobs[0], dtype="<i2").copy()
            return name, torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
        np_dtype = torch.empty((), dtype=torch_dtype).numpy().dtype.newbyteorder("<")
        arr = np.frombuffer(blobs[0], dtype=np_dtype).astype(np_dtype.newbyteorder("="))
        return name, torch.from_numpy(arr.copy()).reshape(shape)

    _check(dtype == "float32", path, f"{name}: {encoding} needs float32")
    streams = entry.get("streams")
    _check(isinstance(streams, dict) and len(blobs) >= 1, path, f"{name}: streams")
    if encoding != "shared_dense":
        _check(entry.get("layout") in LAYOUTS, path, f"{name}: layout")
    # the active rows and columns: the gaps walk only that sub-tensor
    rows = cols = None
    sub_shape, sub_numel, n_maps = shape, numel, 0
    if "active" in entry:
        active = entry["active"]
        _check(encoding != "raw" and len(shape) >= 2 and isinstance(active, dict)
               and set(active) == {"rows", "cols", "maps"} and isinstance(active.get("maps"), list)
               and len(active["maps"]) == 2, path, f"{name}: active")
        n_rows = _int(active["rows"], path, f"{name}: active rows", 1, shape[0])
        n_cols = _int(active["cols"], path, f"{name}: active cols", 1, shape[1])
        n_maps = 2
        _check(len(blobs) >= n_maps, path, f"{name}: blobs")
        rows = _read_map(active["maps"][0], blobs[-2], path, f"{name}.active rows", shape[0], n_rows)
        cols = _read_map(active["maps"][1], blobs[-1], path, f"{name}.active cols", shape[1], n_cols)
        sub_shape = [n_rows, n_cols, *shape[2:]]
        sub_numel = math.prod(sub_shape)
        blobs = blobs[:-2]

    def place(sub: np.ndarray, zero) -> np.ndarray:
        """The full tensor from the walked (sub-)tensor, every active slice checked to hold a non-zero."""
        if rows is None:
            return sub.reshape(shape)
        r, c = active_slices(sub.reshape(sub_shape) != zero)
        _check(r.all() and c.all(), path, f"{name}: an active row or column holds only zeros")
        return put_active(sub.reshape(sub_shape), rows, cols, shape, zero)

    if encoding in ("shared_dense", "shared_sparse"):
        k = _int(entry.get("codebook"), path, f"{name}: codebook size", 1, MAX_CODEBOOK)
        _check(len(blobs[0]) == itemsize * k, path, f"{name}: codebook bytes")
        codebook = _unpack_floats(blobs[0], stored)
        zero = None
        if encoding == "shared_sparse" or rows is not None:  # the index of 0.0, outside the active slices too
            zero = _int(entry.get("zero"), path, f"{name}: zero index", 0, k - 1)
            _check(codebook[zero] == 0, path, f"{name}: zero index does not hold zero")
        if encoding == "shared_dense":
            _check(len(blobs) == 2, path, f"{name}: blobs")
            symbols = _read_stream(streams.get("values"), blobs[1], path, f"{name}.values", k, sub_numel)
            _check(symbols.size == sub_numel, path, f"{name}: index count")
            return name, torch.from_numpy(codebook[place(symbols, zero)].reshape(shape).copy())
        _check(len(blobs) == 3, path, f"{name}: blobs")
        bits = _int(entry.get("bits"), path, f"{name}: gap bits", 1, 16)
        layout = entry.get("layout")
        _check(layout in LAYOUTS, path, f"{name}: layout")
        longest = sub_numel + (sub_numel >> bits) + 1  # every non-zero and every filler
        gaps = _read_stream(streams.get("gaps"), blobs[1], path, f"{name}.gaps", 1 << bits, longest)
        vals = _read_stream(streams.get("values"), blobs[2], path, f"{name}.values", k, longest)
        try:
            seq = decode_gaps(gaps, vals, bits, sub_numel, zero)
        except ValueError as exc:
            raise NetslimError(f"{path}: corrupt .nsz file ({name}: {exc})") from None
        flat = place(_unorder(seq, sub_shape, layout), zero)
        return name, torch.from_numpy(codebook[flat].reshape(shape).copy())

    # float_sparse: values of every entry raw, a filler holds 0.0
    _check(len(blobs) == 2, path, f"{name}: blobs")
    bits = _int(entry.get("bits"), path, f"{name}: gap bits", 1, 16)
    layout = entry.get("layout")
    _check(layout in LAYOUTS, path, f"{name}: layout")
    longest = min(sub_numel + (sub_numel >> bits) + 1, len(blobs[1]) // itemsize)  # one raw value per entry
    gaps = _read_stream(streams.get("gaps"), blobs[0], path, f"{name}.gaps", 1 << bits, longest)
    _check(len(blobs[1]) == itemsize * gaps.size, path, f"{name}: value bytes")
    values = _unpack_floats(blobs[1], stored)
    try:
        positions = gap_positions(gaps, values == 0, bits, sub_numel)
    except ValueError as exc:
        raise NetslimError(f"{path}: corrupt .nsz file ({name}: {exc})") from None
    seq = np.zeros(sub_numel, dtype=np.float32)
    seq[positions] = values[values != 0]
    return name, torch.from_numpy(place(_unorder(seq, sub_shape, layout), 0).reshape(shape).copy())


def _inverse_permute(seq: np.ndarray, order: np.ndarray) -> np.ndarray:
    flat = np.empty_like(seq)
    flat[order] = seq
    return flat


def _unorder(seq: np.ndarray, shape, layout: str) -> np.ndarray:
    order = flatten_order(tuple(shape), layout)
    return seq if order is None else _inverse_permute(seq, order)


def _inflate(data: bytes, path) -> bytes:
    """A version-2 header: zlib data decompressed to at most :data:`MAX_HEADER` bytes, consumed exactly."""
    try:
        return bounded_inflate(data, MAX_HEADER)
    except InflateError as exc:  # a version-1 header starts with "{": what is not zlib is neither
        reason = {"not zlib": "header is neither JSON nor zlib data",
                  "too large": f"header inflates to more than {MAX_HEADER:,} bytes",
                  "truncated": "header: truncated or trailing zlib data"}[exc.reason]
        raise NetslimError(f"{path}: corrupt .nsz file ({reason})") from None


def read_nsz_header(path: str | Path) -> tuple[dict, bytes]:
    """(the checked JSON header, the payload) of an ``.nsz`` file; no tensor is decoded."""
    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"compressed model not found: {path}")
    data = path.read_bytes()
    _check(len(data) >= 12, path, "truncated: shorter than the fixed fields")
    if data[:4] != MAGIC:
        raise NetslimError(f"{path} is not a netslim .nsz file (bad magic)")
    (crc,) = struct.unpack("<I", data[-4:])
    _check(zlib.crc32(data[:-4]) & 0xFFFFFFFF == crc, path, "checksum mismatch: truncated or altered")
    (hlen,) = struct.unpack("<I", data[4:8])
    _check(8 + hlen <= len(data) - 4 and hlen <= MAX_HEADER, path, "header length")
    text = data[8:8 + hlen]
    compressed = not text.startswith(b"{")  # a JSON object starts with "{", a zlib stream never does
    if compressed:
        text = _inflate(text, path)
    header = bounded_json(text, str(path), ".nsz header")
    _check(isinstance(header, dict) and header.get("format") == "netslim-nsz", path, "format tag")
    _check(set(header) == {"format", "version", "arch", "tensors"}, path, "header fields")
    version = header.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version in VERSIONS):
        raise NetslimError(f"{path}: .nsz version {str(version)[:40]!r} not supported "
                           f"(this netslim reads {', '.join(map(str, VERSIONS))})")
    _check(compressed == (version >= 2), path,
           f"a version-{version} header is {'zlib-compressed' if version >= 2 else 'plain'} JSON")
    entries = header.get("tensors")
    _check(isinstance(entries, list) and len(entries) <= MAX_TENSORS, path, "tensor list")
    arch = header.get("arch")
    _check(arch is None or isinstance(arch, dict), path, "arch")
    total = 0
    names = set()
    for e in entries:
        _check(isinstance(e, dict), path, "tensor entry")
        shape = e.get("shape")
        _check(isinstance(shape, list) and len(shape) <= 8 and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_ELEMENTS for s in shape),
            path, f"{str(e.get('name'))[:80]}: shape")
        total += math.prod(shape)
        names.add(e.get("name") if isinstance(e.get("name"), str) else None)
    _check(len(names) == len(entries) and None not in names, path, "tensor names (missing or repeated)")
    # a stream may code many elements in few bytes (a constant one in none), but a file claims at most
    # ELEMENTS_PER_BYTE elements per byte of its size (MIN_ELEMENTS for a small file), MAX_TOTAL_ELEMENTS in all
    limit = min(MAX_TOTAL_ELEMENTS, max(MIN_ELEMENTS, ELEMENTS_PER_BYTE * len(data)))
    _check(total <= limit, path, f"{total:,} elements claimed by a file of {len(data):,} bytes (at most {limit:,})")
    return header, data[8 + hlen:-4]


def header_shapes(header: dict) -> dict[str, list[int]]:
    """Tensor name -> shape, from a header :func:`read_nsz_header` checked."""
    return {e["name"]: e["shape"] for e in header["tensors"]}


def read_nsz(path: str | Path, expected: dict[str, tuple[int, ...]] | None = None,
             header: tuple[dict, bytes] | None = None) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(architecture, tensors) of an ``.nsz`` file, every field checked. With ``expected`` (name -> shape of
    the model the tensors go into), names and shapes are compared before any tensor is decoded."""
    header, payload = header if header is not None else read_nsz_header(path)
    path = Path(path)
    entries = header["tensors"]
    version = header["version"]
    if expected is not None:
        missing = sorted(set(expected) - {e["name"] for e in entries})
        _check(not missing, path, f"tensors missing: {', '.join(missing[:5])}")
    spans = _blob_spans(entries, version, len(payload), path)
    tensors = dict(_decode_tensor(e, [payload[o:o + n] for o, n in s], path, expected, version)
                   for e, s in zip(entries, spans))
    return header.get("arch"), tensors
