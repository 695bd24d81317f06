"""The ``.nsz`` compressed model file (netslim sparse, shared, entropy-coded).

Layout, little-endian::

    b"NSZ1"                magic
    u32  header_length
    header                 UTF-8 JSON: format version, model architecture, one entry per tensor
    payload                the tensors' blobs (codebooks, coded streams, raw bytes), back to back
    u32  crc32             of every byte before it

Tensor encodings (the smallest is chosen per tensor):

* ``raw``            the tensor's bytes at its own dtype.
* ``shared_dense``   a codebook (fp32) + an entropy-coded index per element (weight sharing).
* ``shared_sparse``  a codebook with exact zero + relative-index gaps (``bits`` wide, filler
                     zeros, CSR or CSC order) and codebook indices of the non-zeros, both
                     entropy-coded (Deep Compression's storage, Han et al. 2016 §4).
* ``float_sparse``   gaps as above + the non-zero values raw (pruned but not shared).

Every field is bounds-checked on load; a truncated or bit-flipped file fails the CRC or a
check with a :class:`~netslim.errors.NetslimError`, never a crash or a silently wrong model. Claims
are bounded by what the file holds before anything is allocated: the header (at most 16 MiB of JSON,
nested at most 64 deep, integers within 2**53, no NaN) and every field's type (a bool is not an
integer) are checked first; a tensor has at most 2**27 elements and a file claims at most 256
elements per byte of its size (4 M for a small file, 2**28 in all); a Huffman stream at most 8
symbols per payload byte, an ANS stream's counts must add up to its length and its payload hold
their entropy, and the stream must be consumed exactly; a constant stream has no payload. With
``expected`` (:func:`netslim.load` passes the rebuilt model's tensors) names and shapes are compared
before any tensor is decoded.
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
from ..io import atomic_write, bounded_json
from .entropy import CODERS, CodedStream, decode_stream, encode_stream, shannon_bits
from .sparse_index import LAYOUTS, decode_gaps, encode_gaps, flatten_order, gap_positions

MAGIC = b"NSZ1"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
ENCODINGS = ("raw", "shared_dense", "shared_sparse", "float_sparse")
MAX_ELEMENTS = 1 << 27          # elements of one tensor
MAX_TOTAL_ELEMENTS = 1 << 28    # elements of all tensors of one file
ELEMENTS_PER_BYTE = 256
MIN_ELEMENTS = 1 << 22
MAX_HEADER = 1 << 24            # bytes of the JSON header
MAX_TENSORS = 1 << 16
MAX_CODEBOOK = 1 << 16
GAP_BITS = tuple(range(2, 9))


@dataclass
class TensorReport:
    """What one tensor costs in the file, next to its entropy bounds."""

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


class _Writer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0

    def add(self, data: bytes) -> list[int]:
        self.chunks.append(data)
        span = [self.offset, len(data)]
        self.offset += len(data)
        return span


def _candidates_shared(flat: np.ndarray, shape: tuple[int, ...], coders) -> list[tuple[int, dict, list[bytes], TensorReport]]:
    """Encodings through a codebook of the tensor's distinct values."""
    codebook, symbols = np.unique(flat, return_inverse=True)
    symbols = symbols.astype(np.int64)
    cb_bytes = codebook.astype("<f4").tobytes()
    out = []
    values = encode_stream(symbols, coders)
    entry = {"encoding": "shared_dense", "codebook": len(codebook), "streams": {"values": _stream_entry(values)}}
    size = len(cb_bytes) + values.size_bytes
    rep = TensorReport("", "shared_dense", flat.size, int(np.count_nonzero(flat)), size,
                       value_bits=8 * len(values.payload), value_bound_bits=shannon_bits(symbols),
                       value_coder=values.coder)
    out.append((size, entry, [cb_bytes, values.payload], rep))
    zero = np.flatnonzero(codebook == 0)
    if zero.size:
        out += _candidates_sparse(symbols, int(zero[0]), shape, coders, cb_bytes, len(codebook))
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


def _candidates_sparse(symbols: np.ndarray, zero: int, shape, coders, cb_bytes: bytes, k: int):
    nonzeros = int(np.count_nonzero(symbols != zero))
    layout, bits, gaps, vals = _best_gap_coding(symbols, zero, shape, lambda v: shannon_bits(v) / 8)
    g = encode_stream(gaps, coders)
    v = encode_stream(vals, coders)
    size = len(cb_bytes) + g.size_bytes + v.size_bytes
    entry = {"encoding": "shared_sparse", "codebook": k, "zero": zero, "bits": bits, "layout": layout,
             "streams": {"gaps": _stream_entry(g), "values": _stream_entry(v)}}
    rep = TensorReport("", "shared_sparse", symbols.size, nonzeros, size, value_bits=8 * len(v.payload),
                       index_bits=8 * len(g.payload), value_bound_bits=shannon_bits(vals),
                       index_bound_bits=shannon_bits(gaps), value_coder=v.coder, index_coder=g.coder,
                       detail={"bits": bits, "layout": layout, "fillers": int(len(gaps) - nonzeros)})
    return [(size, entry, [cb_bytes, g.payload, v.payload], rep)]


def _candidates_float_sparse(flat: np.ndarray, shape, coders):
    """Pruned but not shared: gaps entropy-coded, values raw fp32 (a filler stores 0.0)."""
    nonzeros = int(np.count_nonzero(flat))
    marker = (flat != 0).astype(np.int64)
    layout, bits, gaps, kept = _best_gap_coding(marker, 0, shape, lambda v: 4 * v.size)
    order = flatten_order(shape, layout)
    seq = flat if order is None else flat[order]
    g = encode_stream(gaps, coders)
    values = np.zeros(gaps.size, dtype="<f4")
    values[kept != 0] = seq[seq != 0]
    raw = values.tobytes()
    size = g.size_bytes + len(raw)
    entry = {"encoding": "float_sparse", "bits": bits, "layout": layout, "streams": {"gaps": _stream_entry(g)}}
    rep = TensorReport("", "float_sparse", flat.size, nonzeros, size, value_bits=8 * len(raw),
                       index_bits=8 * len(g.payload), index_bound_bits=shannon_bits(gaps),
                       index_coder=g.coder, detail={"bits": bits, "layout": layout,
                                                    "fillers": int(gaps.size - nonzeros)})
    return [(size, entry, [g.payload, raw], rep)]


def encode_tensor(name: str, t: torch.Tensor, coders=("huffman", "ans")) -> tuple[dict, list[bytes], TensorReport]:
    """The smallest encoding of one tensor: (header entry without offsets, blobs, report)."""
    dtype = _np_dtype_name(t)
    shape = tuple(int(s) for s in t.shape)
    raw = _raw_bytes(t)
    best = (len(raw), {"encoding": "raw"}, [raw], TensorReport(name, "raw", t.numel(),
                                                               int(torch.count_nonzero(t)), len(raw)))
    if t.dtype == torch.float32 and t.dim() >= 2 and t.numel() >= 64:
        flat = t.detach().cpu().contiguous().numpy().ravel().copy()
        flat[flat == 0] = 0.0  # -0.0 from masks becomes +0.0
        candidates = []
        if np.unique(flat).size <= MAX_CODEBOOK:
            candidates += _candidates_shared(flat, shape, coders)
        if np.count_nonzero(flat) < 0.6 * flat.size:
            candidates += _candidates_float_sparse(flat, shape, coders)
        for cand in candidates:
            if cand[0] < best[0]:
                best = cand
    size, entry, blobs, report = best
    report.name = name
    entry = {"name": name, "dtype": dtype, "shape": list(shape), **entry}
    return entry, blobs, report


# ------------------------------------------------------------------ file writing
def write_nsz(tensors: dict[str, torch.Tensor], path: str | Path, arch: dict | None = None,
              coders: tuple[str, ...] = ("huffman", "ans")) -> list[TensorReport]:
    """Encode ``tensors`` into ``path`` atomically; return one report per tensor."""
    for c in coders:
        if c not in CODERS:
            raise NetslimError(f"unknown coder {c!r}; valid coders: huffman, ans")
    writer = _Writer()
    entries, reports = [], []
    for name, t in tensors.items():
        entry, blobs, report = encode_tensor(name, t, coders)
        entry["blobs"] = [writer.add(b) for b in blobs]
        entries.append(entry)
        reports.append(report)
    header = json.dumps({"format": "netslim-nsz", "version": VERSION, "arch": arch, "tensors": entries},
                        separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(header)) + header + b"".join(writer.chunks)
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


_ENTRY_KEYS = {"name", "dtype", "shape", "encoding", "blobs", "codebook", "streams", "zero", "bits", "layout"}


def _decode_tensor(entry: dict, payload: bytes, path, expected: dict | None = None) -> tuple[str, torch.Tensor]:
    _check(isinstance(entry, dict) and set(entry) <= _ENTRY_KEYS, path, "tensor entry")
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
    spans = entry.get("blobs")
    _check(isinstance(spans, list) and len(spans) <= 3 and all(isinstance(s, list) and len(s) == 2 for s in spans),
           path, f"{name}: blobs")
    blobs = []
    for off, length in spans:
        _int(off, path, f"{name}: blob offset", 0, len(payload))
        _int(length, path, f"{name}: blob length", 0, len(payload) - off)
        blobs.append(payload[off:off + length])
    torch_dtype = DTYPES[dtype]

    if encoding == "raw":
        _check(len(blobs) == 1, path, f"{name}: blobs")
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
    if encoding in ("shared_dense", "shared_sparse"):
        k = _int(entry.get("codebook"), path, f"{name}: codebook size", 1, MAX_CODEBOOK)
        _check(len(blobs[0]) == 4 * k, path, f"{name}: codebook bytes")
        codebook = np.frombuffer(blobs[0], dtype="<f4").astype(np.float32)
        if encoding == "shared_dense":
            _check(len(blobs) == 2, path, f"{name}: blobs")
            symbols = _read_stream(streams.get("values"), blobs[1], path, f"{name}.values", k, numel)
            _check(symbols.size == numel, path, f"{name}: index count")
            return name, torch.from_numpy(codebook[symbols].reshape(shape).copy())
        _check(len(blobs) == 3, path, f"{name}: blobs")
        zero = _int(entry.get("zero"), path, f"{name}: zero index", 0, k - 1)
        _check(codebook[zero] == 0, path, f"{name}: zero index does not hold zero")
        bits = _int(entry.get("bits"), path, f"{name}: gap bits", 1, 16)
        layout = entry.get("layout")
        _check(layout in LAYOUTS, path, f"{name}: layout")
        longest = numel + (numel >> bits) + 1  # every non-zero and every filler
        gaps = _read_stream(streams.get("gaps"), blobs[1], path, f"{name}.gaps", 1 << bits, longest)
        vals = _read_stream(streams.get("values"), blobs[2], path, f"{name}.values", k, longest)
        try:
            seq = decode_gaps(gaps, vals, bits, numel, zero)
        except ValueError as exc:
            raise NetslimError(f"{path}: corrupt .nsz file ({name}: {exc})") from None
        flat = _unorder(seq, shape, layout)
        return name, torch.from_numpy(codebook[flat].reshape(shape).copy())

    # float_sparse: values of every entry raw, a filler holds 0.0
    _check(len(blobs) == 2, path, f"{name}: blobs")
    bits = _int(entry.get("bits"), path, f"{name}: gap bits", 1, 16)
    layout = entry.get("layout")
    _check(layout in LAYOUTS, path, f"{name}: layout")
    longest = min(numel + (numel >> bits) + 1, len(blobs[1]) // 4)  # one raw value per entry
    gaps = _read_stream(streams.get("gaps"), blobs[0], path, f"{name}.gaps", 1 << bits, longest)
    _check(len(blobs[1]) == 4 * gaps.size, path, f"{name}: value bytes")
    values = np.frombuffer(blobs[1], dtype="<f4").astype(np.float32)
    try:
        positions = gap_positions(gaps, values == 0, bits, numel)
    except ValueError as exc:
        raise NetslimError(f"{path}: corrupt .nsz file ({name}: {exc})") from None
    seq = np.zeros(numel, dtype=np.float32)
    seq[positions] = values[values != 0]
    return name, torch.from_numpy(_unorder(seq, shape, layout).reshape(shape).copy())


def _inverse_permute(seq: np.ndarray, order: np.ndarray) -> np.ndarray:
    flat = np.empty_like(seq)
    flat[order] = seq
    return flat


def _unorder(seq: np.ndarray, shape, layout: str) -> np.ndarray:
    order = flatten_order(tuple(shape), layout)
    return seq if order is None else _inverse_permute(seq, order)


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
    header = bounded_json(data[8:8 + hlen], str(path), ".nsz header")
    _check(isinstance(header, dict) and header.get("format") == "netslim-nsz", path, "format tag")
    _check(set(header) == {"format", "version", "arch", "tensors"}, path, "header fields")
    version = header.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version == VERSION):
        raise NetslimError(f"{path}: .nsz version {str(version)[:40]!r} not supported (this netslim reads {VERSION})")
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
    if expected is not None:
        missing = sorted(set(expected) - {e["name"] for e in entries})
        _check(not missing, path, f"tensors missing: {', '.join(missing[:5])}")
    tensors = dict(_decode_tensor(e, payload, path, expected) for e in entries)
    return header.get("arch"), tensors
