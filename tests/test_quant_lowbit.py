import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset

from netslim.errors import NetslimError
from netslim.quant.lowbit import (INQ, BinaryWeight, TernaryWeight, bake_lowbit_, inq_exponents, inq_train,
                                  lowbit_layer_names, lowbit_weights_)
from netslim.train import TrainConfig, evaluate, fit


def blobs(n: int, seed: int) -> TensorDataset:
    """Four Gaussian blobs in 16-D (fixed centres, noise drawn with ``seed``)."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centres[y] + torch.randn(n, 16, generator=g), y)


TRAIN, TEST = blobs(1024, 1), blobs(512, 2)
CFG = TrainConfig(epochs=4, lr=0.05, batch_size=64, amp=False)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


@pytest.fixture(scope="module")
def pretrained() -> nn.Sequential:
    model = mlp()
    fit(model, TRAIN, CFG, device="cpu", progress=False)
    assert evaluate(model, TEST, device="cpu")["top1"] > 0.9
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_binary_weight_values_and_hardtanh_straight_through_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(32, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 32) * 1.5)  # many weights beyond +-1
    w = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", BinaryWeight())
    wb = layer.weight.detach()
    for c in range(6):
        alpha = w[c].abs().mean()
        assert sorted(wb[c].unique().tolist()) == pytest.approx([-alpha.item(), alpha.item()])
        assert torch.equal(wb[c] > 0, w[c] >= 0)
    incoming = torch.randn(6, 32)
    (layer.weight * incoming).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    inside = w.abs() <= 1
    assert inside.any() and (~inside).any()
    assert torch.equal(grad[inside], incoming[inside]) and grad.abs().sum() > 0
    assert torch.all(grad[~inside] == 0)


def test_binary_sign_of_zero_is_plus_one():
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, -0.3, 0.6]]))
    parametrize.register_parametrization(layer, "weight", BinaryWeight())
    assert layer.weight.detach()[0].tolist() == pytest.approx([0.3, -0.3, 0.3])


def test_ternary_weight_follows_twn_threshold():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3)
    w = conv.weight.detach().clone()
    parametrize.register_parametrization(conv, "weight", TernaryWeight())
    wt = conv.weight.detach()
    for c in range(5):
        a = w[c].abs()
        delta = 0.7 * a.mean()
        alpha = a[a > delta].mean()
        expected = torch.where(a > delta, torch.sign(w[c]) * alpha, torch.zeros(()))
        assert torch.allclose(wt[c], expected)
        assert torch.allclose(wt[c].unique(), torch.stack([-alpha, torch.zeros(()), alpha]))
        assert torch.all(wt[c][a <= delta] == 0) and (a <= delta).any()
    incoming = torch.randn_like(w)
    (conv.weight * incoming).sum().backward()
    assert torch.equal(conv.parametrizations.weight.original.grad, incoming)


def test_lowbit_weights_keeps_first_conv_and_last_linear_float():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))
    names = lowbit_layer_names(lowbit_weights_(model, "ternary"))
    assert names == ["2", "5"]
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[7])
    assert isinstance(model[2].parametrizations.weight[0], TernaryWeight)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    everything = copy.deepcopy(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)))
    assert lowbit_weights_(everything, "binary", first_last_float=False) is everything
    assert lowbit_layer_names(everything) == ["0", "2"]
    with pytest.raises(NetslimError, match="unknown low-bit method 'quinary'.*binary, inq, ternary"):
        lowbit_weights_(model, "quinary")


def test_ternary_training_reaches_high_accuracy_and_stays_ternary():
    model = mlp()
    assert lowbit_layer_names(lowbit_weights_(model, "ternary", first_last_float=False)) == ["0", "2", "4"]
    fit(model, TRAIN, CFG, device="cpu", progress=False)
    assert evaluate(model, TEST, device="cpu")["top1"] > 0.9
    bake_lowbit_(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for layer in quantized_layers(model).values():
        for row in layer.weight.detach():
            magnitudes = row.abs().unique()  # sorted: {0, alpha}
            assert magnitudes.numel() == 2 and magnitudes[0] == 0 and magnitudes[1] > 0
    assert evaluate(model, TEST, device="cpu")["top1"] > 0.9


def test_inq_frozen_weights_do_not_move_under_momentum_and_weight_decay(pretrained):
    model = copy.deepcopy(pretrained)
    inq = INQ(bits=5)
    assert inq.advance(model) >= 0.5
    before = {n: m.weight.detach().clone() for n, m in quantized_layers(model).items()}
    masks = {n: inq.masks[n].clone() for n in before}
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=64, amp=False, momentum=0.9, weight_decay=1e-2)
    fit(model, TRAIN, cfg, hooks=[inq], device="cpu", progress=False)
    assert inq.step == 1  # fit did not start another portion
    for name, layer in quantized_layers(model).items():
        w, m = layer.weight.detach(), masks[name]
        assert torch.equal(w[m], before[name][m])
        assert not torch.equal(w[~m], before[name][~m])  # the rest did train
    assert inq.advance(model) >= 0.75


def test_inq_train_gives_powers_of_two_and_keeps_accuracy(pretrained):
    model = copy.deepcopy(pretrained)
    exps = {n: inq_exponents(m.weight, 5) for n, m in quantized_layers(model).items()}
    inq_train(model, TRAIN, TrainConfig(epochs=2, lr=0.02, batch_size=64, amp=False), bits=5, device="cpu")
    for name, layer in quantized_layers(model).items():
        n1, n2 = exps[name]
        assert n1 - n2 == 7
        w = layer.weight.detach()
        nz = w[w != 0].abs()
        k = torch.log2(nz)
        assert torch.equal(k, k.round()) and k.min() >= n2 and k.max() <= n1
        assert (w != 0).float().mean() > 0.5
    assert evaluate(model, TEST, device="cpu")["top1"] > 0.9


def test_inq_rejects_bad_portions():
    with pytest.raises(NetslimError, match="portions"):
        INQ(portions=(0.5, 0.9))
    assert math.isclose(INQ().portions[-1], 1.0)
