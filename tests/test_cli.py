import json
import subprocess
import sys

import pytest


def netslim(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "netslim.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_profile_vgg16_prints_params_and_macs():
    proc = netslim("profile", "--model", "vgg16", "--input", "1,3,32,32")
    assert proc.returncode == 0, proc.stderr
    assert "14,986,698" in proc.stdout and "313.46 M" in proc.stdout
    assert "features.0" in proc.stdout  # per-layer table


def test_profile_json_is_machine_readable():
    proc = netslim("profile", "--model", "torchvision:resnet18", "--input", "1,3,224,224", "--json", "--totals")
    doc = json.loads(proc.stdout)
    assert doc["macs"] == 1_814_073_344 and doc["params"] == 11_689_512
    assert float(doc["latency_ms"]["1"]) > 0


@pytest.mark.parametrize("args,needle", [
    (("profile", "--model", "resnet57"), "unknown model 'resnet57'"),
    (("profile", "--model", "vgg16", "--input", "1,3,x"), "expected comma-separated integers"),
    (("evaluate", "--model", "lenet5", "--weights", "missing.pt", "--data", "mnist"), "checkpoint not found"),
    (("evaluate", "--model", "lenet5", "--weights", "shared", "--data", "mnits"), "unknown dataset 'mnits'"),
    (("compress", "no/such/recipe.yaml"), "recipe file not found"),
    (("frobnicate",), "invalid choice"),
])
def test_user_mistakes_are_one_line_and_nonzero(args, needle):
    proc = netslim(*args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_evaluate_lenet5_on_mnist(shared):
    proc = netslim("evaluate", "--model", "lenet5", "--weights", str(shared / "models" / "mnist_lenet5.pt"),
                   "--data", "mnist", "--json")
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["top1"] - 0.9927) < 0.001


def test_stages_lists_registered_stages():
    proc = netslim("stages")
    assert proc.returncode == 0
    assert "finetune" in proc.stdout and "prune" in proc.stdout and "sparsity" in proc.stdout
