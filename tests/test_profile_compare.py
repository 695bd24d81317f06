"""Per-layer time of a compressed model against its dense original: netslim.profile.compare_breakdown and
``netslim profile --compare``. The compressed model has one layer made far slower behind the same name (a
Sequential of two wide convolutions, as a low-rank replacement is named), so the slowest layer is known."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import netslim
from netslim.cli import main
from netslim.errors import NetslimError
from netslim.profile import compare_breakdown, layer_breakdown
from netslim.profile.breakdown import OUTSIDE, OUTSIDE_OPS, ROOT
from netslim.profile.ort_trace import _OnnxGraph, _scope_module

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = {ROOT, OUTSIDE, OUTSIDE_OPS}


class Block(nn.Module):
    """A residual block with a functional ReLU and a residual add in its own forward (as the zoo's ResNets)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class Net(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer = nn.Sequential(Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.layer(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _models():
    torch.manual_seed(0)
    dense = Net().eval()
    slow = Net().eval()
    slow.load_state_dict(dense.state_dict())
    # 64x the MACs of the layer it replaces, under the same name (a decomposed layer is named the same way)
    slow.layer[0].conv2 = nn.Sequential(nn.Conv2d(8, 256, 3, padding=1, bias=False),
                                        nn.Conv2d(256, 8, 3, padding=1, bias=False))
    return dense, slow


X = torch.randn(1, 3, 32, 32)


def test_torch_names_the_slow_layer_first_with_its_share():
    dense, slow = _models()
    cmp = compare_breakdown(dense, slow, X, runtime="torch", repeats=5, warmup=1)
    first = cmp.slowest(1)[0]
    assert first.name == "layer.0.conv2"  # the two factors are summed under the original name
    assert first.kind == "Conv2d -> Conv2d+Conv2d"
    assert first.share > 0.4
    assert first.dense_macs == 8 * 8 * 9 * 32 * 32 and first.macs == 2 * 256 * 8 * 9 * 32 * 32
    assert first.mac_reduction == pytest.approx(1 / 64)
    assert first.input_shape == (1, 8, 32, 32) and first.output_shape == (1, 8, 32, 32)
    assert sum(r.share for r in cmp.layers) == pytest.approx(1.0, abs=1e-6)
    assert sum(r.dense_share for r in cmp.layers) == pytest.approx(1.0, abs=1e-6)
    names = [r.name for r in cmp.layers]
    leaves = {"stem", "layer.0.conv1", "layer.0.bn1", "layer.0.conv2", "layer.0.bn2", "fc"}
    assert leaves <= set(names) and not [n for n in names if n.startswith("layer.0.conv2.")]
    assert "layer.0" in names  # the block's own residual add and ReLUs
    assert names[-2:] == [ROOT, OUTSIDE_OPS]
    assert cmp.dense_macs / cmp.macs == pytest.approx(cmp.mac_reduction)
    table = cmp.markdown(2)
    assert "| layer.0.conv2 | Conv2d -> Conv2d+Conv2d |" in table and "slowest #1" in table


def test_layer_breakdown_of_one_model_shares_sum_to_one():
    dense, _ = _models()
    rows = layer_breakdown(dense, X, runtime="torch", batch=2, repeats=3, warmup=1)
    assert sum(r.share for r in rows) == pytest.approx(1.0, abs=1e-6)
    stem = next(r for r in rows if r.name == "stem")
    assert stem.input_shape == (2, 3, 32, 32) and stem.macs == 2 * 8 * 27 * 32 * 32 and stem.ms > 0


def test_ort_traces_fused_nodes_to_their_modules():
    pytest.importorskip("onnxruntime")
    dense, slow = _models()
    cmp = compare_breakdown(dense, slow, X, runtime="ort", repeats=5, warmup=1)
    assert cmp.slowest(1)[0].name == "layer.0.conv2" and cmp.slowest(1)[0].share > 0.4
    names = {r.name for r in cmp.layers}
    # Conv + BatchNorm + ReLU (+ Add) fused and renamed by onnxruntime, found again under the convolution's name
    assert {"stem", "layer.0.conv1", "layer.0.conv2", "fc"} <= names
    assert not [n for n in names if "/" in n]
    assert OUTSIDE in names
    assert sum(r.share for r in cmp.layers) == pytest.approx(1.0, abs=1e-6)


def test_scope_names_map_to_module_names():
    modules = {name for name, _ in netslim.zoo.get("resnet20").named_modules()}
    assert _scope_module("/layer2/layer2.0/downsample/downsample.0/Conv", modules) == "layer2.0.downsample.0"
    assert _scope_module("/layer1/layer1.0/conv1/Conv", modules) == "layer1.0.conv1"
    assert _scope_module("/Flatten", modules) == ""
    assert _scope_module("ReorderOutput", modules) is None
    assert _OnnxGraph(b"").source_node("fused /fc/Gemm", "FusedGemm") == "/fc/Gemm"


def test_unknown_runtime_names_the_choices():
    dense, slow = _models()
    with pytest.raises(NetslimError, match=r"unknown runtime 'tvm'; valid runtimes: ort, torch"):
        compare_breakdown(dense, slow, X, runtime="tvm")


def test_models_with_different_outputs_are_refused():
    dense, _ = _models()
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(7))
    with pytest.raises(NetslimError, match="output shapes"):
        compare_breakdown(dense, other, X)


@pytest.fixture(scope="module")
def pruned_lenet5(tmp_path_factory):
    import netslim.prune

    torch.manual_seed(0)
    model = netslim.zoo.get("lenet5").eval()
    folder = tmp_path_factory.mktemp("compare")
    torch.save(model.state_dict(), folder / "dense.pt")
    pruned = netslim.prune.structured(model, torch.randn(1, 1, 28, 28), ratio=0.5)
    return folder / "dense.pt", netslim.save(pruned, folder / "pruned.nsz", arch="lenet5")


def test_cli_compare_prints_the_layers_and_writes_json(pruned_lenet5, tmp_path, capsys):
    dense, pruned = pruned_lenet5
    out = tmp_path / "breakdown.json"
    rc = main(["profile", "--model", "lenet5", "--weights", str(dense), "--compare", str(pruned), "--repeats", "3",
               "--top", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for name in ("conv1", "conv2", "fc1", "fc2", "slowest #1", "slowest:"):
        assert name in text
    doc = json.loads(out.read_text())
    assert doc["runtime"] == "torch" and len(doc["slowest"]) == 2
    assert sum(r["share"] for r in doc["layers"]) == pytest.approx(1.0, abs=1e-6)
    conv2 = next(r for r in doc["layers"] if r["name"] == "conv2")
    assert conv2["mac_reduction"] > 1.5 and conv2["input_shape"][0] == 1
    assert 1.5 < doc["dense_macs"] / doc["macs"] < 5


@pytest.mark.parametrize("args,needle", [
    (["--runtime", "tvm"], "invalid choice: 'tvm' (choose from 'torch', 'ort')"),
    (["--batch-size", "0"], "expected a positive integer"),
])
def test_cli_bad_options_are_one_line(pruned_lenet5, capsys, args, needle):
    _, pruned = pruned_lenet5
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--model", "lenet5", "--compare", str(pruned), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("case,needle", [
    ("missing", "model file not found"),
    ("classes", "output shapes"),
    ("sparse", "--sparse does not combine with --compare"),
    ("no-compare", "--runtime apply to --compare COMPRESSED only"),
])
def test_cli_bad_input_is_one_error_line(pruned_lenet5, tmp_path, capsys, case, needle):
    _, pruned = pruned_lenet5
    args = {"missing": ["--compare", str(tmp_path / "nope.nsz")],
            "classes": ["--num-classes", "7", "--compare", str(pruned)],
            "sparse": ["--compare", str(pruned), "--sparse"],
            "no-compare": ["--runtime", "ort"]}[case]
    rc = main(["profile", "--model", "lenet5", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.startswith("netslim: error:") and err.strip().count("\n") == 0


def test_cli_runtimes_times_both_models_side_by_side(pruned_lenet5, tmp_path, capsys):
    dense, pruned = pruned_lenet5
    out = tmp_path / "runtimes.json"
    rc = main(["profile", "--model", "lenet5", "--weights", str(dense), "--compare", str(pruned), "--runtimes",
               "eager,ort", "--batch-sizes", "1,16", "--repeats", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "fastest at batch 1:" in text and "fastest at batch 16:" in text
    doc = json.loads(out.read_text())
    assert [(r["runtime"], r["batch"]) for r in doc["rows"]] == [("eager", 1), ("eager", 16), ("ort", 1), ("ort", 16)]
    for row in doc["rows"]:
        assert row["lenet5"]["ms"] > 0 and row[str(pruned)]["ms"] > 0
        assert row["speedup"] == pytest.approx(row["lenet5"]["ms"] / row[str(pruned)]["ms"])


@pytest.mark.parametrize("args,needle", [
    (["--runtimes", "eager,tvm"], "unknown runtime 'tvm'; valid runtimes: compile, eager, ort"),
    (["--runtimes", "ort", "--top", "3"], "--top does not combine with --runtimes"),
])
def test_cli_runtimes_mistakes_are_one_line(pruned_lenet5, capsys, args, needle):
    rc = main(["profile", "--model", "lenet5", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.strip().count("\n") == 0
