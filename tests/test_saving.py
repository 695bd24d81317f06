"""netslim.saving: one save/load for pruned, decomposed, quantized and user models, without pickled code."""
from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from torch import nn

from netslim import zoo
from netslim.errors import NetslimError
from netslim.lowrank import apply_plan_, plan_decomposition
from netslim.prune import magnitude_prune_
from netslim.prune.structured import structured
from netslim.saving import load, save

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _outputs(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    torch.manual_seed(0)
    return structured(zoo.get("resnet20").eval(), X, 0.5).eval()


def _decomposed(model: nn.Module, batchnorm: bool = False) -> nn.Module:
    apply_plan_(model, plan_decomposition(model, X, "auto", "fixed", 0.25), batchnorm=batchnorm)
    return model.eval()


def _records(structure: dict) -> dict:
    return structure["modules"]


def _nsz_header(path) -> tuple[int, dict]:
    blob = path.read_bytes()
    (hlen,) = struct.unpack("<I", blob[4:8])
    return hlen, json.loads(zlib.decompress(blob[8:8 + hlen]))  # .nsz version 2: a zlib-compressed header


def _rewrite_nsz(path, header: dict, out) -> None:
    blob = path.read_bytes()
    hlen = struct.unpack("<I", blob[4:8])[0]
    new = zlib.compress(json.dumps(header).encode())
    body = blob[:4] + struct.pack("<I", len(new)) + new + blob[8 + hlen:-4]
    out.write_bytes(body + struct.pack("<I", zlib.crc32(body)))


def _nsq_header(path) -> dict:
    blob = path.read_bytes()
    (hlen,) = struct.unpack("<I", blob[4:8])
    return json.loads(zlib.decompress(blob[8:8 + hlen]))


def _rewrite_nsq(path, header: dict, out) -> None:
    blob = path.read_bytes()
    hlen = struct.unpack("<I", blob[4:8])[0]
    new = zlib.compress(json.dumps(header).encode())
    body = blob[:4] + struct.pack("<I", len(new)) + new + blob[8 + hlen:-4]
    out.write_bytes(body + struct.pack("<I", zlib.crc32(body)))


# ------------------------------------------------------------------ round trips
def test_structurally_pruned_resnet20_round_trips_through_pt(pruned, tmp_path):
    path = save(pruned, tmp_path / "p.pt", arch="resnet20", example_input=X)
    payload = torch.load(path, weights_only=True)  # plain containers only
    assert payload["format"] == "netslim-model-v1" and payload["arch"] == "resnet20"
    conv1 = _records(payload["structure"])["conv1"]
    assert conv1["type"] == "Conv2d" and conv1["args"]["out_channels"] == pruned.conv1.out_channels < 16
    fc = _records(payload["structure"])["fc"]["args"]
    assert fc == {"in_features": pruned.fc.in_features, "out_features": 10, "bias": True}
    loaded = load(path)
    assert not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(pruned))


def test_low_rank_decomposed_resnet20_round_trips(tmp_path):
    torch.manual_seed(1)
    model = _decomposed(zoo.get("resnet20"), batchnorm=True)
    path = save(model, tmp_path / "d.pt", arch="resnet20")
    records = _records(torch.load(path, weights_only=True)["structure"])
    seq = records["layer1.0.conv1"]
    assert seq["type"] == "Sequential" and [c[1]["type"] for c in seq["children"]] == ["Conv2d", "BatchNorm2d",
                                                                                         "Conv2d"]
    assert torch.equal(_outputs(load(path)), _outputs(model))


def test_pruned_then_decomposed_resnet20_round_trips_through_nsz(pruned, tmp_path):
    import copy

    model = _decomposed(copy.deepcopy(pruned))
    path = save(model, tmp_path / "pd.nsz", arch="resnet20", example_input=X)
    _, header = _nsz_header(path)  # the structure is JSON in the header
    records = _records(header["arch"]["structure"])
    assert header["arch"]["name"] == "resnet20"
    assert any(r["type"] == "Sequential" for r in records.values())
    assert records["bn1"]["args"]["num_features"] == pruned.bn1.num_features
    assert torch.equal(_outputs(load(path)), _outputs(model))


def test_ptq_w8a8_resnet20_round_trips_through_nsq(pruned, tmp_path):
    from netslim.quant import QuantConfig, quantize
    from netslim.quant.qat import make_learnable_

    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    qmodel = quantize(pruned, X, calib, QuantConfig(weight_bits=8, act_bits=8, layer_bits={"fc": 6}))
    make_learnable_(qmodel, "lsq")  # as QAT leaves it
    path = save(qmodel, tmp_path / "q.nsq", arch="resnet20")
    meta = _nsq_header(path)["model"]
    assert meta["arch"] == "resnet20" and meta["quant"]["input_shape"] == list(X.shape)
    layer_bits = meta["quant"]["config"]["layer_bits"]  # every quantized layer's actual width
    assert layer_bits["fc"] == 6 and layer_bits["conv1"] == 8 and meta["quant"]["learn"] == "lsq"
    assert _records(meta["structure"])["conv1"]["args"]["out_channels"] == pruned.conv1.out_channels
    loaded = load(path)
    torch.testing.assert_close(_outputs(loaded), _outputs(qmodel), rtol=1e-5, atol=1e-5)


def test_magnitude_pruned_lenet5_round_trips_through_nsz(tmp_path):
    torch.manual_seed(2)
    model = zoo.get("lenet5")
    magnitude_prune_(model, 0.9)
    path = save(model, tmp_path / "m.nsz", arch="lenet5")
    _, header = _nsz_header(path)
    assert header["arch"] == {"name": "lenet5", "num_classes": None, "structure": {"version": 1, "modules": {}}}
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(_outputs(load(path), x), _outputs(model, x))


def test_a_users_factory_model_round_trips(tmp_path):
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n\n"
        "class Block(nn.Module):\n"
        "    def __init__(self, c):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(c, 2 * c, 3, padding=1)\n"
        "        self.bn = nn.BatchNorm2d(2 * c)\n"
        "    def forward(self, x):\n"
        "        return self.bn(self.conv(x)).relu()\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.stem = Block(3)\n"
        "        self.body = Block(6)\n"
        "        self.head = nn.Linear(12, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.body(self.stem(x)).mean((2, 3)))\n\n"
        "def build(num_classes=10):\n"
        "    return Net(num_classes)\n")
    arch = f"{tmp_path / 'mynet.py'}:build"
    torch.manual_seed(3)
    model = structured(zoo.get(arch, num_classes=5).eval(), X, 0.5).eval()
    path = save(model, tmp_path / "user.pt", arch=arch, num_classes=5, example_input=X)
    payload = torch.load(path, weights_only=True)
    assert set(_records(payload["structure"])) >= {"stem.conv", "stem.bn", "body.conv"}
    with pytest.raises(NetslimError, match="runs that code.*trust_code=True"):
        load(path)  # a file from elsewhere never runs code unless its reader says so
    assert torch.equal(_outputs(load(path, trust_code=True)), _outputs(model))


def test_without_arch_the_file_loads_into_a_given_base(pruned, tmp_path):
    import copy

    path = save(pruned, tmp_path / "x.pt", arch=None)
    with pytest.raises(NetslimError, match="names no architecture; pass the model"):
        load(path)
    assert torch.equal(_outputs(load(path, model=copy.deepcopy(pruned))), _outputs(pruned))
    # a file with a structure applies it to the base given as model=
    path = save(pruned, tmp_path / "y.pt", arch="resnet20")
    assert torch.equal(_outputs(load(path, model=zoo.get("resnet20"))), _outputs(pruned))


def test_format_is_read_from_the_content_not_the_suffix(pruned, tmp_path):
    path = save(pruned, tmp_path / "model.weights", arch="resnet20")  # not .nsz / .nsq: torch.save
    assert torch.load(path, weights_only=True)["format"] == "netslim-model-v1"
    nsz = save(zoo.get("lenet5"), tmp_path / "m.nsz", arch="lenet5")
    renamed = tmp_path / "m.bin"
    renamed.write_bytes(nsz.read_bytes())
    assert isinstance(load(renamed), nn.Module) and isinstance(load(path), nn.Module)


# ------------------------------------------------------------------ older files
def test_older_files_still_load(pruned, tmp_path):
    import copy

    from netslim import encode
    from netslim.prune.structured.serialize import load_pruned, save_pruned
    from netslim.quant import QuantConfig, quantize, save_quantized

    v1 = save_pruned(pruned, tmp_path / "v1.pt", arch="resnet20")
    assert torch.equal(_outputs(load(v1)), _outputs(pruned))
    new = save(pruned, tmp_path / "new.pt", arch="resnet20")
    assert torch.equal(_outputs(load_pruned(new)), _outputs(pruned))  # the old reader takes the new format
    encode.save(zoo.get("lenet5"), tmp_path / "old.nsz", arch="lenet5")  # no structure in the header
    assert isinstance(load(tmp_path / "old.nsz"), nn.Module)
    qmodel = quantize(zoo.get("lenet5"), torch.randn(1, 1, 28, 28), [torch.randn(4, 1, 28, 28)],
                      QuantConfig(act_bits=0))
    old_nsq = save_quantized(qmodel, tmp_path / "old.nsq")
    with pytest.raises(NetslimError, match="records no architecture"):
        load(old_nsq)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_outputs(load(old_nsq, model=copy.deepcopy(qmodel)), x), _outputs(qmodel, x))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("field, value, message", [
    ("out_channels", -3, r"conv1'\]\.args\.out_channels = -3 \(must be an integer in 1\.\."),
    ("in_channels", True, r"args\.in_channels = True"),
    ("out_channels", 10 ** 9, r"args\.out_channels = 1000000000"),
    ("kernel_size", [3, 3, 3], r"args\.kernel_size"),
    ("stride", 2.0, r"args\.stride = 2\.0"),
    ("groups", 3, r"args\.groups = 3 \(must be a divisor"),
    ("padding_mode", "evil", r"padding_mode = 'evil'"),
])
def test_tampered_structure_fields_are_refused(pruned, tmp_path, field, value, message):
    path = save(pruned, tmp_path / "p.pt", arch="resnet20")
    payload = torch.load(path, weights_only=True)
    payload["structure"]["modules"]["conv1"]["args"][field] = value
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(NetslimError, match=message) as err:
        load(tmp_path / "bad.pt")
    assert "bad.pt" in str(err.value)


@pytest.mark.parametrize("tamper, message", [
    (lambda s: s["modules"].__setitem__("conv1", {"type": "Evil", "args": {}}), r"\.type = 'Evil'.*Conv2d"),
    (lambda s: s["modules"].__setitem__("nope.conv", s["modules"]["conv1"]), r"no module of that name"),
    (lambda s: s["modules"].__setitem__("layer1", {"type": "Sequential", "children": []}), r"inside the recorded"),
    (lambda s: s.__setitem__("version", 99), r"bad field structure"),
    (lambda s: s["modules"]["conv1"]["args"].pop("bias"), r"exactly the fields"),
])
def test_tampered_structure_records_are_refused(pruned, tmp_path, tamper, message):
    path = save(pruned, tmp_path / "p.pt", arch="resnet20")
    payload = torch.load(path, weights_only=True)
    tamper(payload["structure"])
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(NetslimError, match=message):
        load(tmp_path / "bad.pt")


def test_tampered_nsz_and_nsq_headers_are_refused(pruned, tmp_path):
    path = save(pruned, tmp_path / "p.nsz", arch="resnet20")
    _, header = _nsz_header(path)
    header["arch"]["structure"]["modules"]["bn1"]["args"]["num_features"] = 0
    _rewrite_nsz(path, header, tmp_path / "bad.nsz")  # a consistent checksum does not excuse a bad field
    with pytest.raises(NetslimError, match=r"bad.nsz: bad field .*bn1'\]\.args\.num_features = 0"):
        load(tmp_path / "bad.nsz")

    from netslim.quant import QuantConfig, quantize

    qmodel = quantize(pruned, X, [X], QuantConfig())
    path = save(qmodel, tmp_path / "q.nsq", arch="resnet20")
    for key, value, message in [("weight_bits", "8", r"quant\.config\.weight_bits = '8'"),
                                ("weight_bits", 40, r"quant\.config\.weight_bits = 40 \(must be an integer in 2\.\.16"),
                                ("input_shape", [2, -3, 32, 32], r"quant\.input_shape"),
                                ("input_shape", [10 ** 6, 3, 32, 32], r"quant\.input_shape"),
                                ("learn", "magic", r"quant\.learn"),
                                ("calibrator", "magic", r"bad field quant\.config: unknown calibrator")]:
        header = _nsq_header(path)
        quant = header["model"]["quant"]
        (quant if key in quant else quant["config"])[key] = value
        _rewrite_nsq(path, header, tmp_path / "bad.nsq")
        with pytest.raises(NetslimError, match=message):
            load(tmp_path / "bad.nsq")


def test_missing_file_and_wrong_format_are_clear_errors(pruned, tmp_path):
    with pytest.raises(NetslimError, match="not found"):
        load(tmp_path / "nothing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(NetslimError, match="not a netslim model file"):
        load(tmp_path / "other.pt")
    with pytest.raises(NetslimError, match="is not quantized; save it as .nsz or .pt"):
        save(pruned, tmp_path / "p.nsq", arch="resnet20")


def test_what_cannot_be_recorded_is_refused_at_save(pruned, tmp_path):
    import copy

    from netslim.quant import QuantConfig, quantize

    class Custom(nn.Module):
        def forward(self, x):
            return x

    odd = copy.deepcopy(pruned)
    odd.layer1[0].conv2 = nn.Sequential(odd.layer1[0].conv2, Custom())
    with pytest.raises(NetslimError, match=r"'layer1.0.conv2.1'.*Custom.*allowed: Sequential, Conv1d"):
        save(odd, tmp_path / "odd.pt", arch="resnet20")
    with pytest.raises(NetslimError, match="quantized by netslim.quant; save it as .nsq"):
        save(quantize(pruned, X, [X], QuantConfig()), tmp_path / "q.pt", arch="resnet20")
    with pytest.raises(NetslimError, match="arch builds a LeNet5"):
        save(pruned, tmp_path / "wrong.pt", arch="lenet5")
    masked = zoo.get("lenet5")
    magnitude_prune_(masked, 0.5)
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(NetslimError, match="bake them in first"):
        save(quantize(masked, x, [x], QuantConfig()), tmp_path / "mq.nsq", arch="lenet5")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_standard_library_reference_in_a_file_is_not_called(pruned, tmp_path):
    path = save(pruned, tmp_path / "p.pt", arch=None)
    payload = torch.load(path, weights_only=True)
    payload["arch"] = "os:getcwd"
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(NetslimError, match="runs that code"):
        load(tmp_path / "evil.pt")  # refused without trust_code
    with pytest.raises(NetslimError, match="standard-library function"):
        load(tmp_path / "evil.pt", trust_code=True)  # and a standard-library function even with it
