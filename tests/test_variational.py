"""Sparse variational dropout (Molchanov et al. 2017) and the exact removal of dead units."""
import copy
import math

import numpy as np
import pytest
import torch
from scipy import integrate
from torch import nn
from torch.utils.data import TensorDataset

import netslim
from netslim import NetslimError, zoo
from netslim.prune.dead_units import fold_dead_units_
from netslim.prune.stages import PruneConfig
from netslim.prune.variational import (K1, K2, K3, VariationalDropout, VariationalDropoutConfig, log_alpha_of,
                                       neg_kl_approximation, variational_prune_)


def exact_neg_kl(log_alpha: float) -> float:
    """-KL(N(theta, alpha theta^2) || log-uniform) up to the constant: 0.5 log alpha - E_{e ~ N(1, alpha)} log|e|
    (Molchanov et al. 2017, eq. 8), the expectation by quadrature."""
    alpha = math.exp(log_alpha)
    sd = math.sqrt(alpha)

    def f(e):
        return math.log(abs(e)) * math.exp(-0.5 * ((e - 1) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    lo, hi = 1 - 12 * sd, 1 + 12 * sd
    pieces = [(lo, 0.0), (0.0, hi)] if lo < 0 < hi else [(lo, hi)]  # log|e| is singular (integrably) at 0
    value = sum(integrate.quad(f, a, b, limit=400)[0] for a, b in pieces)
    return 0.5 * log_alpha - value


def test_kl_approximation_uses_the_papers_constants_and_fits_the_exact_kl():
    assert (K1, K2, K3) == (0.63576, 1.87320, 1.48695)
    la = torch.tensor([-2.0, 0.0, 3.0])
    expected = K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * torch.log1p(torch.exp(-la)) - K1
    assert torch.allclose(neg_kl_approximation(la), expected, atol=1e-7)
    # eq. 14 fits the exact -KL with the constant C = -k1 to within 0.01 (the paper's maximum error, §4.2)
    for value in (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0):
        exact = exact_neg_kl(value) - K1
        approx = float(neg_kl_approximation(torch.tensor(value)))
        assert abs(exact - approx) < 0.012, (value, exact, approx)
    # -KL tends to 0 as alpha grows: dropping a weight entirely costs nothing
    assert abs(float(neg_kl_approximation(torch.tensor(20.0)))) < 1e-4
    assert float(neg_kl_approximation(torch.tensor(-3.0))) < float(neg_kl_approximation(torch.tensor(3.0)))


def test_log_alpha_is_log_sigma2_minus_log_theta2_clipped():
    theta = torch.tensor([1.0, 0.1, 1e-6])
    la = log_alpha_of(theta, torch.tensor([-2.0, -2.0, 5.0]))
    assert torch.allclose(la[:2], torch.tensor([-2.0, -2.0 - math.log(0.01)]), atol=1e-5)
    assert la[2] == 10.0


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv2d(3, 4, 3, padding=1, stride=2)])
def test_local_reparameterization_matches_sampled_weights(layer):
    torch.manual_seed(0)
    hook = VariationalDropout({"l": layer}, 100, VariationalDropoutConfig(), 1)
    with torch.no_grad():
        hook.log_sigma2["l"].fill_(math.log(0.05))
    hook.attach()
    x = torch.randn(1, 6) if isinstance(layer, nn.Linear) else torch.randn(1, 3, 5, 5)
    layer.train()
    with torch.no_grad():
        noisy = torch.stack([layer(x) for _ in range(2000)])
        layer.eval()
        mean = layer(x)
    hook.detach()
    # reference: draw whole weights w ~ N(theta, sigma^2) and apply the layer
    theta = layer.weight.detach().clone()
    sampled = []
    with torch.no_grad():
        for _ in range(2000):
            layer.weight.copy_(theta + math.sqrt(0.05) * torch.randn_like(theta))
            sampled.append(layer(x))
        layer.weight.copy_(theta)
    sampled = torch.stack(sampled)
    assert torch.allclose(noisy.mean(0), mean, atol=0.05)
    assert torch.allclose(noisy.var(0), sampled.var(0), rtol=0.15, atol=1e-3)
    assert noisy.var(0).min() > 0.01  # the hook really adds noise in training mode


def _tiny_task(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()  # only two of the 20 inputs matter
    return TensorDataset(x, y)


def test_training_drops_the_irrelevant_weights_and_masks_them(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 2))
    data = _tiny_task()
    cfg = VariationalDropoutConfig(kl_weight=5.0, kl_warmup_epochs=1,
                                   train={"epochs": 30, "lr": 0.01, "batch_size": 64, "amp": False})
    report = variational_prune_(model, data, cfg, device="cpu", progress=False,
                                checkpoint_path=tmp_path / "vd.ckpt")
    assert report.sparsity > 0.6
    first = model[0].weight.detach()
    # the inputs that carry the label keep far more weights than the 18 noise inputs
    assert (first[:, :2] != 0).float().mean() > 2 * (first[:, 2:] != 0).float().mean()
    assert netslim.prune.masked_modules(model)  # masks: zeros stay zeros through a later fine-tune
    with torch.no_grad():
        acc = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean()
    assert acc > 0.9
    assert (tmp_path / "vd.ckpt").is_file()


def test_a_killed_run_resumes_with_the_saved_variances(tmp_path, monkeypatch):
    data = _tiny_task(256)
    cfg = VariationalDropoutConfig(kl_warmup_epochs=1, train={"epochs": 3, "lr": 0.01, "batch_size": 64})

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2))
    whole = model()
    variational_prune_(whole, data, cfg, device="cpu", progress=False)

    def killed(self, model, epoch):
        if epoch == 1:  # after epoch 1's checkpoint is written, before epoch 2's
            raise KeyboardInterrupt
    monkeypatch.setattr(VariationalDropout, "on_epoch_end", killed)
    interrupted = model()
    with pytest.raises(KeyboardInterrupt):
        variational_prune_(interrupted, data, cfg, device="cpu", progress=False, checkpoint_path=tmp_path / "c.ckpt")
    monkeypatch.undo()
    resumed = model()
    variational_prune_(resumed, data, cfg, device="cpu", progress=False, checkpoint_path=tmp_path / "c.ckpt")
    assert torch.allclose(whole[0].weight, resumed[0].weight, atol=1e-6)
    assert torch.equal(whole[0].weight != 0, resumed[0].weight != 0)  # the same log alphas chose the same masks


def test_config_errors_are_one_line():
    with pytest.raises(NetslimError, match="threshold"):
        VariationalDropoutConfig(threshold=50)
    with pytest.raises(NetslimError, match="prune method.*variational"):
        PruneConfig(method="vd")
    cfg = PruneConfig(method="variational", train={"epochs": 3})
    assert cfg.train_config.optimizer == "adam" and cfg.train_config.epochs == 3  # the paper's optimiser kept


def test_variational_prune_stage_in_a_recipe(tmp_path, shared):
    mnist = netslim.data.get("mnist", "train")
    train = torch.utils.data.Subset(mnist, range(512))
    test = torch.utils.data.Subset(netslim.data.get("mnist", "test"), range(256))
    model = zoo.get("lenet300")
    model.load_state_dict(torch.load(shared / "models/mnist_lenet300.pt", weights_only=True))
    result = netslim.compress(model, [{"prune": {"method": "variational", "kl_weight": 50.0, "kl_warmup_epochs": 0.5,
                                                 "train": {"epochs": 2, "lr": 0.003, "batch_size": 128}}}],
                              train_data=train, eval_data=test, out=tmp_path / "run", device="cpu", progress=False)
    sparsity = netslim.prune.sparsity(result.model)
    assert sparsity > 0.2  # 8 steps only: the training itself is tested on the tiny task above
    assert netslim.prune.masked_modules(result.model)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Sparse variational dropout" in report


def test_dead_units_are_folded_without_changing_outputs():
    torch.manual_seed(0)
    model = zoo.get("lenet5").eval()
    with torch.no_grad():
        model.fc1.weight[:100] = 0          # 100 units of fc1 have no inputs: constant relu(bias)
        model.fc2.weight[:, 400:] = 0       # 100 units feed nothing
        model.conv2.weight[:10] = 0         # 10 conv2 channels are constant maps (no activation follows)
        model.fc1.weight[:, 16 * 45:] = 0   # the last 5 conv2 channels feed nothing
    original = copy.deepcopy(model)
    x = torch.randn(64, 1, 28, 28)
    report = fold_dead_units_(model, x)
    assert report.applied
    fresh = torch.randn(32, 1, 28, 28) * 3  # inputs the folding never saw
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-5)
        assert torch.allclose(model(fresh), original(fresh), atol=1e-4)
    assert report.constant["fc1"] == 100 and report.constant["conv2"] == 10
    assert report.unused["fc1"] == 100 and report.unused["conv2"] == 5
    assert int((model.fc1.bias == 0).sum()) == 200 and int((model.conv2.bias == 0).sum()) == 15
    assert not model.fc2.weight[:, :100].any()  # the constants now live in fc2's bias


def test_dead_unit_folding_is_undone_when_an_output_would_change():
    class Skip(nn.Module):  # fc1's units also reach the output directly: "unused" in fc2 is not dead
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h) + h
    model = Skip()
    with torch.no_grad():
        model.fc2.weight[:, 0] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fold_dead_units_(model, torch.randn(16, 4))
    assert not report.applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert np.isfinite(report.max_output_change) and report.max_output_change > 0


def test_encode_stage_folds_dead_units_and_rounds_to_float16(tmp_path, shared):
    train = torch.utils.data.Subset(netslim.data.get("mnist", "train"), range(256))
    test = torch.utils.data.Subset(netslim.data.get("mnist", "test"), range(256))
    model = zoo.get("lenet300")
    model.load_state_dict(torch.load(shared / "models/mnist_lenet300.pt", weights_only=True))
    stages = [{"prune": {"sparsity": 0.98, "plan": "uniform"}}, {"quantize": {"method": "kmeans", "fc_bits": 3}},
              {"encode": {"fold_dead_units": True, "precision": "float16"}}]
    result = netslim.compress(model, stages, train_data=train, eval_data=test, out=tmp_path / "run", device="cpu",
                              progress=False)
    decoded = netslim.encode.load(tmp_path / "run" / "stages" / "02-encode" / "model.nsz", zoo.get("lenet300"))
    for p in decoded.parameters():
        assert torch.equal(p, p.half().float())  # every stored value is a float16 value
    assert int((decoded.fc1.bias == 0).sum()) > 0  # units left without inputs or outputs lost their bias
    x = torch.stack([test[i][0] for i in range(64)])
    with torch.no_grad():
        assert torch.equal(decoded(x), result.model.cpu()(x))
    assert "Dead units zeroed" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(NetslimError, match="precision.*float16"):
        netslim.compress(model, [{"encode": {"precision": "int4"}}], train_data=train, eval_data=test,
                         out=tmp_path / "bad", device="cpu", progress=False)


def test_quantize_stage_chooses_each_layers_bits_and_a_resumed_run_restores_them(tmp_path, shared):
    train = torch.utils.data.Subset(netslim.data.get("mnist", "train"), range(512))
    test = torch.utils.data.Subset(netslim.data.get("mnist", "test"), range(256))
    model = zoo.get("lenet300")
    model.load_state_dict(torch.load(shared / "models/mnist_lenet300.pt", weights_only=True))
    stages = [{"prune": {"sparsity": 0.9}}, {"quantize": {"method": "kmeans", "max_drop": 0.5, "held_out": 500}},
              {"finetune": {"epochs": 1, "max_steps_per_epoch": 2, "lr": 1e-4}}]
    first = netslim.compress(model, stages, train_data=train, eval_data=test, out=tmp_path / "run", device="cpu",
                             progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "fewest bits keeping top-1 on 500 held-out training images" in report
    again = netslim.compress(model, stages, train_data=train, eval_data=test, out=tmp_path / "run", device="cpu",
                             progress=False)  # replays the finished run: the chosen widths are restored
    assert torch.equal(first.model.fc1.weight, again.model.fc1.weight)
    with pytest.raises(NetslimError, match="max_drop.*kmeans"):
        netslim.compress(model, [{"quantize": {"method": "hash", "max_drop": 0.5}}], train_data=train,
                         eval_data=test, out=tmp_path / "bad", device="cpu", progress=False)
