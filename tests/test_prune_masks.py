import torch
from torch.utils.data import TensorDataset

from netslim import zoo
from netslim.prune import magnitude_masks, magnitude_prune_, masked_modules, remove_masks_, sparsity
from netslim.train import TrainConfig, fit


def test_global_magnitude_pruning_hits_the_target_sparsity():
    model = zoo.get("lenet5")
    magnitude_prune_(model, 0.9, scope="global")
    assert abs(sparsity(model) - 0.9) < 1e-3
    assert set(masked_modules(model)) == {"conv1", "conv2", "fc1", "fc2"}


def test_layerwise_pruning_prunes_each_layer_alike():
    model = zoo.get("lenet300")
    masks = magnitude_masks(model, 0.6, scope="layer")
    for mask in masks.values():
        assert abs(1 - mask.mean().item() - 0.6) < 0.01


def test_pruned_weights_stay_zero_through_training_and_after_removal():
    torch.manual_seed(0)
    model = zoo.get("lenet300")
    magnitude_prune_(model, 0.8)
    zeros_before = {n: (m.weight == 0) for n, m in masked_modules(model).items()}
    data = TensorDataset(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)))
    fit(model, data, TrainConfig(epochs=2, lr=0.1, batch_size=32), device="cpu", progress=False)
    for name, module in masked_modules(model).items():
        assert torch.all(module.weight[zeros_before[name]] == 0)
    remove_masks_(model)
    assert not masked_modules(model)
    assert abs(sparsity(model) - 0.8) < 0.01
    assert "fc1.weight" in model.state_dict()
