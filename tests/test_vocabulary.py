"""One vocabulary across families: the target syntax and its bisection, one ``exclude``, one ``scope``,
the same config object from Python and YAML, and the deprecated spellings that still work."""
import dataclasses
import inspect
import warnings

import pytest
import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.layers import check_layer_names, covers, select_layers
from netslim.targets import Target, bisect, parse_target


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def deprecated(fn, *args, match: str = "deprecated", **kwargs):
    with pytest.warns(DeprecationWarning, match=match):
        return fn(*args, **kwargs)


# ---------------------------------------------------------------- targets
def test_parse_target_accepts_text_mapping_and_target():
    assert parse_target("macs:2") == Target("macs", 2.0)
    assert parse_target({"size": 10}) == Target("size", 10.0)
    assert parse_target(" latency : 3 ") == Target("latency", 3.0)
    assert parse_target(Target("params", 4)) == Target("params", 4.0)
    assert parse_target(None) is None
    assert str(Target("macs", 2.0)) == "macs:2" and Target("macs", 4.0).goal(100) == 25.0
    assert Target("macs", 8.0).root(3).factor == pytest.approx(2.0)


@pytest.mark.parametrize("text, message", [
    ("macs", "must look like 'macs:2'"),
    ("flops:2", "unknown target metric 'flops'; valid target metrics: macs, params, size, latency"),
    ("macs:1", "factor must be a number > 1"),
    ("macs:0.5", "factor must be a number > 1"),
    ("macs:two", "'two' is not a number"),
    ({"macs": 2, "params": 2}, "must name one metric"),
    (2.0, "must name one metric"),
])
def test_parse_target_errors_name_the_valid_choices(text, message):
    with pytest.raises(NetslimError, match=message):
        parse_target(text)


def test_a_metric_the_caller_cannot_honour_is_a_clear_error():
    with pytest.raises(NetslimError, match="metric 'macs' is not supported here; valid quantize target metrics: size"):
        parse_target("macs:2", ("size",), "quantize target")


def test_bisect_finds_the_knob_on_the_side_that_meets_the_goal():
    up = bisect(lambda k: 100 * k, 0.0, 1.0, 30.0, increasing=True, steps=30)  # largest knob with value <= 30
    assert up.knob == pytest.approx(0.3, abs=1e-6) and up.value <= 30.0
    down = bisect(lambda r: 100 * (1 - r), 0.0, 1.0, 30.0, increasing=False, steps=30)  # smallest ratio
    assert down.knob == pytest.approx(0.7, abs=1e-6) and down.value <= 30.0
    least = bisect(lambda c: 10 * c, 0.0, 10.0, 40.0, increasing=True, at_most=False, steps=30)  # >= 40
    assert least.knob == pytest.approx(4.0, abs=1e-5) and least.value >= 40.0
    carried = bisect(lambda k: (100 * k, f"plan@{k:.2f}"), 0.0, 1.0, 50.0, increasing=True, steps=3)
    assert carried.result == f"plan@{carried.knob:.2f}"
    assert bisect(lambda k: 100 + k, 0.0, 1.0, 50.0, increasing=True) is None  # unreachable


def test_bisect_exact_stops_at_the_goal():
    calls = []

    def count(x):
        calls.append(x)
        return round(10 - x)

    found = bisect(count, 0.0, 10.0, 5, increasing=False, steps=30, exact=True)
    assert found.value == 5 and len(calls) < 30


# ---------------------------------------------------------------- exclude
def test_exclude_names_are_validated_with_the_valid_names_listed():
    model = tiny()
    with pytest.raises(NetslimError, match=r"exclude: unknown layer '2\.2' \(did you mean .*\); valid layers: 0, 1, 2, 2\.0"):
        select_layers(model, nn.Conv2d, exclude=["2.2"])
    with pytest.raises(NetslimError, match=r"layers: unknown layer 'head'"):
        select_layers(model, nn.Conv2d, layers=["head"])
    with pytest.raises(NetslimError, match="exclude: unknown layer 'conv9'"):
        check_layer_names(model, ["conv9"])
    with pytest.raises(NetslimError, match="must be a list of layer names"):
        check_layer_names(model, "0")


def test_a_name_covers_its_submodules():
    model = tiny()
    assert list(select_layers(model, nn.Conv2d)) == ["0", "2.0"]
    assert list(select_layers(model, nn.Conv2d, exclude=["2"])) == ["0"]
    assert list(select_layers(model, (nn.Conv2d, nn.Linear), layers=["2"])) == ["2.0"]
    assert covers(["layer1"], "layer1.0.conv1") and not covers(["layer1"], "layer10.conv")


def test_every_family_reads_exclude_the_same_way():
    from netslim.lowrank import plan_decomposition
    from netslim.prune import magnitude_prune_
    from netslim.prune.structured import structured
    from netslim.quant import QuantConfig, quantize, share_weights_

    x = torch.randn(1, 3, 8, 8)
    pruned = magnitude_prune_(tiny(), 0.5, exclude=["2"])  # the block: its conv is left dense
    assert float((pruned[2][0].weight == 0).float().mean()) == 0.0 and float((pruned[0].weight == 0).float().mean()) > 0.3
    shared = share_weights_(tiny(), 4, 4, exclude=["2"])
    assert not hasattr(shared[2][0], "parametrizations") and hasattr(shared[0], "parametrizations")
    q = quantize(tiny(), x, [x], QuantConfig(exclude=["2"]), device="cpu")
    assert not hasattr(q.get_submodule("2.0"), "parametrizations")
    plan = plan_decomposition(tiny(), x, "spatial", "fixed", 0.5, exclude=["2"])
    assert "2.0" not in plan.layers
    small = structured(tiny(), x, ratio=0.5, exclude=["2"])
    assert small[2][0].out_channels == 8
    for call in (lambda: magnitude_prune_(tiny(), 0.5, exclude=["3.0"]),
                 lambda: share_weights_(tiny(), exclude=["3.0"]),
                 lambda: quantize(tiny(), x, [x], QuantConfig(exclude=["3.0"]), device="cpu"),
                 lambda: plan_decomposition(tiny(), x, exclude=["3.0"], value=0.5),
                 lambda: structured(tiny(), x, exclude=["3.0"])):
        with pytest.raises(NetslimError, match="exclude: unknown layer '3.0'"):
            call()


# ---------------------------------------------------------------- one config from Python and YAML
def test_stage_configs_are_the_python_configs():
    from netslim.lowrank import DecomposeConfig
    from netslim.pipeline import get_stage
    from netslim.prune.structured import structured
    from netslim.quant import QuantConfig

    assert get_stage("decompose").config is DecomposeConfig
    quant_stage = get_stage("quantize").config
    assert issubclass(quant_stage, QuantConfig)
    assert {f.name for f in dataclasses.fields(QuantConfig)} <= {f.name for f in dataclasses.fields(quant_stage)}
    channel_stage = get_stage("prune_channels").config
    shared = {f.name for f in dataclasses.fields(channel_stage)} & set(inspect.signature(structured).parameters)
    assert shared >= {"ratio", "target", "criterion", "scope", "round_to", "min_keep", "exclude", "seed", "calib_batches"}
    assert set(channel_stage().structured_options()) == shared


def test_qat_default_learner_is_the_same_in_python_and_in_the_stage():
    from netslim.pipeline import build_config
    from netslim.quant import quantization_aware_training
    from netslim.quant.qat import make_learnable_

    python_default = inspect.signature(quantization_aware_training).parameters["learn"].default
    assert python_default == inspect.signature(make_learnable_).parameters["learn"].default
    assert build_config("quantize", {"method": "ptq"}).learn == python_default == "ste"


def test_quantize_with_a_size_target_chooses_widths_under_the_budget():
    from netslim.quant import QuantConfig, quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 10)).eval()
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    q = quantize(model, calib[0][:1], calib, QuantConfig(weight_bits=8, act_bits=8, target="size:8"), device="cpu")
    plan = q.netslim_bit_plan
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert plan.weight_bytes <= weights * 4 / 8 and min(plan.bits.values()) < 8
    assert quantize(model, calib[0][:1], calib, QuantConfig(), device="cpu").netslim_bit_plan is None


def test_decompose_from_python_with_the_stage_config():
    from netslim.lowrank import DecomposeConfig, decompose
    from netslim.profile import profile

    model, x = tiny(), torch.randn(1, 3, 8, 8)
    result = decompose(model, x, DecomposeConfig(method="spatial", selector="fixed", rank=1), device="cpu")
    assert result.model is not model and isinstance(result.model[0], nn.Sequential) and isinstance(model[0], nn.Conv2d)
    assert profile(result.model, x, latency=False).macs < profile(model, x, latency=False).macs
    with pytest.raises(NetslimError, match="needs target"):
        DecomposeConfig(selector="energy_target")


def test_save_and_load_pruned_are_exported():
    from netslim.prune import structured as structured_package  # the function
    from netslim.prune.structured import load_pruned, save_pruned

    assert callable(structured_package) and callable(save_pruned) and callable(load_pruned)


def test_netslim_error_is_a_value_error():
    assert issubclass(NetslimError, ValueError)


# ---------------------------------------------------------------- deprecated spellings, one release
def test_old_scope_word_layer_means_uniform():
    from netslim.pipeline import build_config
    from netslim.prune import magnitude_masks

    old = deprecated(magnitude_masks, tiny(), 0.5, scope="layer")
    new = magnitude_masks(tiny(), 0.5, scope="uniform")
    assert all(torch.equal(old[n], new[n]) for n in new)
    with pytest.warns(DeprecationWarning):
        assert build_config("prune", {"plan": "layer"}).plan == "uniform"
    with pytest.warns(DeprecationWarning):
        assert build_config("prune", {"scope": "layer"}).plan == "uniform"
    with pytest.raises(NetslimError, match="valid scopes: uniform, global"):
        build_config("prune_channels", {"scope": "local"})


def test_old_amount_keys_become_targets():
    from netslim.pipeline import build_config

    with pytest.warns(DeprecationWarning, match="write target='macs:3'"):
        cfg = build_config("decompose", {"selector": "energy_target", "target": "macs", "reduction": 3.0})
    assert cfg.target == "macs:3" and cfg.reduction is None
    assert build_config("decompose", {"selector": "energy_target", "target": "params:2"}).target == "params:2"
    with pytest.warns(DeprecationWarning, match='target: "size:8"'):
        cfg = build_config("quantize", {"method": "ptq", "weight_bits": 8, "size_budget": 0.5})
    assert cfg.size_target == Target("size", 8.0) and cfg.size_budget is None
    with pytest.raises(NetslimError, match="valid quantize target metrics: size"):
        build_config("quantize", {"method": "ptq", "target": "macs:2"})
    with pytest.warns(DeprecationWarning, match="write calib_batches"):
        assert build_config("prune_channels", {"data_batches": 4}).calib_batches == 4
    with pytest.warns(DeprecationWarning, match="write calib_images"):
        assert build_config("prune_channels", {"calibration_images": 64}).calib_images == 64


def test_old_keyword_names_still_work_with_a_warning():
    from netslim.distill import agreement
    from netslim.lowrank import decompose_, energy_rank_search, greedy_rank_search, plan_decomposition, refit_
    from netslim.lowrank import apply_plan_
    from netslim.prune.sensitivity import sensitivity_analysis
    from netslim.prune.structured import structured
    from netslim.prune.structured.reconstruct import reconstruct_prune
    from netslim.quant import QuantConfig, quantize

    x = torch.randn(1, 3, 8, 8)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    deprecated(quantize, tiny(), x, None, QuantConfig(), device="cpu", calibration=[x], match="calibration= is deprecated")
    deprecated(structured, tiny(), x, criterion="taylor", data=loader, match="data= is deprecated")
    report, energy = deprecated(energy_rank_search, tiny(), x, reduction=1.5, target="macs", method="spatial",
                                match="target='macs:1.5'")
    assert 0 < energy <= 1
    deprecated(greedy_rank_search, tiny(), x, data=data, reduction=1.2, target="macs", method="spatial",
               progress=False, device="cpu")
    deprecated(decompose_, tiny(), x, "spatial", "fixed", 0.5, match="decompose_ is deprecated")
    model, original = tiny(), tiny()
    plan = plan_decomposition(model, x, "spatial", "fixed", 2)
    apply_plan_(model, plan)
    deprecated(refit_, model, original, layers=["0"], images=torch.randn(4, 3, 8, 8), match="images= is deprecated")
    deprecated(reconstruct_prune, tiny(), x, images=torch.randn(8, 3, 8, 8), ratio=0.25, match="images= is deprecated")
    deprecated(sensitivity_analysis, tiny(), data=data, grid=(0.0, 0.5), progress=False, device="cpu")
    deprecated(agreement, tiny(), tiny(), data=data, device="cpu")
    with pytest.raises(NetslimError, match="not both"):
        quantize(tiny(), x, [x], QuantConfig(), device="cpu", calibration=[x])
    assert deprecated(QuantConfig, calibration_batches=2, match="write calib_batches").calib_batches == 2


def test_new_names_give_no_deprecation_warning():
    from netslim.pipeline import build_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        build_config("decompose", {"selector": "energy_target", "target": "macs:2"})
        build_config("quantize", {"method": "ptq", "target": "size:6"})
        build_config("prune", {"scope": "uniform"})
        build_config("prune_channels", {"target": "macs:2", "scope": "global", "calib_batches": 2})
