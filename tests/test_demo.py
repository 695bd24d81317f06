"""The newcomer's default job, end to end: train LeNet-5 on Fashion-MNIST, compress, print the six ratios."""
import json
import os
import subprocess
import sys
import time


def test_demo_runs_end_to_end_and_ends_with_the_six_ratios(tmp_path):
    env = {**os.environ, "NETSLIM_CACHE": str(tmp_path / "cache")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "netslim.cli", "demo", "--out", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    tail = proc.stdout.strip().splitlines()
    table = "\n".join(tail[-14:])
    for ratio in ("r_A", "r_p", "r_T", "r_c", "r_E", "r_D"):
        assert ratio in table
    assert elapsed < 600
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    baseline, final = metrics[0], metrics[-1]
    assert baseline["top1"] > 0.85  # briefly trained LeNet-5 on Fashion-MNIST
    assert final["stage"] == "export"
    ratios = final["ratios"]
    assert ratios["r_c"] > 1.5 and ratios["r_A"] > 0.99  # structured pruning, distilled fine-tune
    assert ratios["r_p"] > 10  # a tenth of the weights (fc1 holds most of them)
    assert ratios["r_T_ort"] > 1.2  # the exported file is faster than the original in onnxruntime
    assert (tmp_path / "run" / "model.onnx").is_file() and "model.onnx" in proc.stdout
    assert (tmp_path / "cache" / "fashion_mnist_lenet5.pt").is_file()
