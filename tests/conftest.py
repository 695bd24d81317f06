"""Shared fixtures. Integration tests need ../shared: when it is missing they fail with a clear message."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NETSLIM_SHARED", ROOT.parent / "shared"))

# Reference top-1 of the shared checkpoints (../shared/README.md, fp32 CPU)
SHARED_TOP1 = {
    "lenet300": ("mnist", 0.9845), "lenet5": ("mnist", 0.9927), "resnet20": ("cifar10", 0.8859),
    "resnet56": ("cifar10", 0.8957), "mobilenetv2": ("cifar10", 0.8951), "vgg16": ("cifar10", 0.9022),
}


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "models").is_dir() or not (SHARED / "data").is_dir():
        pytest.fail(f"integration tests need the shared folder with models/ and data/ at {SHARED} "
                    "(set NETSLIM_SHARED to its path)")
    return SHARED


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture()
def one_thread():
    """One torch thread for tests of tiny tensors (faster than two, never oversubscribes); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def torchrun(tmp_path):
    """``torchrun(script_text, *args)``: run a script in 2 CPU processes (gloo, one thread each) and
    return the finished process; a non-zero exit fails the test with the end of its stderr."""
    import subprocess

    def run(script_text: str, *args: str, timeout: int = 240):
        script = tmp_path / "torchrun_script.py"
        script.write_text(script_text)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run


@pytest.fixture()
def python() -> str:
    return sys.executable
