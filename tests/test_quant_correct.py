"""Data-free quantization corrections (Nagel et al. 2019: equalization, bias absorption, bias correction)
and AdaRound (Nagel et al. 2020). Small float models with BatchNorm folded (or none); all on CPU, fast."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from netslim import NetslimError, zoo
from netslim.quant.adaround import adaround_weight, learn_rounding
from netslim.quant.equalize import (absorb_high_biases_, bias_correction_, cross_layer_equalize_,
                                    equalization_pairs, expected_clipped_output, expected_relu_output)
from netslim.quant.qspec import QuantSpec, fake_quantize, qparams


# ---------------------------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


class SmallNet(nn.Module):
    """conv -> relu -> conv -> relu -> pool -> flatten -> fc -> relu -> fc: chains (c1, c2) and (fc1, fc2)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 16, 3, padding=1), act()
        self.c2, self.a2 = nn.Conv2d(16, 16, 3, padding=1), act()
        self.pool, self.flat = nn.AdaptiveAvgPool2d(2), nn.Flatten()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.a2(self.c2(self.a1(self.c1(x)))))
        return self.fc2(F.relu(self.fc1(self.flat(x))))


def separable(act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """1x1 -> depthwise 3x3 -> 1x1, the MobileNet block (without BN)."""
    return nn.Sequential(nn.Conv2d(4, 12, 1), act(), nn.Conv2d(12, 12, 3, padding=1, groups=12), act(),
                         nn.Conv2d(12, 6, 1))


def out_ranges(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().abs().flatten(1).amax(1)


def in_ranges(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().abs()
    depthwise = isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels
    return w.flatten(1).amax(1) if depthwise else w.transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def imbalance_(first: nn.Module, second: nn.Module, seed: int = 0) -> None:
    """Scale output channels of ``first`` by 10^U(-2, 2) and undo it on ``second``: same function."""
    g = torch.Generator().manual_seed(seed)
    s = 10 ** (torch.rand(first.weight.shape[0], generator=g) * 4 - 2)
    first.weight.mul_(s.view(-1, *[1] * (first.weight.dim() - 1)))
    first.bias.mul_(s)
    depthwise = isinstance(second, nn.Conv2d) and second.groups == second.in_channels == second.out_channels
    second.weight.div_(s.view(-1, 1, 1, 1) if depthwise else s.view(1, -1, *[1] * (second.weight.dim() - 2)))


def quantize_weights(model: nn.Module, bits: int) -> nn.Module:
    """A copy with every conv/linear weight fake-quantized per tensor (symmetric)."""
    q = copy.deepcopy(model)
    spec = QuantSpec(bits=bits)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                amax = m.weight.abs().max()
                m.weight.copy_(fake_quantize(m.weight, *qparams(-amax, amax, spec), spec))
    return q


def fold_batchnorms_(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d that directly follows a Conv2d in a Sequential into it (BN -> Identity)."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return model


# ------------------------------------------------------------------------------------ chain discovery
def test_equalization_pairs_on_a_small_net():
    # the pool + flatten between c2 and fc1 break that pair; F.relu between fc1 and fc2 is homogeneous
    assert equalization_pairs(SmallNet()) == [("c1", "c2"), ("fc1", "fc2")]
    assert equalization_pairs(separable()) == [("0", "2", "4")]


def test_equalization_pairs_need_a_single_consumer_and_no_batchnorm():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + self.c(h)  # a's output feeds two layers

    assert equalization_pairs(Branchy()) == []
    assert equalization_pairs(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))) == []


def test_untraceable_model_gives_no_pairs_and_a_warning():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x

    with pytest.warns(UserWarning, match="cannot trace"):
        assert equalization_pairs(DataDependent()) == []


def test_mobilenetv2_chains_after_folding():
    model = fold_batchnorms_(zoo.get("mobilenetv2").eval())
    # Without ReLU6: only linear-bottleneck projections feeding the next block's 1x1 conv directly, which
    # happens where neither block has a residual add: block 1 -> block 2 and block 17 -> the last 1x1 conv.
    assert equalization_pairs(model) == [("features.1.conv.1", "features.2.conv.0.0"),
                                         ("features.17.conv.2", "features.18.0")]
    # Through ReLU6: stem -> dw -> project of block 1, expand -> dw -> project of blocks 2..17, plus those two.
    chains = equalization_pairs(model, through_relu6=True)
    expected = ([("features.0.0", "features.1.conv.0.0", "features.1.conv.1"),
                 ("features.1.conv.1", "features.2.conv.0.0")]
                + [(f"features.{i}.conv.0.0", f"features.{i}.conv.1.0", f"features.{i}.conv.2") for i in range(2, 18)]
                + [("features.17.conv.2", "features.18.0")])
    assert sorted(chains) == sorted(expected)


# ------------------------------------------------------------------------------ cross-layer equalization
def test_cle_keeps_the_function_and_equalizes_ranges():
    torch.manual_seed(0)
    net = SmallNet().eval()
    imbalance_(net.c1, net.c2)
    x = torch.randn(4, 3, 8, 8)
    before = net(x)
    assert cross_layer_equalize_(net) == [("c1", "c2"), ("fc1", "fc2")]
    assert (net(x) - before).abs().max() < 1e-4
    for a, b in [(net.c1, net.c2), (net.fc1, net.fc2)]:
        torch.testing.assert_close(out_ranges(a), in_ranges(b), rtol=1e-4, atol=0)


def test_cle_on_a_depthwise_chain_converges_to_equal_ranges():
    torch.manual_seed(1)
    net = separable().eval()
    imbalance_(net[0], net[2])
    x = torch.randn(2, 4, 6, 6)
    before = net(x)
    assert cross_layer_equalize_(net, iterations=100) == [("0", "2", "4")]
    assert (net(x) - before).abs().max() < 1e-4
    r1, r2, r3 = out_ranges(net[0]), in_ranges(net[2]), in_ranges(net[4])
    torch.testing.assert_close(r1, r2, rtol=1e-3, atol=0)
    torch.testing.assert_close(r2, r3, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_cle_reduces_per_tensor_quantization_error(bits):
    torch.manual_seed(2)
    net = SmallNet().eval()
    imbalance_(net.c1, net.c2, seed=1)
    imbalance_(net.fc1, net.fc2, seed=2)
    x = torch.randn(16, 3, 8, 8)
    ref = net(x)
    err_before = (quantize_weights(net, bits)(x) - ref).pow(2).mean()
    cross_layer_equalize_(net)
    err_after = (quantize_weights(net, bits)(x) - ref).pow(2).mean()
    assert err_after < 0.5 * err_before


def test_relu6_chain_skipped_without_the_flag_and_converted_with_it():
    torch.manual_seed(3)
    net = separable(nn.ReLU6).eval()
    imbalance_(net[0], net[2])
    w = [m.weight.clone() for m in (net[0], net[2], net[4])]
    assert cross_layer_equalize_(net) == []
    assert all(torch.equal(a, m.weight) for a, m in zip(w, (net[0], net[2], net[4])))
    assert isinstance(net[1], nn.ReLU6) and isinstance(net[3], nn.ReLU6)

    as_relu = copy.deepcopy(net)
    as_relu[1], as_relu[3] = nn.ReLU(), nn.ReLU()
    assert cross_layer_equalize_(net, relu6_to_relu=True) == [("0", "2", "4")]
    assert type(net[1]) is nn.ReLU and type(net[3]) is nn.ReLU
    x = torch.randn(2, 4, 6, 6) * 5
    assert (net(x) - as_relu(x)).abs().max() < 1e-4
    assert not torch.allclose(w[0], net[0].weight)


def test_cle_on_folded_mobilenetv2_keeps_the_relu_function():
    torch.manual_seed(4)
    model = fold_batchnorms_(zoo.get("mobilenetv2").eval())
    reference = copy.deepcopy(model)
    for name, m in list(reference.named_modules()):
        if isinstance(m, nn.ReLU6) and name != "features.18.2":  # the last ReLU6 feeds the pooling: no chain
            parent, _, leaf = name.rpartition(".")
            setattr(reference.get_submodule(parent), leaf, nn.ReLU())
    chains = cross_layer_equalize_(model, relu6_to_relu=True)
    assert len(chains) == 19
    assert [n for n, m in model.named_modules() if isinstance(m, nn.ReLU6)] == ["features.18.2"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = reference(x), model(x)
    assert (out - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def test_cle_rejects_bad_iterations():
    with pytest.raises(NetslimError):
        cross_layer_equalize_(SmallNet(), iterations=0)


# ------------------------------------------------------------------ bias absorption and bias correction
def test_expected_relu_output_matches_monte_carlo():
    torch.manual_seed(5)
    mean = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0, -1.0])
    std = torch.tensor([0.5, 1.0, 2.0, 0.7, 1.5, 3.0])
    z = mean[:, None] + std[:, None] * torch.randn(6, 400_000)
    torch.testing.assert_close(expected_relu_output(mean, std), z.relu().mean(1), rtol=0.01, atol=0)
    torch.testing.assert_close(expected_clipped_output(mean, std, 0.0, 6.0), z.clamp(0, 6).mean(1), rtol=0.01, atol=0)
    torch.testing.assert_close(expected_relu_output(mean, torch.zeros(6)), mean.relu())


@pytest.mark.parametrize("groups", [1, 8])
def test_bias_correction_removes_the_mean_output_error(groups):
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 16, 3, groups=groups)
    spec = QuantSpec(bits=4)
    amax = conv.weight.detach().abs().max()
    wq = fake_quantize(conv.weight.detach(), *qparams(-amax, amax, spec), spec)
    mean, std = torch.linspace(-0.5, 2.0, 8), torch.linspace(0.5, 1.5, 8)

    def mean_error(layer: nn.Conv2d) -> torch.Tensor:
        """Per-channel E[quantized output - float output] over ReLU(N(mean, std^2)) inputs."""
        x = (mean.view(1, -1, 1, 1) + std.view(1, -1, 1, 1) * torch.randn(512, 8, 10, 10)).relu()
        with torch.no_grad():
            return (F.conv2d(x, wq, layer.bias, groups=groups) - conv(x)).mean((0, 2, 3))

    plain = mean_error(conv)
    corrected = copy.deepcopy(conv)
    bias_correction_(corrected, wq - conv.weight.detach(), expected_relu_output(mean, std))
    fixed = mean_error(corrected)
    assert plain.abs().max() > 1e-3  # there is a bias to correct
    assert fixed.abs().max() * 5 <= plain.abs().max()


def test_bias_correction_adds_a_bias_and_checks_shapes():
    lin = nn.Linear(4, 3, bias=False)
    err = torch.full((3, 4), 0.1)
    bias_correction_(lin, err, torch.ones(4))
    torch.testing.assert_close(lin.bias.detach(), torch.full((3,), -0.4))
    with pytest.raises(NetslimError):
        bias_correction_(lin, err, torch.ones(5))
    with pytest.raises(NetslimError):
        bias_correction_(lin, torch.zeros(4, 3), torch.ones(4))


def test_absorbing_high_biases_keeps_the_function_where_preactivations_stay_high():
    torch.manual_seed(7)
    fc1, fc2 = nn.Linear(8, 6), nn.Linear(6, 3)
    with torch.no_grad():
        fc1.bias.copy_(torch.tensor([5.0, 4.0, 0.2, 6.0, -1.0, 3.0]))
    x = torch.randn(2000, 8)
    with torch.no_grad():
        pre = fc1(x)
        before = fc2(pre.relu())
    c = absorb_high_biases_(fc1, fc2, fc1.bias.detach().clone(), fc1.weight.detach().norm(dim=1))
    assert c[0] > 0 and c[4] == 0  # a high bias was absorbed, a negative one left
    with torch.no_grad():
        after = fc2(fc1(x).relu())
    above = ((pre >= c) | (c == 0)).all(1)  # where no pre-activation fell below c the function is exact
    assert above.float().mean() > 0.95
    assert (after - before)[above].abs().max() < 1e-4


# --------------------------------------------------------------------------------------------- AdaRound
def correlated(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Non-negative inputs with correlated channels (and, for images, smooth in space): with isotropic
    inputs round-to-nearest would already be optimal for the output MSE, so AdaRound needs correlation."""
    g = torch.Generator().manual_seed(seed)
    c = shape[0]
    mix = torch.randn(c, c, generator=torch.Generator().manual_seed(99)) / c ** 0.5 + 0.4
    z = torch.randn(n, *shape, generator=g)
    if len(shape) == 3:
        z = F.avg_pool2d(z, 3, 1, 1) * 3
    return (torch.movedim(torch.movedim(z, 1, -1) @ mix, -1, 1) + 0.3).relu()


def _layer_case(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(8)
    if kind == "linear":
        return nn.Linear(32, 16), correlated(1024, (32,), 0), correlated(1024, (32,), 1)
    return nn.Conv2d(8, 8, 3, padding=1), correlated(256, (8, 8, 8), 0), correlated(256, (8, 8, 8), 1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bits,per_channel", [(4, True), (3, False)])
def test_adaround_beats_round_to_nearest_and_stays_on_the_grid(kind, bits, per_channel):
    layer, x, x_test = _layer_case(kind)
    spec = QuantSpec(bits=bits, per_channel=per_channel)
    w = layer.weight.detach().clone()
    amax = w.abs().flatten(1).amax(1) if per_channel else w.abs().max()
    scale, zp = qparams(-amax, amax, spec)
    with torch.no_grad():
        y, y_test = layer(x), layer(x_test)
    w_ada = adaround_weight(layer, x, y, scale, zp, spec, iters=500, lr=3e-2)
    assert torch.equal(layer.weight, w)  # the layer is untouched

    s = scale.view(-1, *[1] * (w.dim() - 1)) if per_channel else scale
    codes = w_ada / s + zp.view_as(s) if per_channel else w_ada / s + zp
    assert (codes - codes.round()).abs().max() < 1e-4
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax

    w_rtn = fake_quantize(w, scale, zp, spec)
    with torch.no_grad():
        probe = copy.deepcopy(layer)
        mse = []
        for wq in (w_ada, w_rtn):
            probe.weight.copy_(wq)
            mse.append((probe(x_test) - y_test).pow(2).mean())
    assert mse[0] <= 0.8 * mse[1]  # held-out samples


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_adaround_relaxation_ends_binary(kind):
    layer, x, _ = _layer_case(kind)
    spec = QuantSpec(bits=4, per_channel=True)
    amax = layer.weight.detach().abs().flatten(1).amax(1)
    scale, zp = qparams(-amax, amax, spec)
    with torch.no_grad():
        y = layer(x).relu()
    rounder = learn_rounding(layer, x, y, scale, zp, spec, iters=500, lr=3e-2, activation=torch.relu)
    h = rounder.h()
    assert ((h < 0.01) | (h > 0.99)).float().mean() >= 0.95
    torch.testing.assert_close(rounder.hard_weight(), adaround_weight(layer, x, y, scale, zp, spec, iters=500, lr=3e-2,
                                                                     activation=torch.relu))


def test_adaround_starts_at_round_to_nearest_and_checks_its_input():
    layer, x, _ = _layer_case("linear")
    spec = QuantSpec(bits=4)
    amax = layer.weight.abs().max()  # with autograd history: must not leak into the optimized variable
    scale, zp = qparams(-amax, amax, spec)
    y = layer(x).detach()
    start = adaround_weight(layer, x, y, scale, zp, spec, iters=0)
    torch.testing.assert_close(start, fake_quantize(layer.weight.detach(), scale, zp, spec))
    with pytest.raises(NetslimError):
        adaround_weight(layer, x, y[:10], scale, zp, spec, iters=1)
    with pytest.raises(NetslimError):
        adaround_weight(layer, x, y, torch.ones(5), zp, QuantSpec(bits=4, per_channel=True), iters=1)
