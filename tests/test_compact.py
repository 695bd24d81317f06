"""Compact and transferred filters (netslim.compact): blocks from a trained conv's weights, their cost
formulas, refit, selection, the replace stage, ONNX and save/load."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import netslim
from netslim import data, zoo
from netslim.compact import (BLOCKS, ReplaceConfig, bsconv_u, crelu, depthwise_separable, fire, plan_replacement,
                             replace)
from netslim.errors import NetslimError

X32 = torch.randn(1, 3, 32, 32)


def _conv(o=12, c=8, k=3, stride=1, bias=True, weight=None):
    conv = nn.Conv2d(c, o, k, stride, k // 2, bias=bias)
    if weight is not None:
        with torch.no_grad():
            conv.weight.copy_(weight)
    return conv


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max() / b(x).abs().max())


@pytest.mark.parametrize("stride", [1, 2])
def test_separable_blocks_reproduce_exactly_separable_kernels(stride):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 11)
    p, d = torch.randn(12, 8), torch.randn(8, 3, 3)        # W[o, i] = P[o, i] D[i]: depthwise then pointwise
    dw_kernel = _conv(stride=stride, weight=p[:, :, None, None] * d[None])
    assert _max_diff(depthwise_separable(dw_kernel, 1), dw_kernel, x) < 1e-5
    w, bp = torch.randn(12, 8), torch.randn(12, 3, 3)      # W[o, i] = w[o, i] B[o]: BSConv-U's blueprints
    bs_kernel = _conv(stride=stride, weight=w[:, :, None, None] * bp[:, None])
    assert _max_diff(bsconv_u(bs_kernel, 1), bs_kernel, x) < 1e-5
    dense = _conv(stride=stride)                            # any kernel at full rank k^2
    assert _max_diff(depthwise_separable(dense, 9), dense, x) < 1e-5 and _max_diff(bsconv_u(dense, 9), dense, x) < 1e-5
    # the wrong form is not reproduced at rank 1: the test can fail
    assert _max_diff(depthwise_separable(bs_kernel, 1), bs_kernel, x) > 1e-2


def test_fire_and_crelu_reproduce_kernels_of_their_form():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    squeeze, expand = torch.randn(4, 8), torch.randn(12, 4, 3, 3)
    centre = torch.zeros(12, dtype=torch.bool)
    centre[torch.randperm(12)[:6]] = True                   # half the filters live in the centre tap only
    expand[centre] *= torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float)
    conv = _conv(weight=torch.einsum("oskl,si->oikl", expand, squeeze))
    block = fire(conv, 4, expand1x1=0.5)
    assert block[1][0].out_channels == 6 and _max_diff(block, conv, x) < 1e-5
    assert _max_diff(fire(conv, 2, 0.5), conv, x) > 1e-2   # squeezing below the kernel's rank loses
    half = torch.randn(6, 8, 3, 3)
    perm = torch.randperm(12)
    paired = _conv(weight=torch.cat([half, -half])[perm])
    with torch.no_grad():
        paired.bias.copy_(torch.cat([paired.bias[:6], -paired.bias[:6]])[perm])
    assert _max_diff(crelu(paired), paired, x) < 1e-5
    assert _max_diff(crelu(_conv()), _conv(), x) > 1e-2


@pytest.mark.parametrize("block,width", [("separable", 2), ("bsconv", 3), ("fire", 5), ("crelu", 1)])
@pytest.mark.parametrize("stride,bias", [(1, True), (2, False)])
def test_formula_counts_equal_the_built_block(block, width, stride, bias):
    conv = _conv(o=16, c=10, stride=stride, bias=bias)
    x = torch.randn(1, 10, 14, 14)
    built = BLOCKS[block].build(conv, width)
    with torch.no_grad():
        out_hw = conv(x).shape[-2:]
    cost = BLOCKS[block].cost(conv, width, x.shape[-2:], out_hw)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        built(x)
    assert cost.params == sum(p.numel() for p in built.parameters())
    assert cost.macs == counter.get_total_flops() // 2 == netslim.profile(built, x, latency=False).macs


def test_skipped_layers_are_reported_with_numbers_and_reasons():
    model = zoo.get("resnet20")
    plan = plan_replacement(model, X32, "separable", 1.0)           # rank k^2 costs more than the dense conv
    assert all(p.skipped and "would not save: params" in p.skipped for p in plan.layers.values())
    plan = plan_replacement(model, X32, "crelu")
    assert plan.layers["layer1.0.conv2"].skipped == ("negated filters not valid: its output goes to batch_norm -> "
                                                     "add, not to a ReLU")
    assert plan.layers["layer1.0.conv1"].skipped is None and "| layer1.0.conv2 | crelu |" in plan.markdown()
    vgg = plan_replacement(zoo.get("vgg16"), X32, "crelu")  # conv -> BN -> in-place ReLU (read again after)
    assert vgg.replaced == list(vgg.layers) and len(vgg.replaced) == 13


def test_bad_configs_are_clear_errors():
    with pytest.raises(NetslimError, match="unknown compact block 'sepa'.*separable"):
        ReplaceConfig(block="sepa")
    with pytest.raises(NetslimError, match="width must be"):
        ReplaceConfig(width=1.5)
    with pytest.raises(NetslimError, match="needs target"):
        ReplaceConfig(selector="target")
    with pytest.raises(NetslimError, match="metric 'latency' is not supported.*macs, params"):
        ReplaceConfig(selector="target", target="latency:2")
    with pytest.raises(NetslimError, match="unknown layer 'layer9'"):
        replace(zoo.get("resnet20"), X32, ReplaceConfig(exclude=["layer9"]), progress=False)
    with pytest.raises(NetslimError, match="needs calib_data"):
        replace(zoo.get("resnet20"), X32, ReplaceConfig(refit_images=8), progress=False)
    with pytest.raises(NetslimError, match="crelu reaches only"):
        replace(zoo.get("resnet20"), X32, ReplaceConfig(block="crelu", selector="target", target="macs:3"),
                progress=False)
    from netslim.pipeline.stages import build_config
    with pytest.raises(NetslimError, match="unknown key 'blocks' in stage 'replace'; valid keys: block"):
        build_config("replace", {"blocks": "fire"})


@pytest.mark.parametrize("block", ["separable", "bsconv", "fire", "crelu"])
def test_swapped_resnet20_meets_its_target_refit_lowers_error_and_runs_in_onnxruntime(shared, block, tmp_path):
    from netslim.export import check_onnx, to_onnx
    model = zoo.get("resnet20", weights="shared").eval()
    cfg = (ReplaceConfig(block=block, refit_images=64) if block == "crelu"
           else ReplaceConfig(block=block, selector="target", target="macs:2", refit_images=64))
    result = replace(model, X32, cfg, calib_data=data.get("cifar10", "train"), device="cpu", progress=False)
    dense, small = (netslim.profile(m, X32, latency=False) for m in (model, result.model))
    reduction = dense.macs / small.macs
    assert (1.2 <= reduction < 2.0 if block == "crelu" else 2.0 <= reduction < 2.2) and small.params < dense.params
    errors = result.details["refit_relative_error"]
    assert set(errors) == set(result.plan.replaced)
    assert all(e["after"] <= e["before"] for e in errors.values())
    assert sum(e["after"] for e in errors.values()) < 0.9 * sum(e["before"] for e in errors.values())
    x = data.image_batch(data.get("cifar10", "test"), 8)
    to_onnx(result.model, x, tmp_path / "m.onnx")
    check = check_onnx(result.model, tmp_path / "m.onnx", x)
    assert check["max_abs_diff"] < 1e-3 and check["top1_agreement"] == 1.0


@pytest.mark.parametrize("block", ["separable", "fire"])
def test_swapped_torchvision_model_runs_in_onnxruntime(block, tmp_path):
    from netslim.export import check_onnx, to_onnx
    torch.manual_seed(0)
    model = zoo.get("torchvision:resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    result = replace(model, x, ReplaceConfig(block=block, width=0.25), device="cpu", progress=False)
    assert len(result.plan.replaced) >= 15
    assert netslim.profile(result.model, x, latency=False).macs < netslim.profile(model, x, latency=False).macs / 2
    to_onnx(result.model, x, tmp_path / "tv.onnx")
    assert check_onnx(result.model, tmp_path / "tv.onnx", x)["max_abs_diff"] < 1e-3


def test_replace_stage_in_a_recipe_resumes_and_saves(shared, tmp_path):
    from netslim.pipeline import parse_recipe, restore_stage_model, run_recipe
    doc = {"model": "resnet20", "weights": "shared", "data": "cifar10", "test_limit": 300, "stages": [
        {"replace": {"block": "fire", "selector": "target", "target": "macs:2", "refit_images": 64}}]}
    recipe = parse_recipe(doc)
    metrics = run_recipe(recipe, tmp_path / "run", progress=False)
    artifacts = json.loads((tmp_path / "run" / "state.json").read_text())["artifacts"][0]
    assert metrics[1]["ratios"]["r_c"] >= 2.0 and metrics[1]["top1"] > 0.3
    assert set(artifacts["refit_relative_error"]) == set(artifacts["structure"]) and artifacts["skipped"] == {}
    restored = restore_stage_model(zoo.get("resnet20"), recipe, tmp_path / "run", 0).eval()
    replaced = replace(zoo.get("resnet20", weights="shared"), X32, recipe.stages[0].config,
                       calib_data=data.get("cifar10", "train"), device="cpu", progress=False).model.eval()
    x = data.image_batch(data.get("cifar10", "test"), 4)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), replaced(x), rtol=1e-4, atol=1e-4)
    for block in ("fire", "crelu"):  # the custom Concat / NegConcat round-trip through netslim.save / load
        model = replace(zoo.get("resnet20", weights="shared"), X32, ReplaceConfig(block=block, width=0.5),
                        device="cpu", progress=False).model.eval()
        netslim.save(model, tmp_path / f"{block}.pt", arch="resnet20", example_input=x)
        loaded = netslim.load(tmp_path / f"{block}.pt").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
