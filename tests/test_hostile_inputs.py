"""Careless hands and hostile files at the front door: every bad input is one ``netslim: error:`` line with
exit status 2 (no traceback, nothing half-written); run directories cannot be mixed by two runs; a ``prune``
stage that trains resumes per epoch after a SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from netslim.errors import NetslimError
from netslim.pipeline.recipe import load_recipe

TINY = textwrap.dedent('''
    import time

    import torch
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset


    def build(num_classes=4):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


    def build_img(num_classes=2):
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, num_classes))


    class Slow(Dataset):
        """A training set that takes a little time per item, so a kill lands in the middle of a stage."""

        def __init__(self, x, y, delay):
            self.x, self.y, self.delay = x, y, delay

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            time.sleep(self.delay)
            return self.x[i], self.y[i]


    def _xy():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(320, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (320,), generator=g)
        return x, y


    def data():
        x, y = _xy()
        return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


    def gated_data():
        """Holds the run (and its lock) until the test creates the file ``go``."""
        import os

        deadline = time.time() + 60
        while not os.path.exists("go") and time.time() < deadline:
            time.sleep(0.05)
        return data()


    def slow_data():
        x, y = _xy()
        return Slow(x[:256], y[:256], 0.002), TensorDataset(x[256:], y[256:])
''')

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netslim.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _recipe(tmp: Path, filename: str = "r.yaml", stages=None, **top) -> Path:
    doc = {"model": "own.py:build", "data": "own.py:data", "device": "cpu",
           "stages": stages or [{"prune": {"sparsity": 0.5}}], **top}
    path = tmp / filename
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    (tmp_path / "own.py").write_text(TINY)
    return tmp_path


def _assert_one_clean_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("netslim: error:"), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------ bad inputs, one line each
def _bad_recipe_key(key, value):
    def make(tmp: Path):
        return ["compress", str(_recipe(tmp, **{key: value})), "--out", str(tmp / "run")]
    return make


def _bad_stage(stages):
    def make(tmp: Path):
        return ["compress", str(_recipe(tmp, stages=stages)), "--out", str(tmp / "run")]
    return make


def _binary_recipe(tmp: Path):
    (tmp / "bin.yaml").write_bytes(bytes(range(256)) * 8)
    return ["compress", str(tmp / "bin.yaml"), "--out", str(tmp / "run")]


def _billion_laughs(tmp: Path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines += ["model: own.py:build", "data: own.py:data", "stages: [prune]", "name: *a9"]
    (tmp / "lol.yaml").write_text("\n".join(lines) + "\n")
    return ["compress", str(tmp / "lol.yaml"), "--out", str(tmp / "run")]


def _long_list(tmp: Path):
    # 50 million items would take 100 MB of text; the size cap refuses it first; a list that fits under the
    # cap but still holds too many values is refused by the node count
    (tmp / "big.yaml").write_text("model: own.py:build\ndata: own.py:data\nstages: [prune]\n"
                                  "latency_batch_sizes: [" + ",".join(["1"] * 30_000) + "]\n")
    return ["compress", str(tmp / "big.yaml"), "--out", str(tmp / "run")]


def _huge_file(tmp: Path):
    with open(tmp / "huge.yaml", "w") as f:
        f.write("model: own.py:build\ndata: own.py:data\nstages: [prune]\nlatency_batch_sizes: [")
        f.write("1," * (1 << 20))
        f.write("1]\n")
    return ["compress", str(tmp / "huge.yaml"), "--out", str(tmp / "run")]


def _out_is_file(tmp: Path):
    (tmp / "afile").write_text("x")
    return ["compress", str(_recipe(tmp)), "--out", str(tmp / "afile")]


def _train_out_is_dir(tmp: Path):
    (tmp / "adir").mkdir()
    return ["train", "--model", "lenet300", "--data", "mnist", "--out", str(tmp / "adir")]


def _read_only_out(tmp: Path):
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ["compress", str(_recipe(tmp)), "--out", str(ro / "run")]


def _read_only_run_dir(tmp: Path):
    ro = tmp / "rorun"
    ro.mkdir()
    ro.chmod(0o555)
    return ["compress", str(_recipe(tmp)), "--out", str(ro)]


def _out_under_a_file(tmp: Path):
    (tmp / "afile").write_text("x")
    return ["compress", str(_recipe(tmp)), "--out", str(tmp / "afile" / "run")]


def _train_out_under_a_file(tmp: Path):
    (tmp / "afile").write_text("x")
    return ["train", "--model", "lenet300", "--data", "mnist", "--out", str(tmp / "afile" / "w.pt")]


def _pickle_training_checkpoint(tmp: Path):
    import pickle

    (tmp / "w.pt.train.ckpt").write_bytes(pickle.dumps({"epoch": 1, "payload": print}))
    return ["train", "--model", "own.py:build_img", "--data", str(_image_folder(tmp, good=True)), "--out",
            str(tmp / "w.pt"), "--device", "cpu", "--max-steps", "1", "--no-amp"]


def _image_folder(tmp: Path, good: bool) -> Path:
    from PIL import Image

    root = tmp / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            if good:
                Image.new("RGB", (8, 8), (10, 200, 30)).save(root / split / cls / "x.png")
            else:
                (root / split / cls / "x.jpg").write_bytes(b"this is not a jpeg" * 10)
    return root


def _weights(tmp: Path, name: str) -> Path:
    import netslim.zoo as zoo

    torch.save(zoo.get(name).state_dict(), tmp / f"{name}.pt")
    return tmp / f"{name}.pt"


def _shape_mismatch(tmp: Path):
    # an MLP for 28x28 MNIST digits asked to classify 224x224 RGB images
    return ["evaluate", "--model", "lenet300", "--weights", str(_weights(tmp, "lenet300")),
            "--data", str(_image_folder(tmp, good=True)), "--json"]


def _non_image_folder(tmp: Path):
    return ["evaluate", "--model", "lenet300", "--weights", str(_weights(tmp, "lenet300")),
            "--data", str(_image_folder(tmp, good=False)), "--json"]


def _cifar_tar(tmp: Path, garbage: bool) -> Path:
    import io
    import tarfile

    from PIL import Image

    (tmp / "data" / "cifar10").mkdir(parents=True)
    path = tmp / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(40):
            buf = io.BytesIO()
            Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()).save(buf, "JPEG")
            data = buf.getvalue()
            if garbage and i == 7:
                data = b"\xff\xd8\xff garbage" + bytes(200)
            info = tarfile.TarInfo(f"cifar10/{'train' if i % 2 else 'test'}/cat/{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if not garbage:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return tmp / "data"


def _truncated_cifar(tmp: Path):
    return ["evaluate", "--model", "resnet20", "--weights", str(_weights(tmp, "resnet20")), "--data", "cifar10",
            "--data-root", str(_cifar_tar(tmp, garbage=False)), "--json"]


def _garbage_jpeg_in_cifar(tmp: Path):
    return ["evaluate", "--model", "resnet20", "--weights", str(_weights(tmp, "resnet20")), "--data", "cifar10",
            "--data-root", str(_cifar_tar(tmp, garbage=True)), "--json"]


BAD = {
    "epochs_float": (_bad_stage([{"finetune": {"epochs": 1.5}}]), ["1.5"]),
    "seed_string": (_bad_recipe_key("seed", "x"), ["seed", "'x'"]),
    "num_classes_zero": (_bad_recipe_key("num_classes", 0), ["num_classes"]),
    "test_limit_negative": (_bad_recipe_key("test_limit", -5), ["test_limit", "-5"]),
    "recipe_device_foo": (_bad_recipe_key("device", "foo"), ["'foo'", "cpu"]),
    "cli_device_foo": (lambda t: ["evaluate", "--model", "lenet300", "--weights", "x.pt", "--data", "mnist",
                                  "--device", "foo"], ["'foo'", "cpu"]),
    "cli_batch_size_zero": (lambda t: ["evaluate", "--model", "lenet300", "--weights", "x.pt", "--data", "mnist",
                                       "--batch-size", "0"], ["--batch-size"]),
    "train_batch_size_zero": (lambda t: ["train", "--model", "lenet300", "--data", "mnist", "--out", "w.pt",
                                         "--batch-size", "0"], ["--batch-size"]),
    "binary_recipe": (_binary_recipe, ["UTF-8"]),
    "billion_laughs": (_billion_laughs, ["expands to more than"]),
    "long_list": (_long_list, ["expands to more than"]),
    "huge_recipe": (_huge_file, ["larger than"]),
    "compress_out_is_file": (_out_is_file, ["is a file"]),
    "train_out_is_dir": (_train_out_is_dir, ["is a directory"]),
    "compress_out_under_a_file": (_out_under_a_file, ["cannot create run directory"]),
    "train_out_under_a_file": (_train_out_under_a_file, ["is a file, not a directory"]),
    "read_only_parent": (_read_only_out, ["cannot create run directory"]),
    "read_only_run_dir": (_read_only_run_dir, ["not writable"]),
    "pickle_as_training_checkpoint": (_pickle_training_checkpoint, ["not a netslim training checkpoint"]),
    "evaluate_shape_mismatch": (_shape_mismatch, ["input shape does not fit"]),
    "non_image_folder": (_non_image_folder, ["not a readable image"]),
    "truncated_cifar_tar": (_truncated_cifar, ["damaged or truncated"]),
    "garbage_jpeg_in_cifar_tar": (_garbage_jpeg_in_cifar, ["0007.jpg", "not a readable JPEG"]),
}
if torch.cuda.is_available():
    BAD.pop("recipe_device_foo")
else:
    BAD["recipe_device_cuda_without_gpu"] = (_bad_recipe_key("device", "cuda"), ["no CUDA GPU"])
    BAD["cli_device_cuda_without_gpu"] = (lambda t: ["train", "--model", "lenet300", "--data", "mnist", "--out",
                                                     "w.pt", "--device", "cuda"], ["no CUDA GPU"])


def _main_in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``netslim.cli.main`` in this process (a subprocess per case costs seconds of imports): any exception
    other than the CLI's own exit escapes and fails the test, as a traceback would."""
    from netslim.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's one-line error
        rc = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, captured.out, captured.err)


def _deny_writes_as_the_kernel_would_for_a_user(tmp: Path, monkeypatch) -> None:
    """Root may write into a 0o555 folder, so as root the test makes the calls the run makes fail inside the
    read-only folders exactly as they fail for any other user (EACCES from mkdir, W_OK denied by access)."""
    import errno
    import pathlib

    read_only = [tmp / "ro", tmp / "rorun"]

    def inside(path) -> bool:
        path = Path(path).absolute()
        return any(path == r or r in path.parents for r in read_only)

    real_mkdir, real_access = pathlib.Path.mkdir, os.access

    def mkdir(self, *args, **kwargs):
        if inside(self) and not self.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def access(path, mode, *args, **kwargs):
        if inside(path) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clean_line(case: str, tiny: Path, monkeypatch, capsys):
    make, needles = BAD[case]
    args = make(tiny)
    if case.startswith("read_only") and os.geteuid() == 0:
        _deny_writes_as_the_kernel_would_for_a_user(tiny, monkeypatch)
    proc = _main_in_process(args, tiny, monkeypatch, capsys)
    _assert_one_clean_line(proc, *needles)
    assert not (tiny / "run" / "metrics.json").exists()


def test_bad_input_through_a_real_process(tiny: Path):
    """One case end to end through ``python -m netslim.cli`` (the others run ``main`` in-process: a process
    costs seconds of imports each)."""
    make, needles = BAD["binary_recipe"]
    _assert_one_clean_line(_cli(*make(tiny), cwd=tiny), *needles)


def test_recipe_limits_in_process(tmp_path: Path):
    (tmp_path / "own.py").write_text(TINY)
    assert _billion_laughs(tmp_path)
    with pytest.raises(NetslimError, match="expands to more than"):
        load_recipe(tmp_path / "lol.yaml")
    (tmp_path / "deep.yaml").write_text("model: m\ndata: d\nstages: [prune]\nname: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(NetslimError, match="nests deeper"):
        load_recipe(tmp_path / "deep.yaml")
    # an ordinary recipe with a few aliases still loads
    (tmp_path / "ok.yaml").write_text("model: own.py:build\ndata: own.py:data\n"
                                      "stages:\n  - finetune: &ft {epochs: 1, lr: 0.01}\n  - finetune: *ft\n")
    assert len(load_recipe(tmp_path / "ok.yaml").stages) == 2


# ------------------------------------------------------------------ run directories cannot be mixed
def test_two_recipes_on_one_out_one_is_refused_the_other_intact(tiny: Path):
    (tiny / "own.py").write_text(TINY)
    slow = _recipe(tiny, "slow.yaml", stages=[{"finetune": {"epochs": 2, "lr": 0.01, "batch_size": 32,
                                                            "amp": False}}], data="own.py:gated_data", name="slow")
    other = _recipe(tiny, "other.yaml", stages=[{"prune": {"sparsity": 0.3}}], name="other")
    out = tiny / "run"
    cmd = [sys.executable, "-m", "netslim.cli", "compress", str(slow), "--out", str(out), "--no-progress"]
    first = subprocess.Popen(cmd, cwd=tiny, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    lock = out / ".netslim.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.stat().st_size > 0):
        time.sleep(0.05)
    assert lock.exists(), "the first run never took the lock"
    holder = json.loads(lock.read_text())["pid"]
    assert holder == first.pid
    second = _cli("compress", str(other), "--out", str(out), "--no-progress", cwd=tiny)
    _assert_one_clean_line(second, "in use by another netslim run", f"PID {first.pid}")
    (tiny / "go").write_text("")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err.decode()[-2000:]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "slow"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["stage"] for m in metrics] == ["baseline", "finetune"]
    assert lock.read_text() == ""  # released on exit


def test_stale_lock_and_leftover_temp_files_after_a_kill(tiny: Path, monkeypatch):
    from netslim.pipeline import load_recipe as load, run_recipe
    from netslim.pipeline.runner import RunLock

    monkeypatch.chdir(tiny)
    monkeypatch.syspath_prepend(str(tiny))
    out = tiny / "run"
    (out / "stages" / "00-prune").mkdir(parents=True)
    # a lock file left by a process killed with SIGKILL: its flock died with it, the PID is stale
    (out / ".netslim.lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    leftovers = [out / ".state.json.abc123.tmp", out / "stages" / ".00-prune.pt.x1y2.tmp",
                 out / "stages" / "00-prune" / ".train.ckpt.q9.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    metrics = run_recipe(load(_recipe(tiny)), out, progress=False)
    assert [m["stage"] for m in metrics] == ["baseline", "prune"]
    assert not any(p.exists() for p in leftovers)
    assert "removed 3 leftover temp file" in (out / "log.txt").read_text()
    assert (out / ".netslim.lock").read_text() == ""  # released
    lock = RunLock(out)  # and free for the next taker
    lock.acquire()
    lock.release()


def test_lock_held_in_process_refuses_netslim_compress(tiny: Path):
    import netslim
    from netslim.pipeline.runner import RunLock
    from torch.utils.data import TensorDataset

    out = tiny / "run"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        x = torch.randn(32, 1, 8, 8)
        data = TensorDataset(x, torch.randint(0, 4, (32,)))
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
        # flock is per open file: a second acquisition in the same process is refused too
        with pytest.raises(NetslimError, match=f"PID {os.getpid()}"):
            netslim.compress(model, ["prune"], train_data=data, eval_data=data, out=out, device="cpu",
                             progress=False)
    finally:
        lock.release()


# ------------------------------------------------------------------ per-epoch resume inside `prune` with train:
def test_sigkill_inside_a_training_prune_stage_resumes_from_its_last_epoch(tiny: Path):
    epochs = 12
    stages = [{"prune": {"sparsity": 0.8, "schedule": "agp", "agp_frequency": 2,
                         "train": {"epochs": epochs, "lr": 0.01, "batch_size": 32, "amp": False}}}]
    path = _recipe(tiny, "agp.yaml", stages=stages, data="own.py:slow_data")
    out = tiny / "run"
    cmd = [sys.executable, "-m", "netslim.cli", "compress", str(path), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tiny, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    ckpt = out / "stages" / "00-prune" / "train.ckpt"
    deadline = time.time() + 90
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    assert ckpt.exists(), "the prune stage never wrote a training checkpoint"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=True)
    done = state["epoch"]
    assert 1 <= done < epochs, done
    assert state["hooks"][0]["step"] == done * 8  # 256 images / 32 per step

    finished = subprocess.run(cmd, cwd=tiny, capture_output=True, text=True, timeout=120, env=ENV)
    assert finished.returncode == 0, finished.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert f"resumed from {ckpt} after epoch {done}" in log
    assert log.count(f"epoch {done}/{epochs}") == 1  # the finished epochs were not trained again
    assert log.count(f"epoch {epochs}/{epochs}") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["stage"] for m in metrics] == ["baseline", "prune"]
    sparsity = 1 - metrics[-1]["nonzero_params"] / metrics[-1]["params"]
    assert sparsity > 0.7  # the AGP schedule went on from where it was, to its final sparsity


def test_netslim_compress_checks_its_arguments_before_any_work(tmp_path: Path):
    import netslim
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    bad = [({"seed": "x"}, "seed"), ({"test_limit": -5}, "test_limit"), ({"device": "foo"}, "'foo'"),
           ({"latency_batch_sizes": [0]}, "latency_batch_sizes")]
    for kwargs, needle in bad:
        with pytest.raises(NetslimError, match=needle):
            netslim.compress(model, ["prune"], train_data=data, eval_data=data, out=tmp_path / "run", progress=False,
                             **kwargs)
    assert not (tmp_path / "run").exists()


def test_lock_without_flock_uses_an_exclusive_file_and_recognises_a_stale_one(tmp_path: Path, monkeypatch):
    from netslim.pipeline.runner import RunLock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on a system without flock
    (tmp_path / ".netslim.lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": "h"}))  # a dead PID
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / ".netslim.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(NetslimError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".netslim.lock").exists()


def test_inq_resumes_portion_by_portion_to_the_same_weights(tmp_path: Path, one_thread):
    import shutil

    from torch.utils.data import TensorDataset

    from netslim.quant.lowbit import inq_train
    from netslim.train import TrainConfig

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16, amp=False)
    whole = inq_train(model(), data, cfg, device="cpu", checkpoint_dir=tmp_path / "a")
    ckpts = sorted((tmp_path / "a").glob("inq*.ckpt"))
    assert len(ckpts) == 3  # portions 0.5, 0.75, 0.875 train; 1.0 freezes the rest
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / ckpts[-1].name).unlink()  # killed during the last portion's training
    resumed = inq_train(model(), data, cfg, device="cpu", checkpoint_dir=tmp_path / "b")
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
