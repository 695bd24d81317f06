"""search.cost: devices, measured latency and the per-layer latency lookup table cached on disk."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.search.cost import (DEVICES, FORMULAS, LatencyTable, check_prediction, formula, measure_ms,
                                 parse_device)


def small_cnn(c: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10),
    ).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)


def table(tmp_path, name: str = "torch-cpu", **kw) -> LatencyTable:
    return LatencyTable(parse_device(name), tmp_path / f"{name}.json", warmup=1, repeats=5, **kw)


# ------------------------------------------------------------------------------------------ devices
def test_unknown_device_lists_all_devices():
    with pytest.raises(NetslimError) as info:
        parse_device("tpu")
    message = str(info.value)
    assert "'tpu'" in message and "\n" not in message
    assert all(d in message for d in DEVICES)


@pytest.mark.parametrize("threads,batch", [(0, 1), (1, 0), (1.5, 1), (True, 1), ("2", 1)])
def test_bad_threads_or_batch(threads, batch):
    with pytest.raises(NetslimError, match="integer >= 1"):
        parse_device("torch-cpu", threads=threads, batch=batch)


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NetslimError, match="torch-cuda.*CUDA"):
        parse_device("torch-cuda")


def test_device_key_has_runtime_version():
    import onnxruntime

    ort = parse_device("ort-cpu", threads=2, batch=4)
    assert ort.key.startswith("ort-cpu_t2_b4_") and onnxruntime.__version__ in ort.key
    tc = parse_device("torch-cpu")
    assert torch.__version__ in tc.key and "/" not in tc.key and ort.key != tc.key


def test_default_path_under_netslim_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSLIM_CACHE", str(tmp_path))
    t = LatencyTable(parse_device("torch-cpu"))
    assert t.path == tmp_path / "latency" / f"{t.device.key}.json"


# ------------------------------------------------------------------------------------------ caching
def test_second_table_measures_nothing(tmp_path, x):
    model = small_cnn()
    first = table(tmp_path)
    p1 = first.predict(model, x)
    assert first.misses == 5 and p1.total_ms > 0 and set(p1.units_ms) == {"0", "3", "5", "7", "11"}
    assert (tmp_path / "torch-cpu.json").is_file() and not first.dirty

    second = table(tmp_path)
    p2 = second.predict(model, x)
    assert second.misses == 0 and second.hits == 5
    assert p2.total_ms == pytest.approx(p1.total_ms)


def test_calibration_is_cached_too(tmp_path, x):
    model = small_cnn()
    first = table(tmp_path)
    first.calibrate(model, x)
    p1 = first.predict(model, x)
    second = table(tmp_path)
    p2 = second.predict(model, x)
    assert second.misses == 0 and p2.residual_ms == pytest.approx(p1.residual_ms)
    assert p2.total_ms == pytest.approx(p1.total_ms)


def test_key_distinguishes_input_shapes(tmp_path):
    t = table(tmp_path)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    t.unit_ms(conv, (1, 8, 8, 8))
    t.unit_ms(conv, (1, 8, 8, 8))
    t.unit_ms(conv, (1, 8, 16, 16))
    t.unit_ms(conv, (7, 8, 16, 16))  # the batch is always the device's
    assert (t.misses, t.hits) == (2, 2) and len(t.entries) == 2
    assert t.signature(conv, (1, 8, 8, 8)) != t.signature(nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 8, 8))


def test_corrupt_cache_file_starts_empty(tmp_path, x):
    path = tmp_path / "torch-cpu.json"
    path.write_bytes(b"\x00\xff{{garbage[[" * 10)
    with pytest.warns(UserWarning, match="ignoring the latency table"):
        t = table(tmp_path)
    assert t.entries == {} and t.overhead_ms is None
    t.predict(small_cnn(), x)
    assert t.misses == 5
    assert json.loads(path.read_text())["entries"]  # the garbage was replaced by a valid table


def test_table_of_another_device_is_not_used(tmp_path, x):
    t = table(tmp_path)
    t.predict(small_cnn(), x)
    data = json.loads((tmp_path / "torch-cpu.json").read_text())
    data["device"] = "torch-cpu_t8_b1_torch-0.0"
    (tmp_path / "torch-cpu.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="measured on"):
        other = table(tmp_path)
    assert other.entries == {}


# ------------------------------------------------------------------------------------------ prediction
@pytest.mark.parametrize("name", ["ort-cpu", "torch-cpu"])
def test_prediction_against_measurement(tmp_path, x, name):
    dense = small_cnn(32)
    t = LatencyTable(parse_device(name), tmp_path / f"{name}.json", warmup=2, repeats=15)
    measured = t.calibrate(dense, x)
    assert measured > 0 and t.reference_volume > 0
    check = check_prediction(t, dense, x)
    assert check["predicted_ms"] > 0 and check["measured_ms"] > 0 and math.isfinite(check["error"])
    assert check["error"] == pytest.approx(check["predicted_ms"] / check["measured_ms"] - 1)

    halved = t.predict(small_cnn(16), x)  # every layer's channels halved
    assert 0 < halved.total_ms < t.predict(dense, x).total_ms


def test_units_include_lowrank_factors(tmp_path, x):
    model = small_cnn()
    model[3] = nn.Sequential(nn.Conv2d(16, 4, (3, 1), padding=(1, 0), bias=False), nn.Conv2d(4, 16, (1, 3), padding=(0, 1)))
    units = table(tmp_path).units(model, x)
    assert [u[0] for u in units] == ["0", "3.0", "3.1", "5", "7", "11"]
    assert units[2][2] == (1, 4, 16, 16) and units[-1][2] == (1, 32)
    assert not any(u[3] for u in units)


def test_quantized_model_units_and_ort_predict(tmp_path, x):
    from netslim.quant import QuantConfig, quantize

    qmodel = quantize(small_cnn(), x, [torch.randn(4, 3, 16, 16)], QuantConfig(8, 8), device="cpu")
    t = table(tmp_path, "ort-cpu")
    units = t.units(qmodel, x)
    assert len(units) == 5 and all(q for *_, q in units)
    prediction = t.predict(qmodel, x)
    assert prediction.total_ms > 0 and t.misses == 5
    assert all("int8" in k for k in t.entries)
    assert measure_ms(t.device, qmodel, x, warmup=1, repeats=3) > 0

    # torch runs netslim's quantized layers as float: the same entries as the float model
    tt = table(tmp_path, "torch-cpu")
    tt.predict(small_cnn(), x)
    tt.predict(qmodel, x)
    assert tt.misses == 5 and tt.hits == 5


def test_weight_only_quantization_is_not_int8(tmp_path, x):
    from netslim.quant import QuantConfig, quantize

    qmodel = quantize(small_cnn(), x, None, QuantConfig(8, 0), device="cpu")
    assert not any(q for *_, q in table(tmp_path, "ort-cpu").units(qmodel, x))


# ------------------------------------------------------------------------------------------ formulas
def test_formula_matches_profile(x):
    from netslim.profile import profile

    model = small_cnn()
    report = profile(model, x, latency=False)
    assert formula(model, x, "macs") == report.macs
    assert formula(model, x, "params") == report.params


def test_unknown_formula_lists_formulas(x):
    with pytest.raises(NetslimError) as info:
        formula(small_cnn(), x, "latency")
    assert all(f in str(info.value) for f in FORMULAS)


def test_measure_ms_leaves_model_unchanged(x):
    model = small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert measure_ms(parse_device("torch-cpu", batch=2), model, x, warmup=1, repeats=3) > 0
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_onnxruntime_names_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(NetslimError, match=r"netslim\[deploy\]"):
        parse_device("ort-cpu")


@pytest.mark.parametrize("name", ["torch-cpu", "ort-cpu"])
def test_paired_timing_orders_a_model_of_far_more_work(name):
    from netslim.search.cost import paired_ms

    small, big = small_cnn(4), small_cnn(64)  # 256x the MACs of the middle layers
    device = parse_device(name, threads=1, batch=8)
    big_ms, small_ms = paired_ms(device, big, small, torch.randn(1, 3, 32, 32), pairs=20, warmup=2)
    assert big_ms > 2 * small_ms > 0
    assert not small.training  # timing leaves the modules as they were


def test_paired_timing_takes_onnx_bytes_on_onnxruntime_only(x):
    from netslim.export import onnx_bytes
    from netslim.search.cost import paired_ms

    graph = onnx_bytes(small_cnn(8), x[:1])
    a, b = paired_ms(parse_device("ort-cpu"), graph, small_cnn(8), x, pairs=5, warmup=1)
    assert a > 0 and b > 0
    with pytest.raises(NetslimError, match="ONNX bytes run on ort-cpu only"):
        paired_ms(parse_device("torch-cpu"), graph, small_cnn(8), x, pairs=5)
