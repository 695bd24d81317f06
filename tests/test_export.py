"""One ONNX exporter and one onnxruntime runner (netslim.export): float, masked, structurally pruned,
low-rank decomposed and quantized models; dynamic batch; nested outputs; latency; the check report.

Everything runs on one CPU thread with small inputs.
"""
from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from torch import nn

import netslim
from netslim import zoo
from netslim.errors import NetslimError
from netslim.export import (check_onnx, is_quantized, onnx_bytes, ort_latency_ms, ort_session, run_onnx,
                            to_onnx)
from netslim.lowrank import apply_plan_, plan_decomposition
from netslim.outputs import unflatten_like
from netslim.prune import magnitude_prune_
from netslim.prune.structured import structured
from netslim.quant import QuantConfig, quantize, to_onnx_qdq
from netslim.quant.export import integer_ops

pytestmark = pytest.mark.usefixtures("one_thread")


class TupleNet(nn.Module):
    """A classifier that also returns its features: ``(logits, features)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features


class ListNet(nn.Module):
    """Two heads returned as a list, the second at half resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.full = nn.Conv2d(16, 4, 1)
        self.coarse = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        y = self.stem(x)
        return [self.full(y), self.coarse(y)]


@pytest.fixture(scope="module")
def resnet20_w8a8() -> nn.Module:
    torch.manual_seed(0)
    model = zoo.get("resnet20").eval()
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    return quantize(model, calibration[0][:1], calibration, QuantConfig(weight_bits=8, act_bits=8))


# ---------------------------------------------------------------------------------------------- batch axis
def test_default_export_runs_at_any_batch_size_and_a_fixed_batch_is_refused_clearly():
    torch.manual_seed(0)
    model = zoo.get("resnet20").eval()
    x1 = torch.randn(1, 3, 32, 32)
    data = onnx_bytes(model, x1)
    session = ort_session(data, threads=1)
    assert session.get_inputs()[0].name == "input" and session.get_outputs()[0].name == "output"
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 5, 64):
        report = check_onnx(model, session, torch.randn(batch, 3, 32, 32))
        assert report["outputs"] == 1 and report["max_abs_diff"] < 1e-4, (batch, report)
        assert report["top1_agreement"] == 1.0
    fixed = ort_session(onnx_bytes(model, x1, dynamic_batch=False), threads=1)
    assert fixed.get_inputs()[0].shape[0] == 1
    with pytest.raises(NetslimError, match="dynamic_batch=False"):
        run_onnx(fixed, torch.randn(2, 3, 32, 32))


def test_to_onnx_writes_the_file_atomically_and_returns_its_path(tmp_path):
    model = TupleNet().eval()
    path = to_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "sub" / "net.onnx")
    assert path == tmp_path / "sub" / "net.onnx" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["net.onnx"]  # no temporary file left behind
    onnx.checker.check_model(onnx.load(path))
    assert run_onnx(path, torch.randn(3, 3, 16, 16))[0].shape == (3, 10)


# ---------------------------------------------------------------------------------------------- nested outputs
def test_a_tuple_output_becomes_two_onnx_outputs_in_order():
    torch.manual_seed(0)
    model = TupleNet().eval()
    data = onnx_bytes(model, torch.randn(1, 3, 16, 16))
    assert [o.name for o in ort_session(data).get_outputs()] == ["output_0", "output_1"]
    x = torch.randn(4, 3, 16, 16)
    logits, features = run_onnx(data, x)
    with torch.no_grad():
        ref_logits, ref_features = model(x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-5)
    report = check_onnx(model, data, x)
    assert report["outputs"] == 2 and report["top1_agreement"] is None and report["max_abs_diff"] < 1e-4


def test_a_list_output_is_rebuilt_with_unflatten_like():
    torch.manual_seed(0)
    model = ListNet().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    rebuilt = unflatten_like(reference, run_onnx(onnx_bytes(model, x[:1]), x))
    assert isinstance(rebuilt, list) and [t.shape for t in rebuilt] == [(2, 4, 16, 16), (2, 2, 8, 8)]
    for got, want in zip(rebuilt, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- every kind of model
def test_masked_pruned_decomposed_and_float_models_export_alike():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    masked = zoo.get("resnet20").eval()
    magnitude_prune_(masked, sparsity=0.7)
    assert any(hasattr(m, "parametrizations") for m in masked.modules())
    slim = structured(zoo.get("resnet20").eval(), x[:1], ratio=0.5)
    decomposed = zoo.get("vgg16").eval()
    plan = plan_decomposition(decomposed, x[:1], "auto", "fixed", 0.5)
    apply_plan_(decomposed, plan)
    for name, model in {"masked": masked, "structured": slim, "low-rank": decomposed}.items():
        report = check_onnx(model, onnx_bytes(model, x[:1]), x)
        assert report["max_abs_diff"] < 1e-3 and report["top1_agreement"] == 1.0, (name, report)
    assert any(hasattr(m, "parametrizations") for m in masked.modules())  # the model itself is unchanged


def test_quantized_resnet20_exports_as_integers_and_runs_at_batch_1_and_64(resnet20_w8a8, tmp_path):
    assert is_quantized(resnet20_w8a8) and not is_quantized(zoo.get("resnet20"))
    path = to_onnx(resnet20_w8a8, torch.randn(1, 3, 32, 32), tmp_path / "w8a8.onnx")
    ops = integer_ops(path.read_bytes())
    convs = sum(isinstance(m, nn.Conv2d) for m in zoo.get("resnet20").modules())
    assert ops.get("QLinearConv", 0) == convs and "Conv" not in ops, ops  # every conv runs on integers
    session = ort_session(path, threads=1)
    torch.manual_seed(1)
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32)
        report = check_onnx(resnet20_w8a8, session, x)
        with torch.no_grad():
            scale = float(resnet20_w8a8(x).abs().max())
        assert report["max_abs_diff"] <= 0.05 * scale, (batch, report, scale)
        assert report["top1_agreement"] >= 0.9, (batch, report)
    legacy = to_onnx_qdq(resnet20_w8a8, torch.randn(1, 3, 32, 32), tmp_path / "legacy.onnx")  # old name kept
    assert run_onnx(legacy, torch.randn(64, 3, 32, 32))[0].shape == (64, 10)


# ---------------------------------------------------------------------------------------------- runner
def test_ort_latency_ms_gives_one_median_per_batch_size():
    model = TupleNet().eval()
    x = torch.randn(1, 3, 16, 16)
    data = onnx_bytes(model, x)
    latency = ort_latency_ms(data, x, batch_sizes=(1, 8), threads=1, repeats=5, warmup=1)
    assert set(latency) == {1, 8} and all(v > 0 for v in latency.values())
    assert set(ort_latency_ms(ort_session(data, threads=1), x, repeats=3)) == {1}


def test_runner_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(NetslimError, match="does not exist"):
        ort_session(tmp_path / "missing.onnx")
    data = onnx_bytes(TupleNet().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(NetslimError, match="takes 1 inputs"):
        run_onnx(data, (torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)))
    with pytest.raises(NetslimError, match="example input"):
        onnx_bytes(TupleNet().eval(), "not a tensor")
    one_output = onnx_bytes(nn.Conv2d(3, 4, 1).eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(NetslimError, match="has 1 outputs, the PyTorch model 2"):
        check_onnx(ListNet().eval(), one_output, torch.randn(1, 3, 16, 16))


def test_old_entry_points_still_work():
    import netslim.quant as quant
    from netslim.quant.export import ort_session as quant_ort_session

    assert quant.ort_session is ort_session and quant_ort_session is ort_session
    assert callable(quant.onnx_qdq_bytes) and callable(netslim.export.to_onnx)


def test_export_leaves_no_warnings_escaping_and_the_model_in_training_mode():
    model = TupleNet().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onnx_bytes(model, torch.randn(1, 3, 16, 16))
    assert model.training
