"""Structured pruning repaired without training: the layers reading removed channels re-solved by least
squares (He et al. 2017), in each refit mode, and the clear errors of its options."""
from __future__ import annotations

import pytest
import torch

import netslim
from netslim.errors import NetslimError
from netslim.prune.structured import structured
from netslim.prune.structured.refit import PRUNE_REFIT_MODES, shrunk_consumers
from netslim.prune.structured.graph import trace
from netslim.prune.structured.stages import ChannelPruneConfig

pytestmark = pytest.mark.integration
X = torch.randn(1, 3, 32, 32)
RATIOS = {"layer1": 0.5, "layer2": 0.5, "layer3": 0.5}  # half the channels inside every block


@pytest.fixture(scope="module")
def resnet20(shared):
    return netslim.zoo.get("resnet20", weights=str(shared / "models" / "cifar10_resnet20.pt")).eval()


@pytest.fixture(scope="module")
def images(shared):
    """Training images: 128 to refit on, 128 others to check the outputs on."""
    train = netslim.data.get("cifar10", "train", root=shared / "data")
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:256].tolist()
    xs = torch.stack([train[i][0] for i in picked])
    return xs[:128], xs[128:]


def _inner_ratios(model):
    return {n: 0.5 for n, _ in model.named_modules() if n.endswith("conv1") and "." in n}


def _logit_error(model, reference, x) -> float:
    with torch.no_grad():
        want = reference(x)
        return float((model.eval()(x) - want).norm() / want.norm())


@pytest.mark.parametrize("mode", PRUNE_REFIT_MODES)
def test_refit_brings_the_pruned_outputs_back_towards_the_original(resnet20, images, mode):
    fit_on, check_on = images
    ratios = _inner_ratios(resnet20)
    plain = structured(resnet20, X, ratio=0.0, ratios=ratios)
    refit = structured(resnet20, X, ratio=0.0, ratios=ratios, calib_data=fit_on, refit_images=128, refit_mode=mode)
    # the same channels go: the structure is the plain pruning's
    assert [p.shape for p in refit.parameters()] == [p.shape for p in plain.parameters()]
    before, after = _logit_error(plain, resnet20, check_on), _logit_error(refit, resnet20, check_on)
    if mode == "one_pass":  # inputs before any refit: each layer may over-compensate, but never worse per layer
        assert after < 1.5 * before
    else:
        assert after < 0.8 * before, (mode, before, after)


def test_only_dense_layers_that_lost_inputs_are_refit(resnet20):
    graph = trace(resnet20, X)
    pruned = structured(resnet20, X, ratio=0.0, ratios={"layer2.0.conv1": 0.5})
    assert pruned.get_submodule("layer2.0.conv2").in_channels == 16
    from netslim.prune.structured.select import layer_groups
    lg = next(g for g in layer_groups(graph) if g.producers == ["layer2.0.conv1"])
    remove = set(lg.roots[:16])
    assert shrunk_consumers(resnet20, graph, remove) == ["layer2.0.conv2"]
    assert shrunk_consumers(resnet20, graph, set()) == []


def test_refit_options_are_checked(resnet20, images):
    with pytest.raises(NetslimError, match="needs calib_data"):
        structured(resnet20, X, ratio=0.3, refit_images=32)
    with pytest.raises(NetslimError, match="valid refit_modes: local, one_pass, sequential"):
        structured(resnet20, X, ratio=0.3, refit_images=32, calib_data=images[0], refit_mode="twice")
    with pytest.raises(NetslimError, match="refit_images must be an integer >= 0"):
        structured(resnet20, X, ratio=0.3, refit_images=-1, calib_data=images[0])
    with pytest.raises(NetslimError, match="needs method 'oneshot'"):
        ChannelPruneConfig(ratio=0.3, method="iterative", refit_images=64)
    assert ChannelPruneConfig(ratio=0.3, refit_images=64).structured_options()["refit_images"] == 64
