import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from netslim import NetslimError
from netslim.pipeline import build_config, load_recipe, parse_recipe, run_recipe, stage_names


def recipe_doc(**overrides):
    doc = {"model": "lenet300", "weights": "shared", "data": "mnist", "test_limit": 2000,
           "stages": [{"prune": {"sparsity": 0.8}}, {"finetune": {"epochs": 1, "lr": 0.01, "max_steps_per_epoch": 30}}]}
    doc.update(overrides)
    return doc


def test_misspelled_stage_names_the_valid_stages():
    with pytest.raises(NetslimError) as err:
        parse_recipe(recipe_doc(stages=[{"prun": {"sparsity": 0.5}}]))
    msg = str(err.value)
    assert "unknown stage 'prun'" in msg
    for name in stage_names():
        assert name in msg


def test_misspelled_key_names_the_valid_keys():
    with pytest.raises(NetslimError, match="unknown key 'sparsty'.*valid keys: method, sparsity"):
        parse_recipe(recipe_doc(stages=[{"prune": {"sparsty": 0.5}}]))
    with pytest.raises(NetslimError, match="unknown recipe key 'stagse'"):
        parse_recipe({"model": "lenet5", "data": "mnist", "stagse": []})


def test_bad_values_fail_at_parse_time():
    with pytest.raises(NetslimError, match="sparsity"):
        build_config("prune", {"sparsity": 1.5})
    with pytest.raises(NetslimError, match="valid optimizers"):
        build_config("finetune", {"optimizer": "rmsprop2"})


def test_recipe_with_a_bad_stage_fails_before_any_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_doc(stages=[{"prune": {}}, {"finetnue": {}}])))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "netslim.cli", "compress", str(path), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "valid stages" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\ndata: mnist\nstages: [prune]\n")
    with pytest.raises(NetslimError, match="not valid YAML"):
        load_recipe(path)


def test_run_writes_the_run_directory(shared, tmp_path):
    recipe = parse_recipe(recipe_doc())
    metrics = run_recipe(recipe, tmp_path / "run", progress=False)
    assert [m["stage"] for m in metrics] == ["baseline", "prune", "finetune"]
    run = tmp_path / "run"
    for name in ("recipe.yaml", "log.txt", "metrics.json", "report.md", "stages/00-prune.pt", "stages/01-finetune.pt"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved[-1]["ratios"]) == {"r_A", "r_p", "r_T", "r_c", "r_E", "r_D"}
    assert saved[1]["ratios"]["r_c"] == pytest.approx(5, rel=0.05)  # 80 % of the weights pruned
    assert saved[2]["top1"] > saved[1]["top1"] - 0.002  # fine-tuning does not hurt
    report = (run / "report.md").read_text()
    assert "| 2 | finetune |" in report and "r_E" in report
    # the saved checkpoint keeps the mask: pruned weights are still zero after fine-tuning
    state = torch.load(run / "stages/01-finetune.pt", weights_only=True)
    mask = state["fc1.parametrizations.weight.0.mask"]
    weight = state["fc1.parametrizations.weight.original"] * mask
    assert float((weight == 0).float().mean()) > 0.5


def test_a_different_recipe_in_the_same_run_dir_is_refused(shared, tmp_path):
    run_recipe(parse_recipe(recipe_doc(stages=[{"prune": {"sparsity": 0.5}}])), tmp_path / "run", progress=False)
    with pytest.raises(NetslimError, match="different recipe"):
        run_recipe(parse_recipe(recipe_doc(stages=[{"prune": {"sparsity": 0.6}}])), tmp_path / "run", progress=False)


def test_sigkill_during_finetune_resumes_without_redoing_finished_stages(shared, tmp_path):
    doc = recipe_doc(stages=[{"prune": {"sparsity": 0.9}},
                             {"finetune": {"epochs": 40, "lr": 0.01, "max_steps_per_epoch": 40}}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "netslim.cli", "compress", str(path), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / "stages" / "01-finetune" / "train.ckpt"
    deadline = time.time() + 180
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.2)
    assert ckpt.exists(), "fine-tuning never wrote a checkpoint"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epochs_done < 40
    prune_ckpt = out / "stages" / "00-prune.pt"
    prune_mtime = prune_ckpt.stat().st_mtime_ns

    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert prune_ckpt.stat().st_mtime_ns == prune_mtime  # the prune stage was not redone
    log = (out / "log.txt").read_text()
    assert "resuming after 1 finished stage" in log
    assert f"resumed from {ckpt} after epoch {epochs_done}" in log
    assert log.count("stage 1/2: prune") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["stage"] for m in metrics] == ["baseline", "prune", "finetune"]


def test_every_shipped_recipe_parses():
    from pathlib import Path

    from netslim.demo import demo_recipe_text

    root = Path(__file__).resolve().parents[1] / "recipes"
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.stages, path
    demo = parse_recipe(yaml.safe_load(demo_recipe_text()))
    assert [s.name for s in demo.stages][-1] == "export"


def test_test_limit_takes_a_class_balanced_random_subset(shared):
    from netslim.pipeline.databundle import DataBundle

    subset = DataBundle("cifar10", test_limit=500).test
    labels = {int(subset[i][1]) for i in range(len(subset))}
    assert len(subset) == 500 and labels == set(range(10))  # the test set is stored sorted by class


def test_recipe_augment_false_trains_on_the_plain_images(tmp_path):
    from netslim.pipeline import load_recipe
    from netslim.pipeline.runner import inputs_from_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: lenet300\ndata: mnist\naugment: false\nstages: [finetune]\n")
    recipe = load_recipe(path)
    bundle = inputs_from_recipe(recipe, torch.device("cpu")).data
    assert torch.equal(bundle.train[0][0], bundle.train[0][0]) and bundle.train.augment == "none"
    path.write_text("model: lenet300\ndata: mnist\nstages: [finetune]\n")
    assert inputs_from_recipe(load_recipe(path), torch.device("cpu")).data.train.augment == "shift"
    path.write_text("model: lenet300\ndata: mnist\naugment: 0\nstages: [finetune]\n")
    with pytest.raises(NetslimError, match="augment.*true or false"):
        load_recipe(path)
