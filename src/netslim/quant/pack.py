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
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NetslimError
from ..io import atomic_write
from .modules import weight_quantizers
from .qspec import QuantSpec, dequantize, quantize_to_int

MAGIC = b"NSQ1"
MAX_ELEMENTS = 1 << 31
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


def read_quantized(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict stored in an ``.nsq`` file (weights dequantized back onto their float grid)."""
    return read_nsq(path)[1]


def read_nsq(path: str | Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(the header's ``model`` record or None, the state_dict) of an ``.nsq`` file, every field checked."""
    if not Path(path).is_file():
        raise NetslimError(f"quantized model not found: {path}")
    data = Path(path).read_bytes()
    _check(len(data) >= 12 and data[:4] == MAGIC, path, "bad magic or too short")
    _check(zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0], path, "checksum mismatch")
    (hlen,) = struct.unpack("<I", data[4:8])
    _check(8 + hlen <= len(data) - 4, path, "header length")
    try:
        header = json.loads(zlib.decompress(data[8: 8 + hlen]))
    except (ValueError, zlib.error):
        raise NetslimError(f"{path}: corrupt .nsq file (header is not JSON)") from None
    payload = data[8 + hlen: -4]
    _check(isinstance(header, dict) and isinstance(header.get("tensors"), list), path, "header layout")
    raw, coded = {}, []
    for e in header["tensors"]:
        _check(isinstance(e, dict) and isinstance(e.get("name"), str), path, "tensor entry")
        shape, off, length = e.get("shape"), e.get("offset"), e.get("length")
        _check(isinstance(shape, list) and all(isinstance(s, int) and 0 <= s < MAX_ELEMENTS for s in shape),
               path, f"shape of {e['name']}")
        _check(isinstance(off, int) and isinstance(length, int) and 0 <= off and 0 <= length
               and off + length <= len(payload), path, f"extent of {e['name']}")
        count = int(np.prod(shape)) if shape else 1
        _check(count < MAX_ELEMENTS, path, f"size of {e['name']}")
        blob = payload[off: off + length]
        if e.get("kind") == "raw":
            _check(e.get("dtype") in FLOAT_DTYPES, path, f"dtype of {e['name']}")
            dtype = np.dtype(FLOAT_DTYPES[e["dtype"]])
            _check(length == count * dtype.itemsize, path, f"length of {e['name']}")
            arr = np.frombuffer(blob, dtype=dtype).copy().reshape(shape)
            if e.get("as") is not None:
                _check(e["as"] == "float32" and dtype == np.float16, path, f"widening of {e['name']}")
                arr = arr.astype(np.float32)
            raw[e["name"]] = torch.from_numpy(arr)
        else:
            _check(e.get("kind") == "codes" and isinstance(e.get("bits"), int) and 2 <= e["bits"] <= 16,
                   path, f"kind or bits of {e['name']}")
            _check(length == packed_bytes(count, e["bits"]), path, f"length of {e['name']}")
            coded.append((e, blob, count))
    state = dict(raw)
    for e, blob, count in coded:
        spec = QuantSpec(e["bits"], symmetric=bool(e.get("symmetric", True)), per_channel=bool(e.get("per_channel")),
                         narrow=bool(e.get("narrow", True)))
        _check(e.get("scale") in raw, path, f"scale of {e['name']}")
        scale = raw[e["scale"]]
        if spec.symmetric:  # zero points of a symmetric grid are 0 and not stored
            state[e["zero_point"]] = torch.zeros(scale.shape, dtype=torch.int32)
        _check(e.get("zero_point") in state, path, f"zero point of {e['name']}")
        _check(scale.numel() in (1, e["shape"][0] if e["shape"] else 1), path, f"scale shape of {e['name']}")
        codes = torch.from_numpy(unpack_codes(blob, spec.bits, spec.qmin, count).reshape(e["shape"]))
        _check(bool(((codes >= spec.qmin) & (codes <= spec.qmax)).all()), path, f"codes of {e['name']}")
        state[e["name"]] = dequantize(codes, scale, state[e["zero_point"]], spec)
    model = header.get("model")
    _check(model is None or isinstance(model, dict), path, "model record")
    return model, state


def load_quantized_(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an ``.nsq`` file into a model with the same quantized structure (missing or extra keys are errors)."""
    state = read_quantized(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise NetslimError(f"{path} does not match the model: {str(exc).splitlines()[0]}") from None
    return model
