"""Models whose forward returns a dict, a tuple, a list or a list of dicts of tensors - torchvision's
segmentation models (``{"out": ..., "aux": ...}``) and detection models (one dict of boxes per image) -
through structured pruning, profiling, low-rank factorization, quantization and ONNX export.

Nothing downloads (``weights=None, weights_backbone=None``); everything runs on one thread at 64x64.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import netslim
from netslim.errors import NetslimError
from netslim.export import check_onnx, onnx_bytes, ort_session, run_onnx, to_onnx
from netslim.lowrank import apply_plan_, plan_decomposition
from netslim.outputs import (as_args, flatten_outputs, output_names, output_shapes, shape_mismatch,
                             unflatten_like)
from netslim.prune.structured import structured
from netslim.quant import QuantConfig, quantize
from netslim.quant.export import integer_ops

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTATION = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50"]
X = (1, 3, 64, 64)


def segmentation_model(name: str, num_classes: int = 5) -> nn.Module:
    """A torchvision segmentation model with random weights and random BatchNorm statistics (so that every
    channel matters differently); every model but LR-ASPP with its auxiliary head."""
    torch.manual_seed(0)
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **aux)
    randomize_batchnorm_(model)
    return model.eval()


def randomize_batchnorm_(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)


def macs(model: nn.Module, x) -> int:
    return netslim.profile(model, x, latency=False).macs


class DictNet(nn.Module):
    """A small segmentation-like model: ``{"out": per-pixel classes, "aux": coarser classes}``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.out = nn.Conv2d(32, 4, 1)
        self.aux = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(32, 4, 1))

    def forward(self, x):
        y = self.stem(x)
        return {"out": self.out(y), "aux": self.aux(y)}


class UntraceableDictNet(DictNet):
    """The same, with Python control flow on a tensor value, which ``torch.fx`` cannot trace."""

    def forward(self, x):
        y = self.stem(x)
        if float(y.mean()) > -1e9:
            y = torch.relu(y)
        return {"out": self.out(y), "aux": self.aux(y)}


class Fork(nn.Module):
    """A leaf module returning a tuple."""

    def forward(self, x):
        return x, 2 * x


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.fork = Fork()
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        left, right = self.fork(torch.relu(self.a(x)))
        return self.b(left), self.c(right).mean((2, 3))


class ListNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleList([nn.Conv2d(24, 3, 1), nn.Conv2d(24, 7, 3, stride=2, padding=1)])

    def forward(self, x):
        y = self.a(x)
        return [head(y) for head in self.heads]


# ---------------------------------------------------------------------------------------------- helpers
def test_flattened_order_names_and_rebuilding():
    out = {"out": torch.zeros(1, 2), "aux": [torch.ones(3), None, (torch.zeros(4, 1),)]}
    assert output_shapes(out) == [(1, 2), (3,), (4, 1)]
    assert output_names(out) == ["out", "aux.0", "aux.2.0"]
    assert output_names(torch.zeros(1)) == ["output"] and output_names((torch.zeros(1),) * 2) == ["output_0", "output_1"]
    rebuilt = unflatten_like(out, [t + 1 for t in flatten_outputs(out)])
    assert rebuilt["aux"][1] is None and float(rebuilt["aux"][0][0]) == 2.0
    assert shape_mismatch(out, rebuilt) is None
    assert "'aux.0'" in shape_mismatch(out, {"out": torch.zeros(1, 2), "aux": [torch.ones(3, 2), None, (torch.zeros(4, 1),)]})
    assert shape_mismatch({"boxes": torch.zeros(7, 4)}, {"boxes": torch.zeros(3, 4)}) is None  # a count, not channels
    assert as_args(torch.zeros(1)) == (as_args(torch.zeros(1))[0],) and len(as_args((1, 2))) == 2


# ---------------------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model_pruned_by_half_keeps_every_output_and_runs_in_onnxruntime(name, tmp_path):
    model = segmentation_model(name)
    x = torch.randn(*X)
    pruned = structured(model, x, ratio=0.5)
    with torch.no_grad():
        y, y_pruned = model(x), pruned(x)
    assert list(y_pruned) == list(y) == (["out"] if name.startswith("lraspp") else ["out", "aux"])
    assert all(y_pruned[k].shape == y[k].shape == (1, 5, 64, 64) for k in y)
    assert all(torch.isfinite(t).all() for t in y_pruned.values())
    dense, small = macs(model, x), macs(pruned, x)
    assert small < 0.62 * dense, f"{name}: only {dense / small:.2f}x fewer MACs"

    path = to_onnx(pruned, x, tmp_path / f"{name}.onnx")
    session = ort_session(path, threads=1)
    assert [o.name for o in session.get_outputs()] == list(y)
    for batch in (1, 3):
        report = check_onnx(pruned, session, torch.randn(batch, 3, 64, 64))
        assert report["outputs"] == len(y) and not report["shape_mismatches"], report
        assert report["max_abs_diff"] < 1e-3, (batch, report)


def test_structured_pruning_fails_clearly_when_an_output_would_change(monkeypatch):
    import importlib
    api = importlib.import_module("netslim.prune.structured.api")  # the package name is also a function's

    def drop_aux(model, graph, remove):  # a broken removal: the aux head loses channels
        model.aux[1] = nn.Conv2d(32, 2, 1)
        return model

    monkeypatch.setattr(api, "remove_groups_", drop_aux)
    with pytest.raises(NetslimError, match=r"output 'aux' changed shape \(1, 4, 8, 8\) -> \(1, 2, 8, 8\)"):
        structured(DictNet().eval(), torch.randn(1, 3, 16, 16), ratio=0.5)


def test_taylor_criterion_on_a_segmentation_model_uses_its_out_head():
    model = segmentation_model("lraspp_mobilenet_v3_large")
    data = [(torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64)))]
    pruned = structured(model, torch.randn(*X), ratio=0.3, criterion="taylor", data=data)
    assert macs(pruned, torch.randn(*X)) < macs(model, torch.randn(*X))


# ---------------------------------------------------------------------------------------------- tuple, list, detection
@pytest.mark.parametrize("cls", [TupleNet, ListNet])
def test_tuple_and_list_outputs_are_pruned_checked_and_exported(cls):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = structured(model, x, ratio=0.5)
    with torch.no_grad():
        y, y_pruned = model(x), pruned(x)
    assert type(y_pruned) is type(y) and output_shapes(y_pruned) == output_shapes(y)
    assert macs(pruned, x) < macs(model, x)
    data = onnx_bytes(pruned, x)
    got = unflatten_like(y, run_onnx(data, torch.randn(4, 3, 32, 32)))
    assert type(got) is type(y)
    assert [t.shape[0] for t in got] == [4, 4]
    assert check_onnx(pruned, data, torch.randn(2, 3, 32, 32))["max_abs_diff"] < 1e-4


def test_detection_model_prunes_profiles_and_exports():
    torch.manual_seed(0)
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, num_classes=5).eval()
    images = [torch.rand(3, 128, 128)]
    pruned = structured(model, images, ratio=0.5)
    with torch.no_grad():
        y = pruned(images)
    assert isinstance(y, list) and set(y[0]) == {"boxes", "labels", "scores"} and y[0]["boxes"].shape[1] == 4
    dense = netslim.profile(model, images, latency=False)
    small = netslim.profile(pruned, images, latency=False)
    assert small.macs < 0.6 * dense.macs and small.input_shape == ((3, 128, 128),)
    report = check_onnx(pruned, onnx_bytes(pruned, images), [torch.rand(3, 128, 128)])
    assert report["outputs"] == 3 and not report["shape_mismatches"] and report["max_abs_diff"] < 1e-3, report


# ---------------------------------------------------------------------------------------------- profile / compare
def test_profile_and_compare_count_every_output_of_a_dict_model():
    torch.manual_seed(0)
    model = DictNet().eval()
    x = torch.randn(1, 3, 32, 32)
    prof = netslim.profile(model, x, batch_sizes=(1, 2), repeats=3, warmup=1)
    rows = {r.name: r for r in prof.layers}
    assert rows["out"].output_shape == (1, 4, 32, 32) and rows["aux.1"].output_shape == (1, 4, 16, 16)
    assert prof.activation_bytes == sum(r.output_bytes for r in prof.layers) > 4 * (4 * 32 * 32 + 4 * 16 * 16)
    assert set(prof.latency_ms) == {1, 2}
    cmp = netslim.compare(model, structured(model, x, ratio=0.5), example_input=x, repeats=3)
    assert cmp.ratios["r_c"] > 1.5 and cmp.ratios["r_p"] > 1.5 and cmp.ratios["r_T"] is not None

    fork = {r.name: r for r in netslim.profile(TupleNet().eval(), x, latency=False).layers}["fork"]
    assert fork.output_shape == ((1, 16, 32, 32), (1, 16, 32, 32))  # a layer returning a tuple: both shapes
    assert fork.output_bytes == 2 * 16 * 32 * 32 * 4
    assert fork.to_dict()["output_shape"] == [[1, 16, 32, 32], [1, 16, 32, 32]]


# ---------------------------------------------------------------------------------------------- low-rank
def test_low_rank_factorization_of_a_segmentation_model_keeps_its_outputs():
    model = segmentation_model("lraspp_mobilenet_v3_large")
    x = torch.randn(*X)
    with torch.no_grad():
        y = model(x)
    plan = plan_decomposition(model, x, "auto", "fixed", 0.5)
    apply_plan_(model, plan)
    assert sum(p.skipped is None for p in plan.layers.values()) >= 20
    with torch.no_grad():
        y_low = model(x)
    assert shape_mismatch(y, y_low) is None and list(y_low) == ["out"]
    assert check_onnx(model, onnx_bytes(model, x), torch.randn(2, 3, 64, 64))["max_abs_diff"] < 1e-3


# ---------------------------------------------------------------------------------------------- quantization
def test_quantized_segmentation_model_runs_as_integers_with_both_heads():
    model = segmentation_model("deeplabv3_mobilenet_v3_large")
    calibration = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    qmodel = quantize(model, calibration[0][:1], calibration, QuantConfig())
    assert qmodel.netslim_traced  # torch.fx traced it: quantizers after every op
    data = onnx_bytes(qmodel, calibration[0][:1])
    assert integer_ops(data).get("QLinearConv", 0) >= 50
    x = torch.randn(2, 3, 64, 64)
    report = check_onnx(qmodel, data, x)
    with torch.no_grad():
        y = qmodel(x)
    assert list(report["per_output"]) == ["out", "aux"] and float(y["out"].std()) > 0
    assert report["max_abs_diff"] <= 0.05 * max(float(t.abs().max()) for t in y.values()), report


@pytest.mark.filterwarnings("ignore:left in float")  # the per-layer path does not fold BatchNorm, and says so
def test_a_dict_model_torch_fx_cannot_trace_is_quantized_per_layer_and_exported():
    torch.manual_seed(0)
    model = UntraceableDictNet().eval()
    calibration = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        qmodel = quantize(model, calibration[0][:1], calibration, QuantConfig())
    assert not qmodel.netslim_traced
    data = onnx_bytes(qmodel, calibration[0][:1])
    ops = integer_ops(data)  # per layer: each conv's input and weight on the grid, the conv itself in float
    assert ops.get("QuantizeLinear", 0) == 4 and ops.get("DequantizeLinear", 0) == 8, ops
    x = torch.randn(3, 3, 32, 32)
    report = check_onnx(qmodel, data, x)
    with torch.no_grad():
        scale = max(float(t.abs().max()) for t in qmodel(x).values())
    assert report["outputs"] == 2 and report["max_abs_diff"] <= 0.05 * scale, report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert output_shapes(qmodel(x)) == [(3, 4, 32, 32), (3, 4, 16, 16)]
