import copy
import json

import pytest
import torch
from torch import nn

import netslim
from netslim import NetslimError, zoo
from netslim.lowrank import (cp_conv, decompose_, greedy_rank_search, plan_decomposition, rank_for_energy,
                             refit_, spatial_conv, svd_conv1x1, svd_linear, tucker2_conv, vbmf_rank)
from netslim.lowrank import formulas
from netslim.lowrank.apply import costs


def test_full_rank_svd_reproduces_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(64, 40)
    x = torch.randn(8, 64)
    torch.testing.assert_close(svd_linear(layer, 40)(x), layer(x), atol=1e-5, rtol=0)


def test_full_rank_svd_of_a_1x1_conv_with_stride():
    conv = nn.Conv2d(12, 20, 1, stride=2)
    x = torch.randn(2, 12, 9, 9)
    torch.testing.assert_close(svd_conv1x1(conv, 12)(x), conv(x), atol=1e-5, rtol=0)


def test_spatial_split_of_a_separable_kernel_is_exact_at_rank_one():
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=(2, 1))
    p, q = torch.randn(4, 3), torch.randn(6, 3)  # W[n, c, i, j] = p[c, i] q[n, j]: rank 1 when reshaped
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ci,nj->ncij", p, q))
    x = torch.randn(2, 4, 10, 10)
    split = spatial_conv(conv, 1)
    torch.testing.assert_close(split(x), conv(x), atol=1e-5, rtol=0)
    assert [m.kernel_size for m in split] == [(3, 1), (1, 3)]


@pytest.mark.parametrize("batchnorm", [False, True])
def test_spatial_split_at_full_rank_is_exact(batchnorm):
    conv = nn.Conv2d(5, 7, 3, padding=1)
    x = torch.randn(1, 5, 8, 8)
    torch.testing.assert_close(spatial_conv(conv, 15, batchnorm).eval()(x), conv(x), atol=1e-5, rtol=0)


def test_tucker2_at_full_ranks_and_cp_at_high_rank_reproduce_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(tucker2_conv(conv, 6, 8)(x), conv(x), atol=1e-5, rtol=0)
    err = (cp_conv(conv, 48)(x) - conv(x)).abs().max() / conv(x).abs().max()
    assert err < 1e-3


def test_the_first_layer_trap_is_refused_with_the_numbers():
    """conv 3 -> 16, 3x3: 432 params; a spatial split with D = 16 gives 144 + 768 = 912."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False))
    x = torch.randn(1, 3, 32, 32)
    assert formulas.conv_cost(3, 16, 3, 3, (32, 32)).params == 432
    assert formulas.spatial_cost(3, 16, 3, 3, 16, (32, 32), (32, 32)).params == 144 + 768
    assert formulas.spatial_break_even(3, 16, 3) == pytest.approx(7.58, abs=0.01)
    report = plan_decomposition(model, x, "spatial", "fixed", 16)
    assert report.layers["0"].skipped and "912" in report.layers["0"].skipped and "432" in report.layers["0"].skipped
    assert plan_decomposition(model, x, "spatial", "fixed", 7).layers["0"].skipped is None  # 7 < 7.58
    assert plan_decomposition(model, x, "spatial", "fixed", 8).layers["0"].skipped is not None


@pytest.mark.parametrize("method,rank", [("spatial", 5), ("cp", 6), ("tucker2", (4, 5)), ("svd", 4)])
def test_formula_counts_equal_the_built_layers(method, rank):
    conv = nn.Conv2d(8, 12, 1 if method == "svd" else 3, stride=2, padding=0 if method == "svd" else 1, bias=False)
    x = torch.randn(1, 8, 15, 15)
    out = conv(x)
    before, after = costs(conv, method, rank, tuple(x.shape), tuple(out.shape))
    built = {"spatial": lambda: spatial_conv(conv, rank), "cp": lambda: cp_conv(conv, rank),
             "tucker2": lambda: tucker2_conv(conv, *rank), "svd": lambda: svd_conv1x1(conv, rank)}[method]()
    prof = netslim.profile(built, x, latency=False)
    assert prof.params == after.params  # real small layers, no full kernel kept anywhere
    assert prof.macs == after.macs
    assert netslim.profile(conv, x, latency=False).macs == before.macs
    assert built(x).shape == out.shape


def test_vbmf_and_energy_rank_selection():
    torch.manual_seed(0)
    for true_rank in (4, 12):
        m = torch.randn(50, true_rank) @ torch.randn(true_rank, 70) + 0.05 * torch.randn(50, 70)
        assert vbmf_rank(m) == true_rank
    assert rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), 0.9) == 2
    assert rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), 1.0) == 3


def test_decompose_vgg16_halves_macs_with_spatial_split():
    model = zoo.get("vgg16")
    x = torch.randn(1, 3, 32, 32)
    before = netslim.profile(model, x, latency=False)
    report = decompose_(model, x, "spatial", "fixed", 0.25)
    after = netslim.profile(model, x, latency=False)
    assert 1.9 < before.macs / after.macs < 2.3
    assert model(x).shape == (1, 10)
    assert all(p.skipped is None for p in report.layers.values())


def test_unknown_layer_and_method_are_clear_errors():
    model = zoo.get("lenet300")
    with pytest.raises(NetslimError, match="unknown layer 'fc9'"):
        plan_decomposition(model, torch.randn(1, 1, 28, 28), layers=("fc9",), value=0.5)
    with pytest.raises(NetslimError, match="valid decompose methods"):
        plan_decomposition(model, torch.randn(1, 1, 28, 28), method="tt", value=0.5)


def test_greedy_search_reaches_the_target():
    torch.manual_seed(0)
    model = zoo.get("lenet300")
    x = torch.randn(1, 1, 28, 28)
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    report, table = greedy_rank_search(model, x, data, target="params:2", progress=False)
    before = netslim.profile(model, x, latency=False).params
    decomposed = decompose_(zoo.get("lenet300"), x, ranks={n: p.rank for n, p in report.layers.items()},
                            layers=tuple(report.layers), value=1.0)
    assert decomposed.layers and set(table) >= set(report.layers)
    m2 = zoo.get("lenet300")
    from netslim.lowrank import apply_plan_

    apply_plan_(m2, report)
    assert netslim.profile(m2, x, latency=False).params <= before / 2 + 1000  # biases are not decomposed


@pytest.mark.parametrize("method", ["spatial", "cp", "tucker2"])
def test_decomposed_model_exports_to_onnx_and_runs_in_onnxruntime(method):
    from netslim.export import onnx_bytes, run_onnx
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(2, 16, 12, 12)
    report = decompose_(model, x, method, "fixed", 0.25)
    assert all(p.skipped is None for p in report.layers.values()) and len(report.layers) == 2
    with torch.no_grad():
        expected = model(x)
    onnx_out, = run_onnx(onnx_bytes(model, x), x)
    torch.testing.assert_close(onnx_out, expected, rtol=1e-3, atol=1e-4)


def test_a_cp_rank_above_max_channels_is_kept_not_clamped():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False))
    x = torch.randn(1, 16, 8, 8)
    plan = plan_decomposition(model, x, "cp", "fixed", 2.0).layers["0"]
    assert plan.rank == 32 and plan.skipped is None  # 32 > max(N, C) = 16, still cheaper than dense
    assert plan_decomposition(model, x, "cp", "fixed", 60).layers["0"].skipped is None  # 60 * 38 = 2,280 < 2,304
    assert "2,318 params" in plan_decomposition(model, x, "cp", "fixed", 61).layers["0"].skipped


def _separable_conv(c: int, n: int, rank: int, **kw) -> nn.Conv2d:
    """A 3x3 conv whose kernel is exactly rank ``rank`` when reshaped for the spatial split."""
    conv = nn.Conv2d(c, n, 3, padding=1, **kw)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("rci,rnj->ncij", torch.randn(rank, c, 3), torch.randn(rank, n, 3)) / 4)
    return conv


def test_refit_restores_a_perturbed_last_factor_exactly():
    torch.manual_seed(0)
    original = nn.Sequential(_separable_conv(16, 16, 4, stride=2), nn.ReLU(), _separable_conv(16, 16, 4)).eval()
    model = copy.deepcopy(original)
    images = torch.randn(32, 16, 12, 12)
    report = decompose_(model, images[:1], "spatial", "fixed", 4)  # exact before the perturbation
    assert all(p.skipped is None for p in report.layers.values()) and len(report.layers) == 2
    with torch.no_grad():
        model[0][-1].weight.add_(0.3 * torch.randn_like(model[0][-1].weight))
        model[2][-1].weight.mul_(0.5)
        damaged = (model(images) - original(images)).norm() / original(images).norm()
    errors = refit_(model, original, images, ["0", "2"], positions=40, ridge=1e-9)
    assert damaged > 0.1
    assert errors["0"][0] > 0.1 and errors["0"][1] < 1e-4 and errors["2"][1] < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(model(images), original(images), atol=1e-4, rtol=1e-4)


def test_refit_compensates_upstream_errors_on_resnet20(shared):
    original = zoo.get("resnet20", weights="shared").eval()
    model = copy.deepcopy(original)
    x = torch.randn(1, 3, 32, 32)
    report = decompose_(model, x, "spatial", "fixed", 0.3)
    train = netslim.data.get("cifar10", "train")
    fit_images = torch.stack([train[i][0] for i in range(64)])
    held_out = torch.stack([train[i][0] for i in range(1000, 1128)])
    names = [n for n, p in report.layers.items() if p.skipped is None]
    with torch.no_grad():
        target = original(held_out)
        before = ((model(held_out) - target) ** 2).mean()
    errors = refit_(model, original, fit_images, names)
    with torch.no_grad():
        after = ((model(held_out) - target) ** 2).mean()
    assert len(names) >= 18 and len(errors) == len(names) and all(a <= b for b, a in errors.values())
    assert sum(b - a for b, a in errors.values()) > 0.5  # the summed relative error falls substantially
    assert after < 0.5 * before  # and the logits on unseen images move towards the original's


def test_refit_names_the_decomposed_layers_when_given_another():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    decompose_(model, torch.randn(1, 4, 10, 10), "spatial", "fixed", 0.25, layers=("1",))
    with pytest.raises(NetslimError, match="'0' is not a decomposed layer.*decomposed: 1"):
        refit_(model, nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3)), torch.randn(2, 4, 10, 10), ["0"])


def test_decompose_stage_refit_raises_accuracy_and_records_the_errors(shared, tmp_path):
    from netslim.pipeline import parse_recipe, run_recipe

    def run(refit: int, folder: str):
        doc = {"model": "lenet300", "weights": "shared", "data": "mnist", "test_limit": 1000, "stages": [
            {"decompose": {"method": "svd", "selector": "fixed", "rank": 0.04, "refit_images": refit}}]}
        metrics = run_recipe(parse_recipe(doc), tmp_path / folder, progress=False)
        return metrics[1]["top1"], json.loads((tmp_path / folder / "state.json").read_text())["artifacts"][0]

    plain, _ = run(0, "plain")
    refit, artifacts = run(512, "refit")
    errors = artifacts["refit_relative_error"]
    assert set(errors) == set(artifacts["structure"]) and all(e["after"] < e["before"] for e in errors.values())
    assert refit > plain + 0.01


def test_energy_search_meets_a_mac_target_without_overshooting(shared):
    from netslim.lowrank import apply_plan_, energy_rank_search

    model = zoo.get("vgg16", weights="shared").eval()
    x = torch.randn(1, 3, 32, 32)
    dense = netslim.profile(model, x, latency=False).macs
    report, energy = energy_rank_search(model, x, "macs:3", "spatial")
    apply_plan_(model, report)
    reduction = dense / netslim.profile(model, x, latency=False).macs
    assert 0.5 < energy < 1 and 3.0 <= reduction < 3.1
    with pytest.raises(NetslimError, match="no energy reaches 1000x fewer macs"):  # rank 1 everywhere: 167x
        energy_rank_search(zoo.get("lenet300"), torch.randn(1, 1, 28, 28), "macs:1000", "svd")


def test_energy_target_stage_meets_its_reduction(shared, tmp_path):
    from netslim.pipeline import parse_recipe, run_recipe

    doc = {"model": "lenet300", "weights": "shared", "data": "mnist", "test_limit": 500, "stages": [
        {"decompose": {"method": "svd", "selector": "energy_target", "target": "macs:4"}}]}
    metrics = run_recipe(parse_recipe(doc), tmp_path / "run", progress=False)
    energy = json.loads((tmp_path / "run" / "state.json").read_text())["artifacts"][0]["energy"]
    assert 4.0 <= metrics[1]["ratios"]["r_c"] < 4.4 and 0 < energy < 1


def test_greedy_search_for_a_latency_target_makes_the_model_faster(one_thread):
    from netslim.lowrank import apply_plan_
    from netslim.profile import measure_latency

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(128, 128, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    x = torch.randn(1, 3, 24, 24)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 24, 24), torch.randint(0, 10, (32,)))
    report, _ = greedy_rank_search(model, x, data, target="latency:1.6", method="spatial", progress=False)
    assert report.layers and set(report.layers) <= {"0", "2", "4"}
    import copy

    dense = copy.deepcopy(model)
    apply_plan_(model, report)
    # interleaved, best of three medians each: timing noise from other processes hits both alike
    pairs = [(measure_latency(dense, x, (1,), repeats=30)[1], measure_latency(model, x, (1,), repeats=30)[1])
             for _ in range(3)]
    assert min(b for b, _ in pairs) / min(a for _, a in pairs) > 1.3
    with pytest.raises(ValueError, match="macs, params, latency"):
        greedy_rank_search(model, x, data, target="energy:2", progress=False)
    from netslim.lowrank.stages import DecomposeConfig

    with pytest.raises(ValueError, match="needs selector 'target'"):
        DecomposeConfig(selector="energy_target", target="latency:2")
