import pytest
import torch
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset

from netslim import NetslimError, zoo
from netslim.prune import magnitude_prune_
from netslim.quant import kmeans_1d, share_weights_
from netslim.quant.kmeans import SharedWeight
from netslim.train import TrainConfig, fit


@pytest.mark.parametrize("init", ["linear", "density"])
def test_kmeans_1d_finds_well_separated_clusters(init):
    torch.manual_seed(0)
    values = torch.cat([torch.randn(500) * 0.01 + c for c in (-1.0, 0.5, 2.0)])
    centroids, assign = kmeans_1d(values, 3, init=init)
    assert torch.allclose(centroids, torch.tensor([-1.0, 0.5, 2.0]), atol=0.01)
    assert torch.bincount(assign).tolist() == [500, 500, 500]


def test_random_init_assigns_each_value_to_its_nearest_centroid():
    values = torch.randn(2000)
    centroids, assign = kmeans_1d(values, 8, init="random", seed=3)
    nearest = (values[:, None] - centroids[None, :]).abs().argmin(1)
    assert torch.equal(assign, nearest) and torch.all(centroids[1:] >= centroids[:-1])


def test_sharing_limits_distinct_values_and_keeps_zeros():
    model = zoo.get("lenet5")
    magnitude_prune_(model, 0.8)
    zeros = {n: (m.weight == 0) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    share_weights_(model, conv_bits=4, fc_bits=3)
    assert model.fc1.weight.unique().numel() <= 2 ** 3 + 1
    assert model.conv2.weight.unique().numel() <= 2 ** 4 + 1
    for name, z in zeros.items():
        assert torch.all(model.get_submodule(name).weight[z] == 0)


def test_centroid_fine_tuning_sums_gradients_per_cluster():
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.1, 0.0, -1.0], [-1.1, 1.05, 0.0, 0.0]]))
    share_weights_(torch.nn.Sequential(layer), fc_bits=1)
    shared = layer.parametrizations.weight[0]
    assert isinstance(shared, SharedWeight)
    x = torch.randn(8, 4)
    layer(x).sum().backward()
    grad_w = x.sum(0).expand(2, 4)  # dL/dW for sum of outputs
    idx = shared.indices
    for c in range(2):
        assert torch.allclose(shared.codebook.grad[c], grad_w[idx == c + 1].sum(), atol=1e-5)


def test_fine_tuning_moves_centroids_not_the_pattern():
    torch.manual_seed(0)
    model = zoo.get("lenet300")
    magnitude_prune_(model, 0.9)
    share_weights_(model, fc_bits=4)
    before_idx = model.fc1.parametrizations.weight[0].indices.clone()
    before_cb = model.fc1.parametrizations.weight[0].codebook.detach().clone()
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    fit(model, data, TrainConfig(epochs=1, lr=0.1, batch_size=16), device="cpu", progress=False)
    assert torch.equal(model.fc1.parametrizations.weight[0].indices, before_idx)
    assert not torch.equal(model.fc1.parametrizations.weight[0].codebook.detach(), before_cb)
    assert model.fc1.weight.unique().numel() <= 17


def test_hashed_sharing_has_k_buckets():
    model = zoo.get("lenet300")
    share_weights_(model, fc_bits=4, method="hash")
    assert parametrize.is_parametrized(model.fc1, "weight")
    assert model.fc1.weight.unique().numel() <= 17


def test_per_layer_precision_is_chosen_on_held_out_training_images(shared):
    from torch.utils.data import Subset

    from netslim import data
    from netslim.quant.precision import choose_sharing_bits, restore_shared_bits_, share_with_bits_

    model = zoo.get("lenet300")
    model.load_state_dict(torch.load(shared / "models/mnist_lenet300.pt", weights_only=True))
    magnitude_prune_(model, 0.9)
    from netslim.surgery import bake_parametrizations_
    bake_parametrizations_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = Subset(data.get("mnist", "train"), range(1000))
    choice = choose_sharing_bits(model, held_out, max_drop=0.3, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert set(choice.bits) == {"fc1", "fc2", "fc3"} and all(1 <= b <= 8 for b in choice.bits.values())
    assert choice.final_top1 >= choice.reference_top1 - 0.003
    assert any(b < 5 for b in choice.bits.values())  # fewer than Deep Compression's 5 fc bits somewhere
    anything = choose_sharing_bits(model, held_out, max_drop=99.0, device="cpu")
    assert set(anything.bits.values()) == {1}  # with no accuracy constraint the fewest bits win
    share_with_bits_(model, choice.bits)
    for name, b in choice.bits.items():
        w = getattr(model, name).weight
        assert torch.unique(w[w != 0]).numel() <= 1 << b
    state = model.state_dict()
    rebuilt = restore_shared_bits_(zoo.get("lenet300"), choice.bits)
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt.fc1.weight, model.fc1.weight)
    with pytest.raises(NetslimError, match="max_drop"):
        choose_sharing_bits(model, held_out, max_drop=-1)
