import numpy as np
import pytest
import torch
from torch import nn

from netslim import NetslimError, encode, zoo
from netslim.encode.entropy import decode_stream, encode_stream, overhead_vs_bound, shannon_bits
from netslim.encode.sparse_index import decode_gaps, encode_gaps
from netslim.prune import magnitude_prune_
from netslim.quant import share_weights_


@pytest.mark.parametrize("coder", ["huffman", "ans"])
@pytest.mark.parametrize("probs", [[0.5, 0.25, 0.125, 0.125], [0.97, 0.01, 0.01, 0.01], [1 / 32] * 32])
def test_entropy_coders_roundtrip_near_the_shannon_bound(coder, probs):
    rng = np.random.default_rng(0)
    symbols = rng.choice(len(probs), size=20_000, p=probs) * 3  # sparse alphabet
    stream = encode_stream(symbols, (coder,))
    assert np.array_equal(decode_stream(stream), symbols)
    bound = shannon_bits(symbols)
    if coder == "huffman":  # Huffman's guarantee: less than one bit per symbol above the entropy
        assert bound <= 8 * len(stream.payload) < bound + symbols.size
    else:  # ANS gets within a fraction of a percent of the bound
        assert overhead_vs_bound(stream, symbols) < 0.01


def test_huffman_never_decodes_the_padding_bits():
    rng = np.random.default_rng(7)
    for n in range(1, 60):  # every padding length, with codes longer than the padding
        symbols = rng.choice(6, size=n, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
        if np.unique(symbols).size < 2:
            continue
        stream = encode_stream(symbols, ("huffman",))
        assert np.array_equal(decode_stream(stream), symbols)


def test_ans_beats_huffman_on_skewed_streams_and_the_smaller_is_chosen():
    rng = np.random.default_rng(1)
    symbols = rng.choice(3, size=50_000, p=[0.94, 0.03, 0.03])
    assert encode_stream(symbols).coder == "ans"
    assert len(encode_stream(symbols).payload) * 8 < 1.01 * shannon_bits(symbols) + 64


def test_constant_stream_costs_nothing():
    stream = encode_stream(np.full(100, 7))
    assert stream.coder == "const" and stream.payload == b""
    assert np.array_equal(decode_stream(stream), np.full(100, 7))


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_relative_indices_with_filler_zeros(bits):
    rng = np.random.default_rng(bits)
    values = np.where(rng.random(10_000) < 0.02, rng.integers(1, 9, 10_000), 0)
    gaps, symbols = encode_gaps(values, bits, 0)
    assert gaps.max() < 2 ** bits
    fillers = int((symbols == 0).sum())
    positions = np.flatnonzero(values)
    expected = int(sum((d - 1) // 2 ** bits for d in np.diff(positions, prepend=-1)))
    assert fillers == expected
    assert np.array_equal(decode_gaps(gaps, symbols, bits, values.size, 0), values)


def deep_compressed_lenet300():
    torch.manual_seed(0)
    model = zoo.get("lenet300")
    magnitude_prune_(model, 0.92)
    share_weights_(model, conv_bits=8, fc_bits=5)
    return model


def test_save_load_is_bit_exact_and_small(tmp_path):
    model = deep_compressed_lenet300()
    reports = encode.save(model, tmp_path / "m.nsz", arch="lenet300")
    loaded = encode.load(tmp_path / "m.nsz")
    x = torch.randn(32, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    from netslim.profile import deployable_copy

    expected = deployable_copy(model).state_dict()
    assert set(expected) == set(loaded.state_dict())
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, expected[name]), name
    size = (tmp_path / "m.nsz").stat().st_size
    assert 1_066_440 / size > 30  # 8 % weights, 5-bit shared: far below fp32
    fc1 = next(r for r in reports if r.name == "fc1.weight")
    # ANS over the whole index stream (zero a frequent symbol) can beat CSR gaps: the smaller wins
    assert fc1.encoding in ("shared_sparse", "shared_dense") and fc1.nonzeros < 0.09 * fc1.numel
    assert fc1.total_bytes < fc1.nonzeros * 1.5  # well under 12 bits per surviving weight


def test_dense_and_unshared_models_roundtrip_too(tmp_path):
    for model in (zoo.get("resnet20"), nn.Sequential(nn.Linear(100, 50).half())):
        encode.save(model, tmp_path / "d.nsz")
        fresh = zoo.get("resnet20") if isinstance(model, zoo.resnet_cifar.CifarResNet) else nn.Sequential(
            nn.Linear(100, 50).half())
        loaded = encode.load(tmp_path / "d.nsz", fresh)
        for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k


def test_pruned_float_weights_use_sparse_float_storage(tmp_path):
    model = zoo.get("lenet300")
    magnitude_prune_(model, 0.9)
    reports = encode.save(model, tmp_path / "p.nsz", arch="lenet300")
    assert next(r for r in reports if r.name == "fc1.weight").encoding == "float_sparse"
    loaded = encode.load(tmp_path / "p.nsz")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "empty", "garbage"])
def test_damaged_files_are_refused_with_a_clear_error(tmp_path, damage):
    path = tmp_path / "m.nsz"
    encode.save(deep_compressed_lenet300(), path, arch="lenet300")
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) - 100]
    elif damage == "flip_payload":
        blob[len(blob) - 50] ^= 0x04
    elif damage == "flip_header":
        blob[12] ^= 0x01
    elif damage == "empty":
        blob = bytearray()
    else:
        blob = bytearray(b"NSZ1" + bytes(100))
    path.write_bytes(bytes(blob))
    with pytest.raises(NetslimError, match="nsz|corrupt|magic"):
        encode.load(path)


def test_a_consistent_but_lying_header_is_caught(tmp_path):
    """Fields are bounds-checked even when the checksum matches (a crafted file)."""
    import json
    import struct
    import zlib

    path = tmp_path / "m.nsz"
    encode.save(deep_compressed_lenet300(), path, arch="lenet300")
    blob = path.read_bytes()
    (hlen,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + hlen])
    fc1 = next(t for t in header["tensors"] if t["name"] == "fc1.weight")
    fc1["shape"] = [300, 785]  # positions would run past the end or counts mismatch
    new_header = json.dumps(header).encode()
    body = blob[:4] + struct.pack("<I", len(new_header)) + new_header + blob[8 + hlen:-4]
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(NetslimError):
        encode.load(path)


def test_load_without_architecture_needs_the_model(tmp_path):
    encode.save(zoo.get("lenet5"), tmp_path / "m.nsz")
    with pytest.raises(NetslimError, match="pass the model"):
        encode.load(tmp_path / "m.nsz")
    assert encode.load(tmp_path / "m.nsz", zoo.get("lenet5")) is not None
