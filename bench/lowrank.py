"""Benchmark: low-rank factorization of VGG-16 and ResNet-56 (CIFAR-10) at 2x and 3x fewer MACs.

For each model and MAC target: netslim's methods (spatial SVD, Tucker-2, CP) with rank selectors
(uniform fixed fraction, energy, greedy target search on measured sensitivity; VBMF is one-shot
and reported at the reduction it picks), side by side with TensorLy-Torch's factorized
convolutions (``tltorch.FactorizedConv``, implementation "factorized" and "reconstructed") at the
same MAC target. Reported: MACs, params, top-1 before fine-tuning, top-1 after the same short
fine-tune (the best netslim config and the best peer config of each target), CPU latency at batch
1 and 64 measured in the same run as the dense model.

The GPU form fine-tunes for epochs; without a GPU (this file's default) the CPU form evaluates on
a fixed random subset of the test set and fine-tunes for a few hundred steps. The JSON says which.

    .venv/bin/python bench/lowrank.py [--models vgg16,resnet56] [--test-images 2000] [--ft-steps 150]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.lowrank import apply_plan_, greedy_rank_search, plan_decomposition
from netslim.report import write_result
from netslim.surgery import replace_module_
from netslim.train import TrainConfig, evaluate, fit

X = torch.randn(1, 3, 32, 32)
ALS_ITERS = 100 if torch.cuda.is_available() else 15  # CP-ALS / Tucker-HOOI iterations (CPU form: fewer)


def macs(model: nn.Module) -> int:
    return netslim.profile(model, X, latency=False).macs


def bisect(build, target_macs: int, lo: float = 0.02, hi: float = 1.0, steps: int = 14):
    """The largest knob in [lo, hi] whose model has at most ``target_macs`` (knob: rank fraction or energy)."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = build(mid)
        if macs(model) <= target_macs:
            best, lo = (mid, model), mid
        else:
            hi = mid
    return best


def plan_macs(base, dense_macs: int, plan) -> int:
    """Model MACs after a plan, from the formulas (no decomposition is computed)."""
    return dense_macs - sum(p.before.macs - p.after.macs for p in plan.layers.values() if p.skipped is None)


def netslim_plan(base, method, selector, dense_macs, goal, lo, hi):
    """Bisect the rank fraction (or energy) on formula MACs, then decompose once."""
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        plan = plan_decomposition(base, X, method, selector, min(mid, 0.999999) if selector == "energy" else mid)
        if plan_macs(base, dense_macs, plan) <= goal:
            best, lo = (mid, plan), mid
        else:
            hi = mid
    if best is None:
        return None
    model = copy.deepcopy(base)
    apply_plan_(model, best[1], iters=ALS_ITERS)
    return best[0], model


def tltorch_build(base, factorization, implementation, decompose=True):
    import tltorch

    def build(f):
        m = copy.deepcopy(base)
        for name, conv in list(m.named_modules()):
            if isinstance(conv, nn.Conv2d) and conv.kernel_size != (1, 1) and conv.groups == 1 and conv.in_channels > 3:
                fac = tltorch.FactorizedConv.from_conv(conv, rank=f, factorization=factorization,
                                                       implementation=implementation, decompose_weights=decompose,
                                                       decomposition_kwargs={"n_iter_max": ALS_ITERS})
                replace_module_(m, name, fac)
        return m
    return build


def tltorch_at_target(base, factorization, goal):
    """Bisect TensorLy-Torch's rank fraction on MACs with random factors (fast), decompose once, and
    return the model in both of its implementations ("factorized", "reconstructed"), same factors."""
    got = bisect(tltorch_build(base, factorization, "factorized", decompose=False), goal, lo=0.01, hi=1.0, steps=10)
    if got is None:
        return {}
    factorized = tltorch_build(base, factorization, "factorized")(got[0])
    reconstructed = copy.deepcopy(factorized)
    for m in reconstructed.modules():
        if hasattr(m, "implementation"):
            m.implementation = "reconstructed"
    return {"factorized": (got[0], factorized), "reconstructed": (got[0], reconstructed)}


def previous_rows(path: Path, rerun: set[str], details: dict) -> tuple[list[dict], dict]:
    """Rows and config details of models that are not being rerun, from an earlier result file."""
    if not path.exists():
        return [], details
    doc = json.loads(path.read_text())
    rows = [r for r in doc["rows"] if r["model"] not in rerun]
    configs = {k: v for k, v in doc.get("details", {}).get("configs", {}).items() if k.split("@")[0] not in rerun}
    return rows, {**details, "configs": configs}


def latency(model) -> dict[int, float]:
    return netslim.profile(model, X, batch_sizes=(1, 64), repeats=15, warmup=3).latency_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg16,resnet56")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=150)
    p.add_argument("--search-images", type=int, default=500)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows (and details) of models not run now from the existing JSON")
    args = p.parse_args()
    logging.getLogger("netslim.lowrank").setLevel(logging.ERROR)  # bisection probes many skipped layers
    warnings.filterwarnings("ignore", message="Trying to compute SVD")  # TensorLy's SVD-init notices
    device = "cuda" if torch.cuda.is_available() else "cpu"
    test_full = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
    test = Subset(test_full, sorted(order[: args.test_images].tolist())) if args.test_images < len(test_full) else test_full
    train = nsdata.get("cifar10", "train", augment=True)
    held = Subset(nsdata.get("cifar10", "train"), torch.randperm(50_000, generator=torch.Generator().manual_seed(1))[: args.search_images].tolist())
    form = (f"{'GPU' if device == 'cuda' else 'CPU'} form: top-1 on {len(test):,} test images; fine-tune "
            f"{args.ft_steps} steps of batch 128 (SGD lr 0.01 cosine); CP-ALS / Tucker-HOOI {ALS_ITERS} iterations")
    rows, details = [], {"form": form, "configs": {}}
    if args.merge:
        rows, details = previous_rows(Path(args.out) / "lowrank.json", set(args.models.split(",")), details)
    for name in args.models.split(","):
        base = zoo.get(name, weights="shared").eval()
        dense_macs = macs(base)
        base_top1 = evaluate(base, test, device=device)["top1"]
        base_lat = latency(base)
        rows.append(dict(model=name, dataset="cifar10", method="dense", tool="netslim", setting={}, top1=base_top1,
                         baseline_top1=base_top1, params=sum(q.numel() for q in base.parameters()), macs=dense_macs,
                         size_bytes=None, latency_ms=base_lat, baseline_latency_ms=base_lat, notes=form))
        for t in (float(v) for v in args.targets.split(",")):
            goal = int(dense_macs / t)
            candidates = {}
            for method in ("spatial", "tucker2", "cp"):
                got = netslim_plan(base, method, "fixed", dense_macs, goal, 0.01, 1.0)
                if got:
                    candidates[(method, "fixed uniform", "netslim")] = got
            got = netslim_plan(base, "spatial", "energy", dense_macs, goal, 0.3, 1.0)
            if got:
                candidates[("spatial", "energy", "netslim")] = got
            t0 = time.time()
            report, _ = greedy_rank_search(base, X, held, t, "macs", "spatial", progress=False, device=device)
            greedy = copy.deepcopy(base)
            apply_plan_(greedy, report)
            candidates[("spatial", "greedy target", "netslim")] = (None, greedy)
            details["configs"][f"{name}@{t:g}x greedy search s"] = time.time() - t0
            for fac in ("tucker", "cp"):
                try:
                    for impl, got in tltorch_at_target(base, fac, goal).items():
                        candidates[(fac, f"tltorch rank fraction ({impl})", "tensorly-torch")] = got
                except Exception as exc:  # report a peer failure rather than hide it
                    details["configs"][f"{name}@{t:g}x tltorch {fac}"] = f"failed: {exc}"
            scored = []
            for (method, selector, tool), (knob, model) in candidates.items():
                model.eval()
                top1 = evaluate(model, test, device=device)["top1"]
                lat = latency(model)
                m = macs(model)
                scored.append((top1, method, selector, tool, knob, model, lat, m))
                print(f"{name} {t:g}x {tool:15} {method:8} {selector:34} MACs {dense_macs / m:.2f}x top1 {100 * top1:.2f} "
                      f"speed-up {base_lat[1] / lat[1]:.2f}x / {base_lat[64] / lat[64]:.2f}x", flush=True)
            best = {}
            for s in scored:
                key = s[3]
                if key not in best or s[0] > best[key][0]:
                    best[key] = s
            for top1, method, selector, tool, knob, model, lat, m in scored:
                ft_top1 = None
                if best.get(tool) is not None and best[tool][5] is model and args.ft_steps > 0:
                    fit(model, train, TrainConfig(epochs=1, lr=0.01, max_steps_per_epoch=args.ft_steps, weight_decay=5e-4),
                        device=device, progress=False)
                    ft_top1 = evaluate(model, test, device=device)["top1"]
                    print(f"   fine-tuned {tool} {method} {selector}: {100 * ft_top1:.2f}", flush=True)
                rows.append(dict(model=name, dataset="cifar10", method=f"{method} / {selector}", tool=tool,
                                 setting={"mac_target": t, "knob": knob, "fine_tune_steps": args.ft_steps if ft_top1 is not None else 0},
                                 top1=ft_top1 if ft_top1 is not None else top1, baseline_top1=base_top1,
                                 params=sum(q.numel() for q in model.parameters()), macs=m, size_bytes=None,
                                 latency_ms=lat, baseline_latency_ms=base_lat,
                                 notes=f"top-1 before fine-tune {100 * top1:.2f}%; MAC reduction {dense_macs / m:.2f}x; {form}"))
            write_result("lowrank", rows, args.out, device=device, details=details)  # partial results survive a stop
    print(write_result("lowrank", rows, args.out, device=device, details=details))


if __name__ == "__main__":
    main()
