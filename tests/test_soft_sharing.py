"""Soft weight-sharing (Ullrich et al. 2017): the mixture prior's closed-form gradient, the fixed zero
component, merging, float16 means stored exactly, retraining under the prior, and the recipe stage."""
import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset

from netslim import encode
from netslim.errors import NetslimError
from netslim.quant import (GaussianMixturePrior, SharingReport, SoftSharingConfig, SoftSharingHook,
                           mixture_neg_log_prob, soft_weight_sharing_)
from netslim.quant import soft_sharing
from netslim.quant.kmeans import SharedWeight
from netslim.quant.soft_sharing import (merge_components, prior_tensors, restore_soft_shared_, share_by_prior_)
from netslim.train import evaluate, fit

LOG_2PI = math.log(2 * math.pi)


def reference_neg_log_prob(w, means, log_precisions, log_mix):
    """The plain formula, differentiated by autograd."""
    d = w.reshape(-1)[:, None] - means[None, :]
    a = log_mix + 0.5 * (log_precisions - LOG_2PI) - 0.5 * log_precisions.exp() * d * d
    return -torch.logsumexp(a, dim=1).sum()


def mixture_inputs(n=(4, 6), j=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*n, generator=g, dtype=torch.float64) * 0.4
    means = torch.linspace(-0.8, 0.8, j, dtype=torch.float64) + 0.05 * torch.randn(j, generator=g, dtype=torch.float64)
    log_precisions = 2 + torch.randn(j, generator=g, dtype=torch.float64)
    log_mix = torch.log_softmax(torch.randn(j, generator=g, dtype=torch.float64), 0)
    return [t.clone().requires_grad_() for t in (w, means, log_precisions, log_mix)]


def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def blobs(n=256, seed=0) -> TensorDataset:
    """Four separable classes of 16-dimensional inputs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=g) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centers[y] + 0.5 * torch.randn(n, 16, generator=g), y)


def shared_weight(module: nn.Module, name: str = "weight") -> SharedWeight:
    return getattr(module.parametrizations, name)[0]


# ---------------------------------------------------------------- the prior's negative log density
@pytest.mark.parametrize("chunk", [soft_sharing.CHUNK, 7])  # one pass, and chunks of one weight x 5 components
def test_closed_form_gradient_matches_autograd_of_the_plain_formula(monkeypatch, chunk):
    monkeypatch.setattr(soft_sharing, "CHUNK", chunk)
    inputs = mixture_inputs()
    assert torch.autograd.gradcheck(mixture_neg_log_prob, inputs)
    value = mixture_neg_log_prob(*inputs)
    ours = torch.autograd.grad(value, inputs)
    expected_value = reference_neg_log_prob(*inputs)
    expected = torch.autograd.grad(expected_value, inputs)
    assert torch.allclose(value, expected_value, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_the_weight_gradient_is_the_responsibility_weighted_pull_to_the_means():
    w, means, log_precisions, log_mix = (t.detach() for t in mixture_inputs(n=(50,)))
    w.requires_grad_()
    (grad,) = torch.autograd.grad(mixture_neg_log_prob(w, means, log_precisions, log_mix), [w])
    a = log_mix + 0.5 * log_precisions - 0.5 * log_precisions.exp() * (w.detach()[:, None] - means) ** 2
    r = torch.softmax(a, dim=1)
    assert torch.allclose(grad, (r * log_precisions.exp() * (w.detach()[:, None] - means)).sum(1))


def test_far_weights_stay_finite():
    w = torch.tensor([0.0, 50.0, -1e3])
    value = mixture_neg_log_prob(w.requires_grad_(), torch.tensor([0.0, 0.1]), torch.tensor([8.0, 8.0]),
                                 torch.log(torch.tensor([0.9, 0.1])))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(w.grad).all()


# ---------------------------------------------------------------- the fixed zero component
def test_zero_component_mean_stays_zero_and_its_mixing_proportion_fixed():
    model = mlp()
    cfg = SoftSharingConfig(pi_zero=0.95, tau=1.0, train={"epochs": 2, "lr": 1e-3, "batch_size": 32})
    layers = {"1": model[1], "3": model[3]}
    prior = GaussianMixturePrior.for_weights(torch.cat([model[1].weight.detach().flatten(),
                                                        model[3].weight.detach().flatten()]), cfg)
    assert len(list(prior.parameters())) == 3 and prior.means.numel() == cfg.components - 1
    before = [p.detach().clone() for p in prior.parameters()]
    fit(model, blobs(), cfg.train_config(), hooks=[SoftSharingHook(prior, layers, cfg, 256)], device="cpu",
        progress=False)
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, prior.parameters()))  # all three trained
    means, _, log_mix = prior.mixture()
    assert means[0].item() == 0.0
    assert log_mix.exp()[0].item() == pytest.approx(0.95, abs=1e-7)
    assert log_mix.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- merging
def test_two_nearly_identical_components_merge_into_one():
    means = torch.tensor([0.0, 0.1, 0.1 + 1e-9, -0.3], dtype=torch.float64)
    log_precisions = torch.full((4,), math.log(2500.0), dtype=torch.float64)
    log_mix = torch.log(torch.tensor([0.9, 0.06, 0.02, 0.02], dtype=torch.float64))
    merged_means, merged_s, merged_mix, groups = merge_components(means, log_precisions, log_mix, 1e-10)
    assert groups == [[0], [1, 2], [3]]
    assert merged_means.tolist() == pytest.approx([0.0, 0.1 + 0.25e-9, -0.3], abs=1e-15)
    assert merged_mix.exp().tolist() == pytest.approx([0.9, 0.08, 0.02])
    assert merged_s.tolist() == pytest.approx([math.log(2500.0)] * 3)
    # distinct components stay apart at the threshold; one close to the zero component joins it at exactly 0
    assert len(merge_components(means, log_precisions, log_mix, 1e-20)[3]) == 4
    near_zero = torch.tensor([0.0, 1e-7, 0.2], dtype=torch.float64)
    m, _, _, groups = merge_components(near_zero, log_precisions[:3], log_mix[:3], 1e-3)
    assert groups == [[0, 1], [2]] and m[0].item() == 0.0


# ---------------------------------------------------------------- quantization to the prior
def hand_made_prior(values) -> GaussianMixturePrior:
    """A narrow component at each of ``values`` (non-zero ones) beside the zero component."""
    means = torch.tensor(values, dtype=torch.float32)
    return GaussianMixturePrior(means, torch.full((len(values) + 1,), math.log(1e4)), pi_zero=0.5)


def test_every_weight_is_a_float16_mean_of_its_layer_codebook_or_zero():
    model = mlp()
    report = soft_weight_sharing_(model, blobs(), SoftSharingConfig(tau=1.0, init_std=None, train={
        "epochs": 2, "lr": 1e-3, "batch_size": 32}), device="cpu", progress=False)
    assert isinstance(report, SharingReport) and report.components == 17 and 1 <= report.merged_components <= 17
    assert report.means[0] == 0.0
    means = torch.tensor(report.means)
    assert torch.equal(means.half().float(), means)
    for name, module in (("1.weight", model[1]), ("3.weight", model[3])):
        shared = shared_weight(module)
        codebook = shared.codebook.detach()
        assert torch.equal(codebook.half().float(), codebook) and bool((codebook != 0).all())
        assert torch.equal(codebook, codebook.unique())  # sorted, distinct
        assert set(codebook.tolist()) <= set(report.means[1:])
        w = module.weight.detach()
        assert bool(torch.isin(w, torch.cat([torch.zeros(1), codebook])).all())
        assert report.distinct[name] == codebook.numel()
        assert report.sparsity[name] == pytest.approx(float((w == 0).float().mean()))
    assert not parametrize.is_parametrized(model[1], "bias")  # biases are left alone by default
    assert "| 1.weight |" in report.table() and 0 <= report.total_sparsity <= 1


def test_a_weight_at_a_component_mean_is_stored_exactly(tmp_path):
    """Weights at float16-exact means (and near them) come back from the .nsz file bit for bit."""
    values = [-0.3125, -0.0419921875, 0.0625, 0.21875, 0.5009765625]  # exact in float16
    assert torch.equal(torch.tensor(values).half().float(), torch.tensor(values))
    model = mlp()
    g = torch.Generator().manual_seed(1)
    for layer in (model[1], model[3]):
        pick = torch.randint(0, len(values) + 1, layer.weight.shape, generator=g)
        at_means = torch.tensor([0.0] + values)[pick]
        with torch.no_grad():
            layer.weight.copy_(at_means)
            layer.weight[:, :2] += 1e-4 * torch.randn(layer.weight[:, :2].shape, generator=g)  # near, not at
    expected = {n: torch.tensor([0.0] + values)[(m.weight.detach()[..., None] - torch.tensor([0.0] + values)).abs()
                                                 .argmin(-1)] for n, m in (("1", model[1]), ("3", model[3]))}
    at = {n: m.weight.detach()[:, 2:].clone() for n, m in (("1", model[1]), ("3", model[3]))}
    share_by_prior_(model, hand_made_prior(values))
    for n, m in (("1", model[1]), ("3", model[3])):
        assert torch.equal(m.weight.detach()[:, 2:], at[n])  # exactly the weights they were
        assert torch.equal(m.weight.detach(), expected[n])
    path = tmp_path / "m.nsz"
    encode.save(model, path)
    loaded = encode.load(path, mlp(seed=5))
    for n in ("1", "3"):
        assert torch.equal(loaded.get_submodule(n).weight.detach(), expected[n])
        assert torch.equal(loaded.get_submodule(n).weight.detach()[:, 2:], at[n])


def test_soft_shared_model_round_trips_through_nsz_bit_exactly(tmp_path):
    model = mlp()
    soft_weight_sharing_(model, blobs(), SoftSharingConfig(tau=1.0, init_std=None, train={
        "epochs": 1, "lr": 1e-3, "batch_size": 32}), device="cpu", progress=False)
    encode.save(model, tmp_path / "m.nsz")
    loaded = encode.load(tmp_path / "m.nsz", mlp(seed=3))
    for n in ("1", "3"):
        assert torch.equal(loaded.get_submodule(n).weight, model.get_submodule(n).weight.detach())


def test_biases_join_when_asked_and_exact_zeros_stay_zero():
    model = mlp()
    with torch.no_grad():
        model[1].weight[:4] = 0.0
    report = soft_weight_sharing_(model, blobs(), SoftSharingConfig(include_bias=True, train={"epochs": 0}),
                                  device="cpu", progress=False)
    assert set(report.elements) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert isinstance(shared_weight(model[3], "bias"), SharedWeight)
    assert bool((model[1].weight[:4] == 0).all())


# ---------------------------------------------------------------- retraining under the prior
def test_retraining_lowers_the_prior_loss_and_adds_zeros():
    model = mlp()
    cfg = SoftSharingConfig(tau=2.0, init_std=None, train={"epochs": 4, "lr": 2e-3, "batch_size": 32})
    layers = {"1": model[1], "3": model[3]}
    weights = lambda: torch.cat([t.detach().flatten() for t in prior_tensors(layers).values()])  # noqa: E731
    prior = GaussianMixturePrior.for_weights(weights(), cfg)
    hook = SoftSharingHook(prior, layers, cfg, 256)
    with torch.no_grad():
        before = float(hook.complexity())
        zeros_before = int((prior.assign(weights()) == 0).sum())
    history = hook.annotate(fit(model, blobs(), cfg.train_config(), hooks=[hook], device="cpu", progress=False))
    with torch.no_grad():
        after = float(hook.complexity())
        zeros_after = int((prior.assign(weights()) == 0).sum())
    assert after < before and history[-1]["complexity"] < history[0]["complexity"]
    assert zeros_after > zeros_before
    assert evaluate(model, blobs(), "cpu")["top1"] > 0.7  # the task is learned all the same (chance: 0.25)


def test_a_restarted_call_resumes_from_its_checkpoint(tmp_path):
    cfg = SoftSharingConfig(tau=1.0, init_std=None, train={"epochs": 2, "lr": 1e-3, "batch_size": 32})
    first = mlp()
    report = soft_weight_sharing_(first, blobs(), cfg, device="cpu", progress=False,
                                  checkpoint_path=tmp_path / "train.ckpt")
    again = mlp()  # the same start; the finished checkpoint (weights and prior) is loaded, nothing is trained
    replay = soft_weight_sharing_(again, blobs(), cfg, device="cpu", progress=False,
                                  checkpoint_path=tmp_path / "train.ckpt")
    assert replay.means == report.means and replay.distinct == report.distinct
    for n in ("1", "3"):
        assert torch.equal(again.get_submodule(n).weight, first.get_submodule(n).weight)
    # the parametrization structure rebuilt from the codebook sizes takes the state_dict
    fresh = restore_soft_shared_(mlp(seed=7), report.distinct)
    fresh.load_state_dict(first.state_dict())
    assert torch.equal(fresh[1].weight, first[1].weight)


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("fields, message", [
    ({"pi_zero": 1.0}, "pi_zero must be in"),
    ({"components": 1}, "components must be an integer in 2..4096"),
    ({"tau": -1}, "tau and merge_threshold must be >= 0"),
    ({"precision_prior": [250]}, r"precision_prior must be \[alpha, beta\]"),
    ({"init_std": 0}, "init_std must be > 0"),
    ({"train": {"optimizr": "adam"}}, "train: .*optimizr"),
    ({"exclude": "fc1"}, "must be a list of layer names"),
])
def test_bad_fields_are_one_line_errors(fields, message):
    with pytest.raises(NetslimError, match=message):
        SoftSharingConfig(**fields)


def test_the_stage_config_is_the_python_config():
    from netslim.pipeline import build_config

    stage = build_config("quantize", {"method": "soft_sharing", "tau": 0.01, "precision_prior": [100, 0.5],
                                      "train": {"epochs": 3}})
    cfg = stage.soft_sharing_config()
    assert cfg == SoftSharingConfig(tau=0.01, precision_prior=[100.0, 0.5], train={"epochs": 3})
    assert cfg.train_config().optimizer == "adam" and cfg.train_config().epochs == 3
    python_defaults = SoftSharingConfig()
    stage_defaults = build_config("quantize", {"method": "soft_sharing"})
    for f in dataclasses.fields(SoftSharingConfig):  # every field, with the same default
        assert getattr(stage_defaults, f.name) == getattr(python_defaults, f.name), f.name
    with pytest.raises(NetslimError, match="valid quantize methods: .*soft_sharing"):
        build_config("quantize", {"method": "soft"})
    with pytest.raises(NetslimError, match="tau applies to method 'soft_sharing' only"):
        build_config("quantize", {"method": "kmeans", "tau": 0.1})
    with pytest.raises(NetslimError, match="stage 'quantize': pi_zero must be in"):
        build_config("quantize", {"method": "soft_sharing", "pi_zero": 2})


def test_soft_sharing_stage_in_a_recipe_encodes_and_resumes(shared, tmp_path):
    from netslim.pipeline import parse_recipe, run_recipe

    doc = {"model": "lenet300", "weights": "shared", "data": "mnist", "test_limit": 500, "stages": [
        {"quantize": {"method": "soft_sharing", "init_std": None, "tau": 0.05,
                      "train": {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 64}}},
        {"encode": {}}]}
    run = tmp_path / "run"
    metrics = run_recipe(parse_recipe(doc), run, progress=False)
    assert [m["stage"] for m in metrics] == ["baseline", "quantize", "encode"]
    notes = metrics[1]["notes"]
    assert "soft weight-sharing" in notes and "17 components" in notes and "| fc1.weight |" in notes
    state = json.loads((run / "state.json").read_text())
    sizes = state["artifacts"][0]["codebook_sizes"]
    assert set(sizes) == {"fc1.weight", "fc2.weight", "fc3.weight"} and all(0 <= k <= 16 for k in sizes.values())
    assert (run / "stages" / "00-quantize" / "train.ckpt").is_file()
    assert 0 < metrics[2]["stored_bytes"] == (run / "stages" / "01-encode" / "model.nsz").stat().st_size
    # a finished run resumes by replaying the shared structure from the recorded codebook sizes
    assert run_recipe(parse_recipe(doc), run, progress=False) == metrics
    model = encode.load(run / "stages" / "01-encode" / "model.nsz")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
