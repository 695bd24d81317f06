"""Hostile files: seeded mutations of .nsz, .nsq and .pt model files (bench/fuzz.py's generator) and the
targeted cases of issue 18. Every outcome is a clean NetslimError or a model that runs."""
from __future__ import annotations

import importlib.util
import io
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch

import netslim
from netslim.errors import NetslimError

_spec = importlib.util.spec_from_file_location("netslim_bench_fuzz", Path(__file__).parents[1] / "bench" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

CASES = {"nsz": 200, "nsq": 60, "pt": 120}  # ~30 s on one core
PER_CASE_S = 5.0


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-samples")
    return folder, fuzz.make_samples(folder)


@pytest.mark.parametrize("fmt", fuzz.FORMATS)
def test_mutated_files_load_or_fail_cleanly(samples, fmt, tmp_path):
    _, files = samples
    seen = set()
    for i in range(CASES[fmt]):
        data = fuzz.make_case(fmt, files, 10_000 + i)
        t = time.perf_counter()
        outcome, detail = fuzz.open_case(data, tmp_path / f"case.{fmt}")
        took = time.perf_counter() - t
        assert outcome in ("ok_load", "netslim_error"), f"case {i}: {outcome}: {detail}"
        assert took < PER_CASE_S, f"case {i} took {took:.1f} s"
        if outcome == "netslim_error":
            assert str(tmp_path / f"case.{fmt}") in detail or "not found" in detail, detail
        seen.add(outcome)
    assert seen == {"ok_load", "netslim_error"}


# ------------------------------------------------------------------ helpers
def _header(data: bytes, compressed: bool) -> dict:
    _, header, _ = fuzz._split(data)
    return json.loads(zlib.decompress(header) if compressed else header)


def _rewrite(data: bytes, doc_or_text, compressed: bool) -> bytes:
    magic, _, payload = fuzz._split(data)
    text = doc_or_text if isinstance(doc_or_text, bytes) else json.dumps(doc_or_text).encode()
    return fuzz._join(magic, zlib.compress(text) if compressed else text, payload)


def _refused(data: bytes, path: Path, match: str | None = None, seconds: float = PER_CASE_S) -> NetslimError:
    path.write_bytes(data)
    t = time.perf_counter()
    with pytest.raises(NetslimError, match=match) as err:
        netslim.load(path)
    assert time.perf_counter() - t < seconds
    assert str(path) in str(err.value)
    return err.value


def _nsz(samples, i=0):
    return samples[1]["nsz"][i]


# ------------------------------------------------------------------ .nsz
def test_nsz_const_stream_claiming_2_28_elements_is_refused(samples, tmp_path):
    data = _nsz(samples)
    doc = _header(data, False)
    entry = doc["tensors"][0]
    entry.update(shape=[1 << 14, 1 << 14], encoding="shared_dense", codebook=1, blobs=[[0, 4]],
                 streams={"values": {"coder": "const", "n": 1 << 28, "table": {"symbol": [0]}}})
    _refused(_rewrite(data, doc, False), tmp_path / "big.nsz", "elements")
    # without a model to compare with, read_nsz refuses it as well
    (tmp_path / "big2.nsz").write_bytes(_rewrite(data, doc, False))
    with pytest.raises(NetslimError, match="elements"):
        netslim.encode.read_nsz(tmp_path / "big2.nsz")


def test_nsz_ans_stream_must_match_its_counts_and_payload(tmp_path):
    from netslim.encode import read_nsz, write_nsz
    from netslim.encode.entropy import CodedStream, decode_stream, encode_stream

    symbols = torch.randint(0, 5, (4000,)).numpy()
    stream = encode_stream(symbols, ("ans",))
    assert stream.coder == "ans"
    with pytest.raises(NetslimError, match="left over"):  # not fully consumed
        decode_stream(CodedStream("ans", stream.n, stream.table, stream.payload + b"\1\0\0\0"))
    t = torch.zeros(64, 64)
    t[::3, ::5] = torch.randint(1, 4, t[::3, ::5].shape).float()
    write_nsz({"w": t}, tmp_path / "a.nsz", coders=("ans",))
    data = (tmp_path / "a.nsz").read_bytes()
    doc = _header(data, True)  # .nsz version 2: a zlib-compressed header
    stream = next(iter(doc["tensors"][0]["streams"].values()))
    stream["n"] = (1 << 20)
    stream["table"]["counts"][0] += (1 << 20) - sum(stream["table"]["counts"])
    (tmp_path / "b.nsz").write_bytes(_rewrite(data, doc, True))
    with pytest.raises(NetslimError, match="tmp|b.nsz"):
        read_nsz(tmp_path / "b.nsz")


@pytest.mark.parametrize("text", [b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b'{"format":"netslim-nsz","version":' + b"1" * 5000 + b"}",
                                  b'{"format":"netslim-nsz","version":1e999}'])
def test_nsz_hostile_header_json_is_refused(samples, tmp_path, text):
    _refused(_rewrite(_nsz(samples), text, False), tmp_path / "h.nsz")


@pytest.mark.parametrize("field,value", [("dtype", ["float32"]), ("shape", [True, 300]), ("shape", [[784], 300]),
                                         ("encoding", ["raw"]), ("blobs", [[0, True]]), ("name", 3),
                                         ("shape", [1 << 40, 1 << 40])])
def test_nsz_badly_typed_fields_are_refused(samples, tmp_path, field, value):
    data = _nsz(samples)
    doc = _header(data, False)
    doc["tensors"][0][field] = value
    _refused(_rewrite(data, doc, False), tmp_path / "f.nsz")


@pytest.mark.parametrize("num_classes", [10 ** 7, 2_000_000, False, 0, -1, [10], 1.5])
def test_nsz_num_classes_is_checked_before_building(samples, tmp_path, num_classes):
    data = _nsz(samples)
    doc = _header(data, False)
    doc["arch"]["num_classes"] = num_classes
    _refused(_rewrite(data, doc, False), tmp_path / "n.nsz", "num_classes", seconds=2)


def test_nsz_shapes_are_compared_with_the_model_before_decoding(samples, tmp_path):
    data = _nsz(samples)
    doc = _header(data, False)
    entry = next(e for e in doc["tensors"] if e["name"] == "fc1.weight")
    entry["shape"] = [301, 784]
    _refused(_rewrite(data, doc, False), tmp_path / "s.nsz", r"fc1.weight: shape \[301, 784\]")


# ------------------------------------------------------------------ .nsq
def _nsq(samples):
    return samples[1]["nsq"][0]


def _code_entry(doc):
    return next(e for e in doc["tensors"] if e["kind"] == "codes")


@pytest.mark.parametrize("edit,match", [
    (lambda e, d: e.update(narrow=False), "narrow"),
    (lambda e, d: e.pop("zero_point"), "fields"),
    (lambda e, d: e.pop("per_channel"), "fields"),
    (lambda e, d: e.update(zero_point=255), "zero_point"),
    (lambda e, d: e.update(scale=["x"]), "scale"),
    (lambda e, d: e.update(shape=[True] + e["shape"][1:]), "shape"),
    (lambda e, d: e.update(bits=True), "bits"),
    (lambda e, d: e.update(symmetric=1), "symmetric"),
    (lambda e, d: next(r for r in d["tensors"] if r["kind"] == "raw").update(dtype=["float32"]), "dtype"),
    (lambda e, d: d.update(unused="x" * (20 << 20)), "header larger"),
])
def test_nsq_fields_are_checked(samples, tmp_path, edit, match):
    data = _nsq(samples)
    doc = _header(data, True)
    edit(_code_entry(doc), doc)
    _refused(_rewrite(data, doc, True), tmp_path / "q.nsq", match)


def test_read_quantized_of_a_missing_file(tmp_path):
    with pytest.raises(NetslimError, match="not found"):
        netslim.quant.read_quantized(tmp_path / "missing.nsq")


# ------------------------------------------------------------------ .pt
def _pt(samples, i=0):
    return torch.load(io.BytesIO(samples[1]["pt"][i]), weights_only=True)


def _save_pt(payload, path, rehash=True):
    from netslim.saving import digest

    if rehash and "sha256" in payload:
        payload["sha256"] = digest(payload)
    torch.save(payload, path)
    return path


def test_pt_flipped_tensor_byte_fails_the_sha256(samples, tmp_path):
    payload = _pt(samples)
    payload["state_dict"]["fc1.weight"].view(-1)[7] += 1.0
    path = _save_pt(payload, tmp_path / "flip.pt", rehash=False)
    with pytest.raises(NetslimError, match="sha256"):
        netslim.load(path)


def test_pt_without_sha256_loads_with_a_warning(samples, tmp_path):
    payload = _pt(samples)
    del payload["sha256"]
    path = _save_pt(payload, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="sha256"):
        model = netslim.load(path)
    assert model(torch.zeros(fuzz.INPUT)).shape == (1, 10)


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("field,value,match", [("num_classes", 10 ** 7, "num_classes"),
                                               ("arch", "torchvision:vit_h_14", "elements"),
                                               ("num_classes", True, "num_classes")])
def test_pt_arch_is_sized_before_building(samples, tmp_path, i, field, value, match):
    payload = _pt(samples, i)
    payload[field] = value
    path = _save_pt(payload, tmp_path / "a.pt")
    t = time.perf_counter()
    with pytest.raises(NetslimError, match=match):
        netslim.load(path)
    assert time.perf_counter() - t < 2


def test_legacy_pt_bool_dimension_and_bad_channels_are_refused(samples, tmp_path):
    payload = _pt(samples, 1)
    assert payload["format"] == "netslim-pruned-v1"
    payload["structure"]["shapes"]["conv1.weight"] = [True, 1, 5, 5]
    with pytest.raises(NetslimError, match="conv1.weight"):
        netslim.load(_save_pt(payload, tmp_path / "b.pt"))
    # conv1 keeps 12 channels, conv2 is told to take 11: loads, but could not run forward
    payload = _pt(samples, 1)
    payload["structure"]["shapes"]["conv2.weight"] = [50, 11, 5, 5]
    payload["state_dict"]["conv2.weight"] = torch.zeros(50, 11, 5, 5)
    with pytest.raises(NetslimError, match="does not fit together"):
        netslim.load(_save_pt(payload, tmp_path / "c.pt"))
    payload = _pt(samples, 1)
    payload["structure"]["groups"]["conv2"] = 2
    payload["structure"]["shapes"]["conv2.weight"] = [50, 6, 5, 5]
    payload["state_dict"]["conv2.weight"] = torch.zeros(50, 6, 5, 5)
    netslim.load(_save_pt(payload, tmp_path / "g.pt"))  # 12 channels in 2 groups of 6: fits
    payload["structure"]["groups"]["conv2"] = 5
    payload["structure"]["shapes"]["conv2.weight"] = [50, 2, 5, 5]
    payload["state_dict"]["conv2.weight"] = torch.zeros(50, 2, 5, 5)
    with pytest.raises(NetslimError):
        netslim.load(_save_pt(payload, tmp_path / "g5.pt"))


def test_pt_changed_channels_in_a_structure_record_are_refused(samples, tmp_path):
    payload = _pt(samples, 0)
    payload["structure"]["modules"]["conv2"]["args"]["in_channels"] = 11
    payload["state_dict"]["conv2.weight"] = torch.zeros(50, 11, 5, 5)
    with pytest.raises(NetslimError, match="does not fit together"):
        netslim.load(_save_pt(payload, tmp_path / "c.pt"))


def test_load_checkpoint_with_an_empty_torch_error_message(tmp_path, monkeypatch):
    from netslim import io as nio

    path = tmp_path / "x.pt"
    path.write_bytes(b"PK\3\4 truncated")

    def boom(*a, **k):
        raise RuntimeError("")

    monkeypatch.setattr(nio.torch, "load", boom)
    with pytest.raises(NetslimError, match=r"cannot load checkpoint .*x.pt: RuntimeError$"):
        nio.load_checkpoint(path)


def test_truncated_pt_is_a_netslim_error(samples, tmp_path):
    data = samples[1]["pt"][0]
    for cut in (10, len(data) // 3, len(data) // 2, len(data) - 30):
        (tmp_path / "t.pt").write_bytes(data[:cut])
        with pytest.raises(NetslimError):
            netslim.load(tmp_path / "t.pt")


def test_crc_layout_of_the_containers_is_what_fuzz_recomputes(samples):
    for fmt in ("nsz", "nsq"):
        data = samples[1][fmt][0]
        assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4]) & 0xFFFFFFFF
