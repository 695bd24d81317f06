"""The front door: a user's own model file and data through the whole pipeline, from the CLI and from Python.

The model has what real users' models have and zoo models lack: grouped and depthwise convolutions, a channel
shuffle, a squeeze-excite gate, a concat, functional ReLU6 and a ``.view`` flatten.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import netslim
from netslim import NetslimError
from netslim.pipeline import load_recipe, restore_stage_model
from netslim.zoo.references import call_model_factory

OWN_MODEL = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset


    class SqueezeExcite(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.reduce = nn.Conv2d(c, c // 4, 1)
            self.expand = nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


    class Own(nn.Module):
        def __init__(self, num_classes=4):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(32)
            self.grouped = nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=False)
            self.gbn = nn.BatchNorm2d(64)
            self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
            self.dbn = nn.BatchNorm2d(64)
            self.se = SqueezeExcite(64)
            self.left = nn.Conv2d(64, 48, 3, padding=1)
            self.right = nn.Conv2d(64, 48, 1)
            self.head = nn.Conv2d(96, 96, 3, stride=2, padding=1)
            self.fc = nn.Linear(96, num_classes)

        def forward(self, x):
            x = F.relu6(self.bn(self.stem(x)))
            x = F.relu6(self.gbn(self.grouped(x)))
            n, c, h, w = x.shape
            x = x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
            x = F.relu6(self.dbn(self.depthwise(x)))
            x = self.se(x)
            x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)
            x = F.relu(self.head(x))
            x = F.adaptive_avg_pool2d(x, 1)
            return self.fc(x.view(x.size(0), -1))


    def build(num_classes=4):
        torch.manual_seed(0)
        return Own(num_classes)


    def data():
        """A learnable toy task: the class is which quadrant of the image is brightest."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(640, 3, 16, 16, generator=g) * 0.5
        y = torch.randint(0, 4, (640,), generator=g)
        for i, label in enumerate(y.tolist()):
            r, c = divmod(label, 2)
            x[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.0
        return TensorDataset(x[:512], y[:512]), TensorDataset(x[512:], y[512:])
''')

STAGES = [
    {"finetune": {"epochs": 4, "lr": 0.1, "batch_size": 32, "amp": False}},  # a trained start
    {"prune_channels": {"target": "macs:2"}},
    {"finetune": {"epochs": 6, "lr": 0.02, "batch_size": 32, "amp": False}},
    {"decompose": {"rank": 0.75, "refit_images": 128}},
    {"quantize": {"method": "ptq", "weight_bits": 8, "act_bits": 8}},
    {"export": {"check_images": 64, "repeats": 10}},
]


@pytest.fixture()
def own_files(tmp_path: Path) -> Path:
    (tmp_path / "own.py").write_text(OWN_MODEL)
    recipe = {"model": "own.py:build", "data": "own.py:data", "device": "cpu", "latency_batch_sizes": [1, 64],
              "stages": STAGES}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return tmp_path


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netslim.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def _onnx_agrees_at_batch_1_and_64(onnx_path: Path, model: torch.nn.Module) -> None:
    from netslim.export import ort_session, run_onnx

    session = ort_session(onnx_path, threads=1)
    model.eval()
    for batch in (1, 64):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        got = run_onnx(session, x)
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.shape == expected.shape == (batch, 4)
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 0.05 * scale, (batch, (got - expected).abs().max())
        assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.9


def test_own_model_file_through_cli_compress_resumes_after_sigkill(own_files: Path):
    out = own_files / "run"
    cmd = ["compress", "recipe.yaml", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "netslim.cli", *cmd], cwd=own_files,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    ckpt = out / "stages" / "02-finetune" / "train.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "the second fine-tune never wrote a checkpoint: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "state.json").read_text())
    assert state["finished"] == 2  # killed inside the second fine-tune

    done = _cli(*cmd, cwd=own_files)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "resuming after 2 finished stage(s)" in log and log.count("stage 2/6: prune_channels") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["stage"] for m in metrics] == ["baseline", "finetune", "prune_channels", "finetune", "decompose",
                                             "quantize", "export"]
    assert metrics[2]["ratios"]["r_c"] >= 1.9  # macs:2 after structured pruning (of the whole model)
    assert metrics[4]["effective_macs"] < metrics[3]["effective_macs"]  # the low-rank stage cut more
    assert metrics[-1]["score"] >= 0.85  # the toy task is learnt and survives the compression
    final = metrics[-1]
    assert final["onnx_check"]["top1_agreement"] >= 0.95
    assert set(final["ort_latency_ms"]) == {"1", "64"} and final["ratios"]["r_T_ort"] > 0

    # the resumed run's model, rebuilt from the same reference, is the one that was exported
    recipe = load_recipe(own_files / "recipe.yaml")
    base = call_model_factory(str(own_files / "own.py") + ":build")
    model = restore_stage_model(base, recipe, out, len(recipe.stages) - 1)
    _onnx_agrees_at_batch_1_and_64(out / "model.onnx", model)


def test_own_model_through_python_compress_with_config_objects(own_files: Path, one_thread):
    sys.path.insert(0, str(own_files))
    try:
        import own  # the user's module, imported as they would
    finally:
        sys.path.remove(str(own_files))
    from netslim.lowrank.stages import DecomposeConfig
    from netslim.pipeline.builtin import ExportConfig, FinetuneConfig
    from netslim.prune.structured.stages import ChannelPruneConfig

    train, test = own.data()
    model = own.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = [FinetuneConfig(epochs=4, lr=0.1, batch_size=32, amp=False), ChannelPruneConfig(target="macs:2"),
              DecomposeConfig(rank=0.75, refit_images=128), {"quantize": {"method": "ptq"}}, ExportConfig(repeats=5)]
    result = netslim.compress(model, stages, train_data=torch.utils.data.DataLoader(train, batch_size=32),
                              eval_data=test, out=own_files / "py", device="cpu", latency_batch_sizes=[1, 64],
                              progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert [m["stage"] for m in result.metrics] == ["baseline", "finetune", "prune_channels", "decompose", "quantize",
                                                  "export"]
    assert result.ratios["r_c"] >= 1.9 and result.ratios["r_p"] > 4  # half the MACs, int8 weights
    assert "model.onnx" in result.files
    _onnx_agrees_at_batch_1_and_64(result.files["model.onnx"], result.model)
    again = netslim.compress(model, stages, train_data=train, eval_data=test, out=own_files / "py", device="cpu",
                             latency_batch_sizes=[1, 64], progress=False)
    assert again.metrics == result.metrics  # a finished run is resumed, not redone
    other = own.build(num_classes=4)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    with pytest.raises(NetslimError, match="different recipe or model"):
        netslim.compress(other, stages, train_data=train, eval_data=test, out=own_files / "py", device="cpu",
                         progress=False)


def test_user_metric_on_a_dict_output_segmentation_model(tmp_path: Path, one_thread):
    from torch import nn
    from torch.utils.data import TensorDataset

    class TinySeg(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.classifier = nn.Conv2d(32, 3, 1)
            self.aux = nn.Conv2d(32, 3, 1)

        def forward(self, x):
            f = self.body(x)
            return {"out": self.classifier(f), "aux": self.aux(f)}

    def mean_iou(model, data) -> float:
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = torch.stack([data[i][1] for i in range(len(data))])
        pred = model(x)["out"].argmax(1)
        ious = [((pred == c) & (y == c)).sum() / ((pred == c) | (y == c)).sum().clamp(min=1) for c in range(3)]
        return float(torch.stack(ious).mean())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 12, 12, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    data = TensorDataset(x, y)
    result = netslim.compress(TinySeg(), [{"prune_channels": {"ratio": 0.5}}, "export"], train_data=data,
                              eval_data=data, metric=mean_iou, out=tmp_path / "seg", device="cpu", progress=False)
    rows = result.metrics
    assert rows[0]["metric"] == "mean_iou" and "top1" not in rows[0] and 0 <= rows[0]["score"] <= 1
    assert rows[1]["ratios"]["r_c"] > 1.5
    out = result.model(x[:2])
    assert out["out"].shape == (2, 3, 12, 12) and out["aux"].shape == (2, 3, 12, 12)
    assert rows[-1]["onnx_check"]["max_abs_diff"] < 1e-3
    report = (tmp_path / "seg" / "report.md").read_text()
    assert "mean_iou" in report


def test_reference_errors_are_one_clear_line(tmp_path: Path, monkeypatch, capsys):
    from netslim.cli import main

    (tmp_path / "own.py").write_text(OWN_MODEL)
    (tmp_path / "broken.py").write_text("def build():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    bad = [
        ("own.py:nope", "has no function 'nope'"),
        ("missing.py:build", "not found"),
        ("no_such_package_xyz.models:build", "cannot import module"),
        ("broken.py:build", "not a torch.nn.Module"),
    ]
    for ref, message in bad:  # in this process: any exception other than the CLI's own error fails the test
        capsys.readouterr()
        assert main(["profile", "--model", ref, "--input", "1,3,16,16", "--no-latency"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("netslim: error:") and message in err, err
    proc = _cli("profile", "--model", "own.py:nope", "--input", "1,3,16,16", "--no-latency", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    with pytest.raises(NetslimError, match="eval_data is required"):
        netslim.compress(torch.nn.Linear(2, 2), ["export"], train_data=[(torch.zeros(2), 0)])
    from dataclasses import dataclass

    @dataclass
    class NotAStage:
        x: int = 0

    with pytest.raises(NetslimError, match="not a stage config"):
        netslim.compress(torch.nn.Linear(2, 2), [NotAStage()], eval_data=[(torch.zeros(2), 0)])


def test_timm_model_reference_builds_and_prunes():
    from netslim.prune.structured import structured

    model = netslim.zoo.get("timm:resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = structured(model, x, 0.5)
    assert pruned(x).shape == (1, 10)
    assert netslim.profile(pruned, x, latency=False).macs < 0.5 * netslim.profile(model, x, latency=False).macs
    assert np.isfinite(pruned(x).detach().numpy()).all()
