import pytest
import torch
from torch.utils.data import TensorDataset

from netslim import zoo
from netslim.prune.magnitude import contribution_plan, contribution_scores, planned_masks, threshold_masks
from netslim.prune.schedules import AGPHook, agp_sparsity
from netslim.prune.sensitivity import SensitivityTable, plan_sparsity, sensitivity_analysis
from netslim.prune import magnitude_masks, sparsity
from netslim.train import TrainConfig, fit


def test_agp_follows_the_cubic_curve():
    assert agp_sparsity(0, 100, 0.0, 0.9) == 0.0
    assert agp_sparsity(100, 100, 0.0, 0.9) == pytest.approx(0.9)
    assert agp_sparsity(50, 100, 0.0, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))


def test_agp_hook_reaches_the_final_sparsity_during_training():
    model = zoo.get("lenet300")
    data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    hook = AGPHook(lambda m, s: magnitude_masks(m, s), 0.0, 0.8, total_steps=16, frequency=2)
    fit(model, data, TrainConfig(epochs=1, batch_size=16), hooks=[hook], device="cpu", progress=False)
    assert sparsity(model) == pytest.approx(0.8, abs=0.01)


def test_threshold_rule_prunes_by_layer_std():
    model = zoo.get("lenet300")
    masks = threshold_masks(model, 1.0)
    w = model.fc1.weight.detach()
    assert masks["fc1"].sum() == (w.abs() > w.std()).sum()


def test_planned_and_contribution_masks():
    model = zoo.get("lenet300")
    masks = planned_masks(model, {"fc1": 0.9, "fc2": 0.5})
    assert masks["fc1"].mean().item() == pytest.approx(0.1, abs=0.01)
    plan = contribution_plan(model, 0.8)
    sizes = {n: model.get_submodule(n).weight.numel() for n in plan}
    reached = sum(plan[n] * sizes[n] for n in plan) / sum(sizes.values())
    assert reached == pytest.approx(0.8, abs=0.005)
    scores = contribution_scores(model)
    low = min(scores, key=scores.get)
    assert plan[low] == max(plan.values())  # lowest contribution per weight pruned hardest


def test_sensitivity_plan_prunes_robust_layers_more():
    table = SensitivityTable(grid=(0.0, 0.5, 0.9), accuracy={"a": [0.9, 0.9, 0.89], "b": [0.9, 0.6, 0.3]},
                             sizes={"a": 1000, "b": 1000})
    plan = plan_sparsity(table, 0.45)
    assert plan == {"a": 0.9, "b": 0.0}


def test_sensitivity_analysis_restores_weights():
    model = zoo.get("lenet300")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    table = sensitivity_analysis(model, data, grid=(0.0, 0.5, 0.99), progress=False)
    assert set(table.accuracy) == {"fc1", "fc2", "fc3"} and all(len(v) == 3 for v in table.accuracy.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
