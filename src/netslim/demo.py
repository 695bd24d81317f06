"""``netslim demo``: LeNet-5 on Fashion-MNIST, trained briefly when no checkpoint exists, then compressed
with the default recipe, ending in the six-ratio table."""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import yaml

from . import data as nsdata
from . import zoo
from .errors import NetslimError
from .io import save_torch
from .paths import cache_dir
from .pipeline import parse_recipe, run_recipe
from .train import TrainConfig, evaluate, fit

log = logging.getLogger("netslim.demo")
DEMO_RECIPE = "demo_lenet5_fashion_mnist.yaml"
BASELINE_CONFIG = TrainConfig(epochs=3, lr=0.02, warmup_epochs=0.3, batch_size=128, weight_decay=5e-4, seed=0)


def demo_recipe_text() -> str:
    return resources.files("netslim.recipes").joinpath(DEMO_RECIPE).read_text()


def ensure_baseline(path: Path, progress: bool = True) -> Path:
    """Train LeNet-5 on Fashion-MNIST into ``path`` unless a checkpoint is already there."""
    if path.is_file():
        return path
    train = nsdata.get("fashion-mnist", "train")
    print(f"no Fashion-MNIST LeNet-5 checkpoint at {path}; training one ({BASELINE_CONFIG.epochs} epochs)")
    model = zoo.get("lenet5")
    fit(model, train, BASELINE_CONFIG, device="cpu", checkpoint_path=path.with_suffix(".train.ckpt"),
        progress=progress)
    top1 = evaluate(model, nsdata.get("fashion-mnist", "test"), device="cpu")["top1"]
    print(f"baseline LeNet-5 on Fashion-MNIST: top-1 {100 * top1:.2f}%")
    save_torch(model.state_dict(), path)
    path.with_suffix(".train.ckpt").unlink(missing_ok=True)
    return path


def run_demo(out: str | Path = "runs/demo", restart: bool = False, progress: bool = True) -> list[dict]:
    nsdata.load_raw("fashion-mnist")  # fails early, with the places searched, when it is missing
    weights = ensure_baseline(cache_dir() / "fashion_mnist_lenet5.pt", progress)
    doc = yaml.safe_load(demo_recipe_text())
    doc["weights"] = str(weights)
    recipe = parse_recipe(doc)
    try:
        return run_recipe(recipe, out, restart=restart, progress=progress)
    except NetslimError as exc:
        if "different recipe" in str(exc):
            return run_recipe(recipe, out, restart=True, progress=progress)
        raise
