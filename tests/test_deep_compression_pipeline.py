"""Integration: prune -> finetune -> quantize -> finetune -> encode on LeNet-300-100, with resume."""
import json

import torch
import yaml

from netslim import encode
from netslim.pipeline import parse_recipe, run_recipe


def test_deep_compression_recipe_end_to_end_and_resumable(shared, tmp_path):
    doc = {"model": "lenet300", "weights": "shared", "data": "mnist", "test_limit": 2000, "stages": [
        {"prune": {"sparsity": 0.9}},
        {"finetune": {"epochs": 1, "lr": 0.01, "max_steps_per_epoch": 40}},
        {"quantize": {"fc_bits": 5}},
        {"finetune": {"epochs": 1, "lr": 0.001, "max_steps_per_epoch": 20}},
        {"encode": {}}]}
    run = tmp_path / "run"
    metrics = run_recipe(parse_recipe(doc), run, progress=False)
    final = metrics[-1]
    assert final["stage"] == "encode"
    assert final["ratios"]["r_p"] > 30 and final["ratios"]["r_D"] > 0
    assert final["top1"] > 0.95
    nsz = run / "stages" / "04-encode" / "model.nsz"
    assert final["stored_bytes"] == nsz.stat().st_size
    report = (run / "report.md").read_text()
    assert "bits/non-zero" in report and "shared_sparse" in report
    # resuming a finished run replays every structure (masks, shared weights, baked encode) and loads
    metrics_again = run_recipe(parse_recipe(doc), run, progress=False)
    assert metrics_again == json.loads((run / "metrics.json").read_text())
    model = encode.load(nsz)
    x = torch.randn(4, 1, 28, 28)
    assert model(x).shape == (4, 10)


def test_sensitivity_plan_shows_in_the_report(shared, tmp_path):
    doc = {"model": "lenet5", "weights": "shared", "data": "mnist", "test_limit": 500, "stages": [
        {"prune": {"sparsity": 0.9, "plan": "sensitivity", "sensitivity_samples": 200,
                   "sensitivity_grid": [0.0, 0.5, 0.9, 0.97]}}]}
    run_recipe(parse_recipe(doc), tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "![sensitivity](stages/00-prune/sensitivity.png)" in report
    assert "| conv1 |" in report and "plan" in report
    assert (tmp_path / "run" / "stages" / "00-prune" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_decompose_stage_with_fine_tuning_resumes_from_recorded_ranks(shared, tmp_path):
    doc = {"model": "lenet300", "weights": "shared", "data": "mnist", "test_limit": 1000, "stages": [
        {"decompose": {"method": "svd", "selector": "energy", "energy": 0.8}},
        {"finetune": {"epochs": 1, "lr": 0.005, "max_steps_per_epoch": 20}}]}
    run = tmp_path / "run"
    metrics = run_recipe(parse_recipe(doc), run, progress=False)
    assert metrics[1]["ratios"]["r_c"] > 1.5 and metrics[2]["top1"] > 0.9
    state = json.loads((run / "state.json").read_text())
    assert "fc1" in state["artifacts"][0]["structure"]
    assert run_recipe(parse_recipe(doc), run, progress=False) == metrics  # resume replays the ranks
