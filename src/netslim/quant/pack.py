"""The ``.nsq`` file: a quantized model's integer weights packed at their bit width.

Layout, little-endian::

    b"NSQ1"   magic
    u32       header length
    header    zlib-compressed UTF-8 JSON: ``version``, ``tensors`` (one entry per tensor: name, kind, shape,
              bits, byte offset and length) and, from :func:`netslim.save`, ``model`` (the architecture
              reference, structure and quantization config that rebuild the model; see :mod:`netslim.saving`)
    payload   the tensors back to back: packed integer codes (8 bits: one per byte; 4 bits: two per
              byte; 2 bits: four per byte; other widths up to 16: a plain bit stream), per-channel
              scales and zero points, and every float tensor (biases, activation scales) raw
              (float16 where that is exact: weight steps are chosen float16-representable)
    u32       crc32 of every byte before it

Every header field is bounds-checked on load; a truncated or altered file is refused with a
:class:`~netslim.errors.NetslimError`.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NetslimError
from ..io import InflateError, atomic_write, bounded_inflate, bounded_json
from .modules import weight_quantizers
from .qspec import QuantSpec, dequantize, quantize_to_int

MAGIC = b"NSQ1"
MAX_ELEMENTS = 1 << 27          # elements of one tensor
MAX_TOTAL_ELEMENTS = 1 << 28    # of all tensors
MAX_HEADER = 1 << 24            # bytes of the decompressed header
MAX_TENSORS = 1 << 16
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "bool": np.bool_}


def pack_codes(codes: np.ndarray, bits: int, qmin: int) -> bytes:
    """Pack integer codes (``qmin`` .. ``qmin + 2**bits - 1``) into ``bits`` bits each, little-endian."""
    u = (codes.astype(np.int64) - qmin).astype(np.uint32).ravel()
    if bits == 8:
        return u.astype(np.uint8).tobytes()
    bitplanes = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitplanes.ravel(), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, qmin: int, count: int) -> np.ndarray:
    if bits == 8:
        u = np.frombuffer(data, dtype=np.uint8, count=count).astype(np.int64)
    else:
        planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
        u = (planes.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
    return u + qmin


def packed_bytes(count: int, bits: int) -> int:
    return count if bits == 8 else (count * bits + 7) // 8


def save_quantized(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write the quantized ``model``'s state: quantized weights as packed integers, the rest raw; ``meta``
    (plain JSON data) goes into the header as ``model``."""
    quantizers = weight_quantizers(model)
    skip = {f"{n}.parametrizations.weight.original" for n in quantizers}
    skip |= {f"{n}.parametrizations.weight.0.zero_point" for n, q in quantizers.items() if q.spec.symmetric}
    entries, blobs, offset = [], [], 0
    for name, q in quantizers.items():
        w = model.get_submodule(name).parametrizations.weight.original.detach().cpu()
        codes = quantize_to_int(w, q.scale.detach().cpu(), q.zero_point.cpu(), q.spec).numpy()
        blob = pack_codes(codes, q.spec.bits, q.spec.qmin)
        entries.append({"name": f"{name}.parametrizations.weight.original", "kind": "codes", "shape": list(w.shape),
                        "bits": q.spec.bits, "symmetric": q.spec.symmetric, "per_channel": q.spec.per_channel,
                        "narrow": q.spec.narrow, "scale": f"{name}.parametrizations.weight.0.scale",
                        "zero_point": f"{name}.parametrizations.weight.0.zero_point",
                        "offset": offset, "length": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        arr = t.detach().cpu().numpy()
        if arr.dtype == np.float32 and arr.size and np.array_equal(arr.astype(np.float16).astype(np.float32), arr):
            arr = arr.astype(np.float16)  # exact: such steps are chosen float16-representable
            entries_dtype = "float32"
        else:
            entries_dtype = None
        dtype = {np.dtype(v): k for k, v in FLOAT_DTYPES.items()}.get(arr.dtype)
        if dtype is None:
            raise NetslimError(f"cannot store tensor {name} of dtype {arr.dtype}")
        blob = np.ascontiguousarray(arr).tobytes()
        entry = {"name": name, "kind": "raw", "dtype": dtype, "shape": list(arr.shape), "offset": offset,
                 "length": len(blob)}
        if entries_dtype:
            entry["as"] = entries_dtype
        entries.append(entry)
        blobs.append(blob)
        offset += len(blob)
    fields = {"version": 1, "tensors": entries, **({"model": meta} if meta is not None else {})}
    header = zlib.compress(json.dumps(fields, separators=(",", ":")).encode(), 9)
    body = MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)
    data = body + struct.pack("<I", zlib.crc32(body))
    return atomic_write(path, lambda f: f.write(data))


def _check(cond: bool, path, what: str) -> None:
    if not cond:
        raise NetslimError(f"{path}: corrupt .nsq file ({what})")


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_RAW_KEYS = {"name", "kind", "dtype", "shape", "offset", "length", "as"}
_CODE_KEYS = {"name", "kind", "shape", "bits", "symmetric", "per_channel", "narrow", "scale", "zero_point", "offset",
              "length"}
_WEIGHT = ".parametrizations.weight.original"


def _header(data: bytes, path) -> dict:
    """The zlib-compressed JSON header, decompressed to at most :data:`MAX_HEADER` bytes and parsed with bounds."""
    try:
        text = bounded_inflate(data, MAX_HEADER)
    except InflateError as exc:
        reason = {"not zlib": "header is not zlib data", "too large": f"header larger than {MAX_HEADER} bytes",
                  "truncated": "header length"}[exc.reason]
        raise NetslimError(f"{path}: corrupt .nsq file ({reason})") from None
    return bounded_json(text, str(path), ".nsq header")


def read_quantized(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict stored in an ``.nsq`` file (weights dequantized back onto their float grid)."""
    return read_nsq(path)[1]


def read_nsq(path: str | Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(the header's ``model`` record or None, the state_dict) of an ``.nsq`` file, every field checked."""
    model, state, _ = read_nsq_specs(path)
    return model, state


def read_nsq_specs(path: str | Path) -> tuple[dict | None, dict[str, torch.Tensor], dict[str, QuantSpec]]:
    """:func:`read_nsq` and the :class:`QuantSpec` of every quantized weight (by module name), for
    :func:`check_specs`."""
    if not Path(path).is_file():
        raise NetslimError(f"quantized model not found: {path}")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise NetslimError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    _check(len(data) >= 12 and data[:4] == MAGIC, path, "bad magic or too short")
    _check(zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0], path, "checksum mismatch")
    (hlen,) = struct.unpack("<I", data[4:8])
    _check(8 + hlen <= len(data) - 4, path, "header length")
    header = _header(data[8: 8 + hlen], path)
    payload = data[8 + hlen: -4]
    _check(isinstance(header, dict) and set(header) <= {"version", "tensors", "model"}, path, "header fields")
    _check(_is_int(header.get("version"), 1, 1), path, "version (this netslim reads 1)")
    entries = header.get("tensors")
    _check(isinstance(entries, list) and len(entries) <= MAX_TENSORS, path, "tensor list")
    raw, coded, names, total = {}, [], set(), 0
    for i, e in enumerate(entries):
        _check(isinstance(e, dict) and isinstance(e.get("name"), str) and 0 < len(e["name"]) <= 1024
               and e["name"] not in names, path, f"tensors[{i}]: name missing or repeated")
        name = e["name"]
        names.add(name)
        kind = e.get("kind")
        _check(kind in ("raw", "codes") and set(e) <= (_RAW_KEYS if kind == "raw" else _CODE_KEYS)
               and set(e) >= ({"dtype"} if kind == "raw" else _CODE_KEYS) | {"shape", "offset", "length"},
               path, f"{name}: kind or fields")
        shape, off, length = e.get("shape"), e.get("offset"), e.get("length")
        _check(isinstance(shape, list) and len(shape) <= 8 and all(_is_int(s, 0, MAX_ELEMENTS) for s in shape),
               path, f"shape of {name}")
        _check(_is_int(off, 0, len(payload)) and _is_int(length, 0, len(payload) - off), path, f"extent of {name}")
        count = math.prod(shape)
        total += count
        _check(count <= MAX_ELEMENTS and total <= MAX_TOTAL_ELEMENTS, path, f"size of {name}")
        blob = payload[off: off + length]
        if kind == "raw":
            _check(isinstance(e["dtype"], str) and e["dtype"] in FLOAT_DTYPES, path, f"dtype of {name}")
            dtype = np.dtype(FLOAT_DTYPES[e["dtype"]])
            _check(length == count * dtype.itemsize, path, f"length of {name}")
            arr = np.frombuffer(blob, dtype=dtype).copy().reshape(shape)
            if "as" in e:
                _check(e["as"] == "float32" and dtype == np.float16, path, f"{name}: widening")
                arr = arr.astype(np.float32)
            raw[name] = torch.from_numpy(arr)
        else:
            _check(_is_int(e["bits"], 2, 16), path, f"bits of {name}")
            for flag in ("symmetric", "per_channel", "narrow"):
                _check(isinstance(e[flag], bool), path, f"{name}: {flag} must be true or false")
            for ref in ("scale", "zero_point"):
                _check(isinstance(e[ref], str) and 0 < len(e[ref]) <= 1024, path, f"{name}: {ref} must name a tensor")
            _check(name.endswith(_WEIGHT) and len(shape) >= 1, path, f"{name}: not a quantized weight")
            _check(length == packed_bytes(count, e["bits"]), path, f"length of {name}")
            coded.append((e, blob, count))
    state = dict(raw)
    specs = {}
    for e, blob, count in coded:
        name = e["name"]
        spec = QuantSpec(e["bits"], symmetric=e["symmetric"], per_channel=e["per_channel"], narrow=e["narrow"])
        scale = raw.get(e["scale"])
        _check(scale is not None and scale.dtype == torch.float32, path, f"{name}: scale tensor {e['scale'][:80]!r}")
        channels = e["shape"][0] if spec.per_channel else 1
        _check(scale.numel() == channels and scale.dim() <= 1, path, f"{name}: scale shape")
        _check(bool(torch.isfinite(scale).all() and (scale > 0).all()), path, f"{name}: scale values")
        zp = e["zero_point"]
        if spec.symmetric:  # zero points of a symmetric grid are 0 and not stored
            _check(zp not in raw, path, f"{name}: zero point stored for a symmetric grid")
            state[zp] = torch.zeros(scale.shape, dtype=torch.int32)
        else:
            _check(zp in raw and raw[zp].dtype == torch.int32 and raw[zp].shape == scale.shape, path,
                   f"{name}: zero point tensor {zp[:80]!r}")
            _check(bool(((raw[zp] >= spec.qmin) & (raw[zp] <= spec.qmax)).all()), path, f"{name}: zero point values")
        codes = torch.from_numpy(unpack_codes(blob, spec.bits, spec.qmin, count).reshape(e["shape"]))
        _check(bool(((codes >= spec.qmin) & (codes <= spec.qmax)).all()), path, f"codes of {name}")
        state[name] = dequantize(codes, scale, state[zp], spec)
        specs[name[: -len(_WEIGHT)]] = spec
    model = header.get("model")
    _check(model is None or isinstance(model, dict), path, "model record")
    return model, state, specs


def check_specs(model: nn.Module, specs: dict[str, QuantSpec], path) -> None:
    """The file's quantized weights (``specs`` of :func:`read_nsq_specs`) are exactly ``model``'s weight quantizers,
    with the same bits, symmetric, per_channel and narrow: a mismatch would silently shift the weights."""
    quantizers = weight_quantizers(model)
    if set(quantizers) != set(specs):
        diff = sorted(set(quantizers) ^ set(specs))
        raise NetslimError(f"{path} does not match the model: quantized weights differ ({', '.join(diff[:5])[:200]})")
    for name, q in quantizers.items():
        mine, theirs = q.spec, specs[name]
        for field in ("bits", "symmetric", "per_channel", "narrow"):
            if getattr(mine, field) != getattr(theirs, field):
                raise NetslimError(f"{path}: bad field {field} of {name} = {getattr(theirs, field)!r} (the model's "
                                   f"quantizer has {getattr(mine, field)!r})")


def load_quantized_(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an ``.nsq`` file into a model with the same quantized structure (missing or extra keys are errors)."""
    _, state, specs = read_nsq_specs(path)
    check_specs(model, specs, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise NetslimError(f"{path} does not match the model: {str(exc).splitlines()[0]}") from None
    return model
