"""Fuzzing netslim's file decoders: mutated ``.nsz``, ``.nsq`` and ``.pt`` model files, each opened with
:func:`netslim.load`; every outcome must be a clean :class:`~netslim.errors.NetslimError` or a model that runs.

Cases are made from small seeded samples (a magnitude-pruned, weight-shared LeNet-300-100 ``.nsz``, in format
versions 2 and 1, and a LeNet-5 one; a W8A8
PTQ LeNet-5 ``.nsq``; a channel-pruned LeNet-5 ``.pt`` in the current and the legacy pruned format) by
seeded mutations: byte flips anywhere, truncations, payload flips, JSON header edits (a field replaced by
a hostile value, removed, added; deep nesting; a 5,000-digit integer; a compressed header that inflates far
beyond its size), made on the decompressed text and recompressed, and, for ``.pt`` files, edits of the
unpickled containers (fields, tensors, bytes of a tensor). The checksum (CRC-32 or SHA-256) is recomputed
on most cases, as anyone altering a file would.

Each case runs in a worker process under a memory cap (``RLIMIT_AS`` = the worker's size after warm-up
+ 256 MB) and a per-case timeout (5 s); outcomes: ``ok_load`` (the model ran a forward pass),
``netslim_error``, ``other_exception:<type>``, ``bad_forward:<type>``, ``timeout``, ``memory``, ``crash``.

    python bench/fuzz.py --cases 10000            # per format; writes bench/results/fuzz.json

``tests/test_fuzz.py`` runs a few hundred cases per format in-process with the same generator.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import torch
from torch import nn

FORMATS = ("nsz", "nsq", "pt")
INPUT = (1, 1, 28, 28)


# ------------------------------------------------------------------ samples
def make_samples(folder: str | Path) -> dict[str, list[bytes]]:
    """The files every case mutates: format -> list of file bytes."""
    import netslim
    from netslim.encode import read_nsz, write_nsz
    from netslim.prune.structured.serialize import save_pruned
    from netslim.quant import QuantConfig, quantize

    folder = Path(folder)
    torch.manual_seed(0)
    # .nsz: LeNet-300-100, 90 % magnitude-pruned; fc1 shared on 32 levels (shared_sparse), fc2 pruned
    # only (float_sparse), fc3 raw
    m = netslim.zoo.get("lenet300")
    with torch.no_grad():
        for layer in (m.fc1, m.fc2):
            w = layer.weight
            w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
        w = m.fc1.weight
        nz = w != 0
        w[nz] = torch.round(w[nz] * 200) / 200
    netslim.save(m, folder / "m.nsz", arch="lenet300")
    # a second .nsz: a whole-zero layer (const streams) and a recorded structure
    m5 = _pruned_lenet5()
    with torch.no_grad():
        m5.fc1.bias.zero_()
        m5.conv2.weight[:, :6] = 0
    netslim.save(m5, folder / "m5.nsz", arch="lenet5")
    # a LeNet-5 at the storage frontier: few live units on 8 float16-exact values per layer (2-byte codebooks,
    # active row and column maps)
    f5 = netslim.zoo.get("lenet5")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, p in enumerate(f5.parameters()):
            levels = (torch.randn(8, generator=g) * 0.1).half().float()
            keep = torch.rand(p.shape, generator=g) < 0.3
            if p.dim() > 1:
                live = {0: 0.5, 2: 0.3, 4: 0.02}.get(i, 0.5)
                keep &= (torch.rand(p.shape[0], generator=g) < live).view(-1, *[1] * (p.dim() - 1))
                keep &= (torch.rand(p.shape[1], generator=g) < 3 * live).view(1, -1, *[1] * (p.dim() - 2))
            p.copy_(torch.where(keep, levels[torch.randint(0, 8, p.shape, generator=g)], torch.zeros(())))
    netslim.save(f5, folder / "f5.nsz", arch="lenet5")
    # the first .nsz format (plain JSON header, offset/length blob spans), which netslim still reads; first in
    # the list, as tests/test_fuzz.py's targeted cases edit its plain header
    arch, tensors = read_nsz(folder / "m.nsz")
    write_nsz(tensors, folder / "m_v1.nsz", arch, version=1)
    # .nsq: W8A8 PTQ of LeNet-5
    x = torch.randn(16, *INPUT[1:])
    q = quantize(netslim.zoo.get("lenet5"), x[:1], [x], QuantConfig(), device="cpu")
    netslim.save(q, folder / "q.nsq", arch="lenet5")
    q4 = quantize(netslim.zoo.get("lenet5"), x[:1], [x], QuantConfig(weight_bits=4, per_channel=False), device="cpu")
    netslim.save(q4, folder / "q4.nsq", arch="lenet5")
    # .pt: channel-pruned LeNet-5, the current format and the legacy netslim-pruned-v1
    netslim.save(_pruned_lenet5(), folder / "p.pt", arch="lenet5")
    save_pruned(_pruned_lenet5(), folder / "legacy.pt", "lenet5")
    return {"nsz": [(folder / n).read_bytes() for n in ("m_v1.nsz", "m.nsz", "m5.nsz", "f5.nsz")],
            "nsq": [(folder / "q.nsq").read_bytes(), (folder / "q4.nsq").read_bytes()],
            "pt": [(folder / "p.pt").read_bytes(), (folder / "legacy.pt").read_bytes()]}


def _pruned_lenet5() -> nn.Module:
    import netslim

    torch.manual_seed(1)
    m = netslim.zoo.get("lenet5")
    m.conv1 = nn.Conv2d(1, 12, 5)
    m.conv2 = nn.Conv2d(12, 50, 5)
    return m


# ------------------------------------------------------------------ hostile values
def hostile(rng: random.Random, old=None):
    pool = [None, True, False, 0, -1, 1, 2, 3, 255, 256, 2 ** 16, 2 ** 28, 2 ** 31, 2 ** 53, 10 ** 7, 2_000_000,
            1.5, -0.0, 1e308, "", "x", "float32", "float16", "int64", "bool", "ans", "const", "huffman", "raw",
            "codes", "csc", "shared_dense", "float_sparse", "torchvision:vit_h_14", "lenet5", "resnet20",
            "os:system", "evil.py:f", [], [True], [1], [0], [2 ** 28], [1, 2], [[1]], {}, {"a": 1}, [None],
            "a" * 5000]
    if isinstance(old, bool):
        pool += [not old] * 6
    elif isinstance(old, int):
        pool += [old + 1, old - 1, old * 2, old * 1000, -old, old + 2 ** 20, [old], float(old), bool(old % 2)] * 2
    elif isinstance(old, list):
        pool += [old + old, old[:-1], old[::-1], [True] * len(old), [x + 1 if isinstance(x, int) else x for x in old],
                 [2 ** 28] + old[1:]] * 2
    elif isinstance(old, str):
        pool += [old + "x", old[:-1], old.upper(), [old], old + ".weight"] * 2
    return copy.deepcopy(rng.choice(pool))


def _nodes(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def mutate_tree(obj, rng: random.Random, skip=lambda v: False):
    """Edit one to three nodes of a JSON-like tree in place: replace by a hostile value, delete, add a key."""
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        nodes = [(p, v) for p, v in _nodes(obj) if p and not skip(v)]
        if not nodes:
            return obj
        path, old = rng.choice(nodes)
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        action = rng.random()
        if action < 0.7:
            _set(obj, path, hostile(rng, old))
        elif action < 0.85:
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[rng.choice(("extra", "n", "shape", "zero_point", "sha256", "bits"))] = hostile(rng)
        else:
            parent.append(copy.deepcopy(old))
    return obj


def _text_edit(text: bytes, rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.3:  # a 5,000-digit integer in place of a number
        import re

        nums = [m.span() for m in re.finditer(rb"\d+", text)]
        if nums:
            a, b = rng.choice(nums)
            return text[:a] + b"9" * 5000 + text[b:]
    if r < 0.6:  # deep nesting
        return text[:-1] + b',"deep":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    i = rng.randrange(len(text))
    return text[:i] + bytes([rng.randrange(256)]) + text[i + 1:]


# ------------------------------------------------------------------ containers
def _split(data: bytes):
    (hlen,) = struct.unpack("<I", data[4:8])
    return data[:4], data[8:8 + hlen], data[8 + hlen:-4]


def _join(magic: bytes, header: bytes, payload: bytes, crc: bool = True) -> bytes:
    body = magic + struct.pack("<I", len(header)) + header + payload
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF if crc else 0)


def _flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    b = bytearray(data)
    hi = len(b) if hi is None else hi
    if hi <= lo:
        return bytes(b)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        i = rng.randrange(lo, hi)
        b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
    return bytes(b)


def _recrc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]) & 0xFFFFFFFF)


def mutate_container(data: bytes, rng: random.Random, compressed: bool | None = None) -> bytes:
    """A mutated ``.nsz`` or ``.nsq`` file: a zlib-compressed JSON header (``.nsq``, ``.nsz`` version 2) is
    edited decompressed and recompressed; a plain one (``.nsz`` version 1, ``compressed=None`` tells them
    apart by the header's first byte) edited as is."""
    magic, header, payload = _split(data)
    if compressed is None:
        compressed = not header.startswith(b"{")
    text = zlib.decompress(header) if compressed else header
    pack = (lambda t: zlib.compress(t, 9)) if compressed else (lambda t: t)
    crc = rng.random() < 0.9
    r = rng.random()
    if r < 0.12:  # bytes anywhere
        out = _flip(data, rng)
        return _recrc(out) if crc else out
    if r < 0.18:
        cut = rng.randrange(len(data))
        return _recrc(data[:cut] + b"\0\0\0\0") if crc and cut >= 8 else data[:cut]
    if r < 0.3:
        return _join(magic, header, _flip(payload, rng), crc)
    if r < 0.4:
        return _join(magic, pack(_text_edit(text, rng)), payload, crc)
    if r < 0.43 and compressed:  # a header that inflates far beyond its size
        doc = json.loads(text)
        doc["unused"] = "x" * (20 << 20)
        return _join(magic, pack(json.dumps(doc).encode()), payload, crc)
    doc = mutate_tree(json.loads(text), rng)
    return _join(magic, pack(json.dumps(doc, separators=(",", ":")).encode()), payload, crc)


def mutate_pt(data: bytes, rng: random.Random) -> bytes:
    """A mutated ``.pt`` model file: container edits with the SHA-256 recomputed (mostly), or raw byte flips."""
    from netslim.saving import digest

    r = rng.random()
    if r < 0.15:
        return _flip(data, rng)
    if r < 0.2:
        return data[:rng.randrange(len(data))]
    payload = torch.load(io.BytesIO(data), weights_only=True)
    state = payload["state_dict"]
    r = rng.random()
    if r < 0.3:  # one tensor's bytes or shape or dtype
        name = rng.choice(sorted(state))
        t = state[name].clone()
        k = rng.random()
        if k < 0.5 and t.numel():
            flat = t.view(-1).view(torch.uint8) if t.dtype != torch.bool else t.view(-1)
            i = rng.randrange(flat.numel())
            flat[i] = (int(flat[i]) ^ (1 << rng.randrange(8))) & 0xFF if t.dtype != torch.bool else not flat[i]
        elif k < 0.7:
            t = torch.zeros([s + rng.choice((-1, 1, 5)) if s > 1 else s for s in t.shape], dtype=t.dtype)
        elif k < 0.85:
            t = t.to(rng.choice((torch.float64, torch.int64, torch.bool, torch.float16)))
        else:
            t = torch.zeros(t.shape + (2,), dtype=t.dtype) if rng.random() < 0.5 else None
        if t is None:
            del state[name]
        else:
            state[name] = t
    else:
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        mutate_tree(meta, rng)
        payload = {**meta, "state_dict": state}
    if rng.random() < 0.9 and "sha256" in payload:
        try:
            payload["sha256"] = digest({**payload, "state_dict": {k: v for k, v in state.items()
                                                                   if isinstance(v, torch.Tensor)}})
        except Exception:
            pass
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def make_case(fmt: str, samples: dict[str, list[bytes]], seed: int) -> bytes:
    rng = random.Random(f"{fmt}-{seed}")
    data = rng.choice(samples[fmt])
    if fmt == "pt":
        return mutate_pt(data, rng)
    return mutate_container(data, rng, compressed=True if fmt == "nsq" else None)


# ------------------------------------------------------------------ one case
def open_case(data: bytes, path: str | Path) -> tuple[str, str]:
    """(outcome, detail) of ``netslim.load`` on ``data`` written to ``path``."""
    import warnings

    import netslim
    from netslim.errors import NetslimError

    Path(path).write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = netslim.load(path)
    except NetslimError as exc:
        msg = str(exc)
        return "netslim_error", msg.splitlines()[0][:300] if msg else ""
    except MemoryError:
        return "memory", ""
    except Exception as exc:  # noqa: BLE001: the point is to see them
        return f"other_exception:{type(exc).__name__}", str(exc)[:300]
    try:
        with torch.no_grad():
            out = model(torch.zeros(INPUT))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
            return "bad_forward:shape", str(getattr(out, "shape", type(out)))
    except MemoryError:
        return "memory", "forward"
    except Exception as exc:  # noqa: BLE001
        return f"bad_forward:{type(exc).__name__}", str(exc)[:300]
    return "ok_load", ""


# ------------------------------------------------------------------ workers
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(conn, folder: str, headroom: int) -> None:
    import resource

    torch.set_num_threads(1)
    path = Path(folder) / f"case-{os.getpid()}"
    import netslim  # noqa: F401  warm-up: imports and one load of each sample
    for f in Path(folder).glob("*.ns?"):
        open_case(f.read_bytes(), path)
    open_case((Path(folder) / "p.pt").read_bytes(), str(path) + ".pt")
    limit = _vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(("ready", limit))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        fmt, data = msg
        conn.send(open_case(data, str(path) + "." + fmt))


class Worker:
    def __init__(self, ctx, folder: str, headroom: int) -> None:
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, folder, headroom), daemon=True)
        self.proc.start()
        if not self.parent.poll(300):
            raise RuntimeError("worker did not start")
        self.parent.recv()

    def run(self, fmt: str, data: bytes, timeout: float) -> tuple[str, str, float]:
        t = time.perf_counter()
        self.parent.send((fmt, data))
        try:
            ready = self.parent.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self.kill()
            return "timeout", "", time.perf_counter() - t
        try:
            outcome, detail = self.parent.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            return ("memory" if code == -6 else "crash"), f"exit code {code}", time.perf_counter() - t
        return outcome, detail, time.perf_counter() - t

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)


def main(argv=None) -> int:
    import multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases per format")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--headroom-mb", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    from netslim.report import write_result

    ctx = mp.get_context("fork")
    tmp = tempfile.mkdtemp(prefix="netslim-fuzz-")
    samples = make_samples(tmp)
    rows, details = [], {"examples": {}}
    for fmt in args.formats.split(","):
        worker = Worker(ctx, tmp, args.headroom_mb << 20)
        counts, examples, slowest = Counter(), {}, 0.0
        started = time.perf_counter()
        for i in range(args.cases):
            data = make_case(fmt, samples, args.seed * 1_000_003 + i)
            outcome, detail, secs = worker.run(fmt, data, args.timeout)
            slowest = max(slowest, secs)
            counts[outcome] += 1
            if outcome not in ("ok_load", "netslim_error"):
                examples.setdefault(outcome, []).append({"case": i, "detail": detail})
                print(f"{fmt} case {i}: {outcome} {detail[:200]}", flush=True)
            if not worker.alive():
                worker = Worker(ctx, tmp, args.headroom_mb << 20)
            if (i + 1) % 500 == 0:
                print(f"{fmt}: {i + 1} cases {dict(counts)}", flush=True)
        worker.kill()
        clean = counts["ok_load"] + counts["netslim_error"]
        rows.append(dict(model={"nsz": "lenet300, lenet5", "nsq": "lenet5", "pt": "lenet5"}[fmt], dataset=None,
                         method=f"fuzz .{fmt}", tool="netslim",
                         setting={"cases": args.cases, "outcomes": dict(sorted(counts.items())),
                                  "clean": clean, "timeout_s": args.timeout, "memory_cap_mb": args.headroom_mb,
                                  "slowest_case_s": round(slowest, 3),
                                  "seconds": round(time.perf_counter() - started, 1)},
                         size_bytes=max(len(s) for s in samples[fmt]),
                         notes=f"{clean} of {args.cases} clean (ok_load or netslim_error)"))
        details["examples"][fmt] = {k: v[:5] for k, v in examples.items()}
    details["form"] = (f"{args.cases} mutated files per format, per-case timeout {args.timeout} s, RLIMIT_AS = worker "
                       f"size after warm-up + {args.headroom_mb} MB; checksum recomputed on ~90 % of cases")
    path = write_result("fuzz", rows, out_dir=args.out, details=details)
    print(f"wrote {path}")
    for r in rows:
        print(r["method"], r["setting"]["outcomes"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
