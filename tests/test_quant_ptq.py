"""Integration tests of post-training quantization on the shared checkpoints (CIFAR-10 resnet20 and
mobilenetv2, MNIST lenet5): accuracy of W8A8 / low-bit models, integer execution in ONNX Runtime, the
packed ``.nsq`` file, unsupported layers, calibrators, CLE and bias correction, AdaRound, QAT, mixed
precision and the ``quantize`` recipe stage.

Everything runs on one CPU thread. Accuracies are measured on a fixed 500-image subset of the CIFAR-10
test set; calibration uses 128 images of the training set (``netslim.data.get(..., "calib")``).
"""
from __future__ import annotations

import copy
import json
import struct
import zlib

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import fx, nn
from torch.utils.data import DataLoader, Subset

from netslim import NetslimError, zoo
from netslim import data as nsdata
from netslim.quant import (CALIBRATORS, QuantConfig, layer_sensitivity, load_quantized_, plan_bits,
                           quantization_aware_training, quantize, read_quantized, save_quantized)
from netslim.export import onnx_bytes, ort_session, run_onnx
from netslim.quant.export import integer_ops
from netslim.quant.modules import ActQuant, WeightQuant
from netslim.train import TrainConfig

SUBSET = 500
CALIB_IMAGES = 128


# ---------------------------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_fixtures():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def top1(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(1) == y).float().mean())


def weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def weight_count_of(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()


def ort_logits(qmodel: nn.Module, x: torch.Tensor, example: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    model_bytes = onnx_bytes(qmodel, example)  # a quantized model: the QDQ path
    return run_onnx(ort_session(model_bytes, threads=1), x)[0], model_bytes


def weight_quantizers(model: nn.Module) -> dict[str, WeightQuant]:
    return {n[: -len(".parametrizations.weight.0")]: m for n, m in model.named_modules() if isinstance(m, WeightQuant)}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cifar(shared):
    """(images, labels) of a fixed random 500-image subset of the CIFAR-10 test set."""
    test = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:SUBSET].tolist()
    x = torch.stack([test[i][0] for i in order])
    y = torch.tensor([int(test[i][1]) for i in order])
    return x, y


@pytest.fixture(scope="module")
def calib(shared) -> list:
    """128 calibration images (training set, no augmentation) as two batches, reusable any number of times."""
    return list(DataLoader(nsdata.get("cifar10", "calib", calib_size=CALIB_IMAGES), batch_size=64))


@pytest.fixture(scope="module")
def resnet(shared) -> nn.Module:
    return zoo.get("resnet20", weights="shared").eval()


@pytest.fixture(scope="module")
def fp32_top1(resnet, cifar) -> float:
    x, y = cifar
    acc = top1(logits(resnet, x), y)
    assert acc > 0.85  # the shared checkpoint (88.6 % on the full test set)
    return acc


@pytest.fixture(scope="module")
def w8a8(resnet, cifar, calib) -> nn.Module:
    return quantize(resnet, cifar[0][:1], calib, QuantConfig(weight_bits=8, act_bits=8, per_channel=True))


@pytest.fixture(scope="module")
def w4a8(resnet, cifar, calib) -> nn.Module:
    return quantize(resnet, cifar[0][:1], calib, QuantConfig(weight_bits=4, act_bits=8))


@pytest.fixture(scope="module")
def w8a4(resnet, cifar, calib) -> nn.Module:
    return quantize(resnet, cifar[0][:1], calib, QuantConfig(weight_bits=8, act_bits=4))


# ---------------------------------------------------------------------------------------------- 1. W8A8
def test_w8a8_per_channel_keeps_resnet20_accuracy(resnet, w8a8, cifar, fp32_top1):
    x, y = cifar
    acc = top1(logits(w8a8, x), y)
    assert abs(acc - fp32_top1) <= 0.015, (acc, fp32_top1)
    assert isinstance(w8a8, fx.GraphModule)
    assert not [m for m in w8a8.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # folded
    acts = [m for m in w8a8.modules() if isinstance(m, ActQuant)]
    assert len(acts) >= 20
    assert all(bool(a.calibrated) and a.mode == "quantize" and float(a.scale) > 0 for a in acts)
    quantizers = weight_quantizers(w8a8)
    assert len(quantizers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in resnet.modules())
    assert all(q.spec.bits == 8 and q.spec.per_channel and q.scale.numel() > 1 for q in quantizers.values())
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())  # the original is untouched


# ---------------------------------------------------------------------------------------------- 2. integers
def test_w8a8_runs_as_integers_in_onnxruntime(resnet, w8a8, cifar):
    x, _ = cifar
    ort_out, model_bytes = ort_logits(w8a8, x, x[:1])
    sim = logits(w8a8, x)
    agreement = top1(ort_out, sim.argmax(1))
    assert agreement >= 0.995, agreement
    ops = integer_ops(model_bytes)
    convs = sum(isinstance(m, nn.Conv2d) for m in resnet.modules())
    assert ops.get("QLinearConv", 0) == convs, ops  # every conv runs as an integer kernel
    assert "Conv" not in ops, ops

    graph = onnx.load_from_string(model_bytes).graph
    inits = {t.name: t for t in graph.initializer}
    dq_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    int8_weights = [numpy_helper.to_array(inits[n]) for n in dq_inputs
                    if n in inits and inits[n].data_type == onnx.TensorProto.INT8]
    n_weights = weight_count(resnet)
    assert sum(w.size for w in int8_weights) == n_weights  # every weight stored as one int8
    int8_total = sum(numpy_helper.to_array(t).size for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8_total <= 1.01 * n_weights  # plus the per-channel zero points, nothing else
    float_total = sum(numpy_helper.to_array(t).size for t in graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT)
    assert float_total < 0.02 * n_weights  # no float copy of the weights left (biases and scales only)
    assert len(model_bytes) < 1.5 * n_weights  # a float32 model would be > 4 bytes per weight


# ---------------------------------------------------------------------------------------------- 3. low bit
def test_w4a8_weights_export_exactly(w4a8, cifar, fp32_top1):
    x, y = cifar
    ort_out, model_bytes = ort_logits(w4a8, x, x[:1])
    sim = logits(w4a8, x)
    assert top1(ort_out, sim.argmax(1)) >= 0.99
    assert top1(sim, y) > fp32_top1 - 0.06  # 4-bit per-channel weights, round to nearest
    graph = onnx.load_from_string(model_bytes).graph
    inits = {t.name: t for t in graph.initializer}
    codes = [numpy_helper.to_array(inits[n.input[0]]) for n in graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in inits
             and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and inits[n.input[0]].dims[0] > 1
             and len(inits[n.input[0]].dims) > 1]
    assert codes and all(c.min() >= -7 and c.max() <= 7 for c in codes)  # on the 4-bit grid


def test_w8a4_activations_export_exactly(w8a4, cifar):
    x, y = cifar
    ort_out, model_bytes = ort_logits(w8a4, x, x[:1])
    sim = logits(w8a4, x)
    assert top1(ort_out, sim.argmax(1)) >= 0.99
    assert top1(sim, y) > 0.5
    assert all(a.spec.bits == 4 for a in w8a4.modules() if isinstance(a, ActQuant))
    assert "Clip" in [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]  # the 4-bit grid


# ---------------------------------------------------------------------------------------------- 4. .nsq
def nsq_header(data: bytes) -> tuple[int, list[dict]]:
    """Length of the (zlib-compressed JSON) header and its tensor entries."""
    (hlen,) = struct.unpack("<I", data[4:8])
    return hlen, json.loads(zlib.decompress(data[8: 8 + hlen]))["tensors"]


def _nsq_breakdown(path) -> str:
    data = path.read_bytes()
    hlen, entries = nsq_header(data)
    codes = sum(e["length"] for e in entries if e["kind"] == "codes")
    raw = sum(e["length"] for e in entries if e["kind"] == "raw")
    return f"file {len(data)} B = 12 framing + header {hlen} B + codes {codes} B + raw tensors {raw} B"


def test_nsq_w8_file_is_one_byte_per_parameter(resnet, w8a8, tmp_path):
    path = save_quantized(w8a8, tmp_path / "w8.nsq")
    size, params = path.stat().st_size, sum(p.numel() for p in resnet.parameters())
    assert abs(size - params) <= 0.02 * params, \
        f"W8 .nsq {size} B vs {params} params x 1 B (ratio {size / params:.3f}); {_nsq_breakdown(path)}"


def test_nsq_w4_packs_two_weights_per_byte(resnet, w8a8, w4a8, tmp_path):
    w8 = save_quantized(w8a8, tmp_path / "w8.nsq").stat().st_size
    w4 = save_quantized(w4a8, tmp_path / "w4.nsq").stat().st_size
    n = weight_count(resnet)
    overhead = w8 - n  # header, scales, biases: the same in both files
    assert w4 < 0.55 * w8 + overhead
    assert w8 - w4 >= n / 2 - 256  # half a byte saved per weight (a little slack for header digits)
    _, entries = nsq_header((tmp_path / "w4.nsq").read_bytes())
    coded = [e for e in entries if e["kind"] == "codes"]
    assert sum(e["length"] for e in coded) == sum((int(np.prod(e["shape"])) + 1) // 2 for e in coded)
    assert all(e["bits"] == 4 for e in coded)


@pytest.mark.parametrize("which", ["w8a8", "w4a8"])
def test_nsq_round_trip_gives_identical_outputs(which, request, cifar, tmp_path):
    qmodel = request.getfixturevalue(which)
    path = save_quantized(qmodel, tmp_path / "m.nsq")
    state = read_quantized(path)
    assert set(state) == set(qmodel.state_dict())
    target = copy.deepcopy(qmodel)
    with torch.no_grad():
        for t in target.state_dict().values():
            if t.is_floating_point():
                t.mul_(0.5).add_(0.01)
    x = cifar[0][:64]
    assert not torch.equal(logits(target, x), logits(qmodel, x))
    load_quantized_(target, path)
    assert torch.equal(logits(target, x), logits(qmodel, x))


def test_nsq_corruption_is_refused(w4a8, tmp_path):
    path = save_quantized(w4a8, tmp_path / "m.nsq")
    data = bytearray(path.read_bytes())
    hlen, entries = nsq_header(bytes(data))

    flipped = bytearray(data)
    flipped[8 + hlen + 1000] ^= 0xFF  # a byte of the packed weights
    (tmp_path / "flipped.nsq").write_bytes(flipped)
    with pytest.raises(NetslimError, match="corrupt .nsq file.*checksum"):
        read_quantized(tmp_path / "flipped.nsq")

    (tmp_path / "short.nsq").write_bytes(data[: len(data) // 2])
    with pytest.raises(NetslimError, match="corrupt .nsq file"):
        read_quantized(tmp_path / "short.nsq")
    with pytest.raises(NetslimError, match="corrupt .nsq file"):
        load_quantized_(copy.deepcopy(w4a8), tmp_path / "short.nsq")

    # a consistent checksum does not excuse a header pointing outside the payload
    entries[0]["offset"] = 10**9
    new_header = zlib.compress(json.dumps({"version": 1, "tensors": entries}).encode())
    body = bytes(data[:4]) + struct.pack("<I", len(new_header)) + new_header + bytes(data[8 + hlen: -4])
    (tmp_path / "extent.nsq").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(NetslimError, match="extent of"):
        read_quantized(tmp_path / "extent.nsq")


# ---------------------------------------------------------------------------------------------- 5. odd models
class OddNet(nn.Module):
    """conv -> relu -> ConvTranspose2d -> relu -> pool -> fc -> LayerNorm -> relu -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.pool, self.flat = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        x = self.flat(self.pool(torch.relu(self.up(torch.relu(self.conv(x))))))
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def test_unsupported_layers_stay_float_with_a_warning():
    torch.manual_seed(0)
    model = OddNet().eval()
    x = torch.randn(32, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"left in float.*up \(ConvTranspose2d\).*norm \(LayerNorm\)"):
        q = quantize(model, x[:1], [x[:16], x[16:]], QuantConfig())
    assert set(weight_quantizers(q)) == {"conv", "fc1", "fc2"}
    assert not hasattr(q.up, "parametrizations") and not hasattr(q.norm, "parametrizations")
    out, ref = logits(q, x), logits(model, x)
    assert out.shape == (32, 4) and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    ort_out, _ = ort_logits(q, x, x[:1])
    assert (ort_out - out).abs().max() < 0.05 * ref.abs().max()


def test_nan_weights_are_refused():
    model = OddNet().eval()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(NetslimError, match=r"cannot quantize: non-finite values \(NaN/inf\) in fc1.weight"):
        quantize(model, x[:1], [x], QuantConfig())


# ---------------------------------------------------------------------------------------------- 6. calibrators
@pytest.mark.parametrize("calibrator", CALIBRATORS)
def test_every_calibrator_keeps_accuracy(calibrator, resnet, cifar, calib, fp32_top1):
    x, y = cifar
    q = quantize(resnet, x[:1], calib, QuantConfig(calibrator=calibrator))
    acts = [m for m in q.modules() if isinstance(m, ActQuant)]
    assert all(a.calibrator == calibrator and bool(a.calibrated) for a in acts)
    acc = top1(logits(q, x), y)
    assert acc >= fp32_top1 - 0.03, (calibrator, acc, fp32_top1)


def test_unknown_calibrator_lists_the_valid_ones():
    valid = ", ".join(sorted(CALIBRATORS))
    with pytest.raises(NetslimError, match=f"unknown calibrator 'minmx'; valid calibrators: {valid}"):
        QuantConfig(calibrator="minmx")


# ---------------------------------------------------------------------------------------------- 7. CLE, bias correction
def test_cle_and_data_free_bias_correction_on_mobilenetv2(shared, cifar, calib):
    """Per-tensor W8A8, CLE as in Nagel et al. 2019 for MobileNetV2 (ReLU6 replaced by ReLU, so that the
    chains run through the expansions); top-1 measured as integers in ONNX Runtime (the PyTorch simulation
    of mobilenetv2 on 500 images takes ~30 s on one core)."""
    x, y = cifar
    model = zoo.get("mobilenetv2", weights="shared").eval()
    plain = quantize(model, x[:1], calib, QuantConfig(per_channel=False))
    dfq = quantize(model, x[:1], calib, QuantConfig(per_channel=False, cle=True, relu6_to_relu=True,
                                                    bias_correction="data_free"))
    plain_top1 = top1(ort_logits(plain, x, x[:1])[0], y)
    dfq_top1 = top1(ort_logits(dfq, x, x[:1])[0], y)
    print(f"mobilenetv2 W8A8 per-tensor top-1: plain {plain_top1:.4f}, CLE + data-free bias correction {dfq_top1:.4f}")
    assert plain_top1 > 0.8
    assert dfq_top1 >= plain_top1 - 0.005, (dfq_top1, plain_top1)
    # CLE rescaled the weights and bias correction moved the biases
    changed = [n for n, q in weight_quantizers(dfq).items()
               if not torch.allclose(q.scale, weight_quantizers(plain)[n].scale)]
    assert len(changed) >= 19, changed  # the 19 expansion -> depthwise -> projection chains
    relu6 = [sum(isinstance(m, nn.ReLU6) for m in q.modules()) for q in (plain, dfq)]
    assert relu6[0] - relu6[1] >= 19 and sum(isinstance(m, nn.ReLU) for m in dfq.modules()) == relu6[0] - relu6[1]
    plain_biases, dfq_biases = dict(plain.named_parameters()), dict(dfq.named_parameters())
    assert any(not torch.allclose(dfq_biases[n], plain_biases[n]) for n in dfq_biases if n.endswith(".bias"))


def test_empirical_bias_correction_changes_biases_and_recovers_w4(resnet, cifar, calib):
    """W4A8 per-tensor resnet20 loses ~16 points to a shifted mean; empirical bias correction removes it."""
    x, y = cifar
    cfg = dict(weight_bits=4, per_channel=False)
    plain = quantize(resnet, x[:1], calib, QuantConfig(**cfg))
    corrected = quantize(resnet, x[:1], calib, QuantConfig(**cfg, bias_correction="empirical"))
    b_plain, b_corr = dict(plain.named_parameters()), dict(corrected.named_parameters())
    moved = [n for n in b_corr if n.endswith(".bias") and not torch.allclose(b_corr[n], b_plain[n])]
    assert len(moved) >= len(weight_quantizers(plain)) - 1
    plain_top1, corr_top1 = top1(logits(plain, x), y), top1(logits(corrected, x), y)
    print(f"resnet20 W4A8 per-tensor top-1: no correction {plain_top1:.4f}, empirical bias correction {corr_top1:.4f}")
    assert corr_top1 >= plain_top1 + 0.03, (corr_top1, plain_top1)


# ---------------------------------------------------------------------------------------------- 8. AdaRound
def test_adaround_w4a8_is_not_worse_than_rounding_to_nearest(resnet, w4a8, cifar, calib):
    x, y = cifar
    ada = quantize(resnet, x[:1], calib, QuantConfig(weight_bits=4, act_bits=8, adaround=True, adaround_iters=100,
                                                      adaround_samples=128))
    rtn_top1, ada_top1 = top1(logits(w4a8, x), y), top1(logits(ada, x), y)
    print(f"resnet20 W4A8 top-1: round to nearest {rtn_top1:.4f}, AdaRound (100 iters, 128 images) {ada_top1:.4f}")
    assert ada_top1 >= rtn_top1 - 0.005, (ada_top1, rtn_top1)
    # AdaRound chose a different rounding for some weights, still on the 4-bit grid
    name = "layer2.0.conv1"
    q_ada, q_rtn = weight_quantizers(ada)[name], weight_quantizers(w4a8)[name]
    w_ada = ada.get_submodule(name).weight.detach()
    codes = torch.round(w_ada / q_ada.scale.view(-1, 1, 1, 1))
    assert codes.abs().max() <= 7
    assert not torch.equal(w_ada, w4a8.get_submodule(name).weight.detach())
    assert torch.equal(q_ada.scale, q_rtn.scale)


# ---------------------------------------------------------------------------------------------- 9. QAT
def test_lsq_qat_learns_steps_and_stays_exportable(w8a8, cifar, shared):
    x, _ = cifar
    model = copy.deepcopy(w8a8)
    before = [float(a.scale) for a in model.modules() if isinstance(a, ActQuant)]
    train = Subset(nsdata.get("cifar10", "train", augment=True), range(512))
    quantization_aware_training(model, train, TrainConfig(epochs=1, max_steps_per_epoch=5, batch_size=32, amp=False),
                                learn="lsq", device="cpu", progress=False)
    after = [float(a.scale) for a in model.modules() if isinstance(a, ActQuant)]
    assert sum(a != b for a, b in zip(after, before)) >= len(before) // 2
    assert not model.training
    scales = [m.scale for m in model.modules() if isinstance(m, (ActQuant, WeightQuant))]
    assert all(not s.requires_grad and bool((s > 1e-12).all()) for s in scales)
    ort_out, _ = ort_logits(model, x, x[:1])
    sim = logits(model, x)
    agreement = top1(ort_out, sim.argmax(1))
    assert agreement >= 0.995, agreement


# ---------------------------------------------------------------------------------------------- 10. mixed precision
def test_mixed_precision_plan_fits_the_budget(resnet, w8a8, cifar, calib, fp32_top1):
    x, y = cifar
    probe = copy.deepcopy(w8a8)
    images = [calib[0][0][:32]]
    reference = logits(probe, x[:16])
    table = layer_sensitivity(probe, images, widths=(4, 8))
    assert torch.equal(logits(probe, x[:16]), reference)  # the probe's quantizers are restored
    assert set(table) == set(weight_quantizers(w8a8))
    assert all(t[4] >= t[8] >= 0 for t in table.values())
    budget = int(0.6 * weight_count(resnet))  # 60 % of the W8 weight bytes
    plan = plan_bits(probe, table, budget)
    assert plan.weight_bytes <= budget
    assert plan.weight_bytes == sum((weight_count_of(resnet, n) * b + 7) // 8 for n, b in plan.bits.items())
    assert min(plan.bits.values()) < 8 and max(plan.bits.values()) == 8
    mixed = quantize(resnet, x[:1], calib, QuantConfig(layer_bits=plan.bits))
    assert {n: q.spec.bits for n, q in weight_quantizers(mixed).items()} == plan.bits
    assert top1(logits(mixed, x), y) >= fp32_top1 - 0.03
    with pytest.raises(NetslimError, match="below the smallest plan"):
        plan_bits(probe, table, weight_count(resnet) // 4)


# ---------------------------------------------------------------------------------------------- 11. recipe stage
def test_quantize_stage_in_a_recipe_restores_and_resumes(shared, tmp_path):
    from netslim.pipeline import parse_recipe, restore_stage_model, run_recipe
    from netslim.pipeline.databundle import DataBundle
    from netslim.train import evaluate

    doc = {"model": "lenet5", "weights": "shared", "data": "mnist", "test_limit": 300, "calib_size": 128,
           "device": "cpu", "stages": [{"quantize": {"method": "ptq", "weight_bits": 8, "act_bits": 8}}]}
    recipe = parse_recipe(doc)
    run = tmp_path / "run"
    history = run_recipe(recipe, run, progress=False)
    assert [h["stage"] for h in history] == ["baseline", "quantize"]
    assert history[1]["top1"] >= history[0]["top1"] - 0.01

    restored = restore_stage_model(zoo.get("lenet5"), recipe, run, 0)
    saved = torch.load(run / "stages" / "00-quantize.pt", weights_only=True)
    assert set(restored.state_dict()) == set(saved)
    assert len(weight_quantizers(restored)) == 4 and all(bool(a.calibrated) for a in restored.modules()
                                                           if isinstance(a, ActQuant))
    nsq = run / "stages" / "00-quantize" / "model.nsq"  # the stage's packed weights
    assert history[1]["stored_bytes"] == nsq.stat().st_size
    bundle = DataBundle("mnist", None, 128, 300)
    assert evaluate(restored, bundle.test, device="cpu")["top1"] == history[1]["top1"]
    # the same model as quantizing directly with the stage's calibration data
    direct = quantize(zoo.get("lenet5", weights="shared"), bundle.test[0][0][None],
                      DataLoader(bundle.calib, batch_size=64), QuantConfig())
    x = torch.stack([bundle.test[i][0] for i in range(64)])
    assert torch.equal(logits(restored, x), logits(direct, x))
    assert torch.equal(logits(load_quantized_(copy.deepcopy(restored), nsq), x), logits(restored, x))

    again = run_recipe(recipe, run, progress=False)  # a resumed run: nothing left to do, same results
    assert [h["top1"] for h in again] == [h["top1"] for h in history]
    assert "resuming after 1 finished stage" in (run / "log.txt").read_text()

    bad = {**doc, "stages": [{"quantize": {"method": "ptq", "calibrator": "minmx"}}]}
    with pytest.raises(NetslimError, match="valid calibrators: " + ", ".join(sorted(CALIBRATORS))):
        parse_recipe(bad)
