"""Benchmark: structured (channel) pruning of ResNet-56 and VGG-16 on CIFAR-10 at 2x and 3x fewer MACs.

For each model and MAC target: netslim's criteria (L1, FPGM, Taylor, random, Slimming, SFP) pruned
to the target, then fine-tuned with the same budget; He 2017 reconstruction reported without
fine-tuning; side by side with Torch-Pruning (``pip install torch-pruning``; MetaPruner with
group-L2 magnitude importance, the same MAC target by bisection on its pruning ratio, the same
fine-tuning). Also measured: CPU latency at batch 1 and 64 of each pruned model against the dense
one in the same run, and the speed-up as a share of the MAC reduction.

GPU form: fine-tuning for epochs. CPU form (default without a GPU): top-1 on a fixed random subset
of the test set and a few dozen fine-tuning steps; Slimming then ranks by the trained BN scales
without its sparsity-training phase (said in the JSON).

    .venv/bin/python bench/structured_pruning.py [--models resnet56,vgg16] [--ft-steps 60] [--test-images 2000]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.prune.structured import structured
from netslim.prune.structured.reconstruct import reconstruct_prune
from netslim.prune.structured.soft import soft_filter_prune
from netslim.report import write_result
from netslim.targets import bisect
from netslim.train import TrainConfig, evaluate, fit

X = torch.randn(1, 3, 32, 32)


def macs(model: nn.Module) -> int:
    return netslim.profile(model, X, latency=False).macs


def latency(model: nn.Module) -> dict[int, float]:
    return netslim.profile(model, X, batch_sizes=(1, 64), repeats=15, warmup=3).latency_ms


def paired_latency(base: nn.Module, model: nn.Module) -> tuple[dict[int, float], dict[int, float]]:
    """Dense and pruned latency measured back to back (dense before and after; the faster dense run counts)."""
    first = latency(base)
    pruned = latency(model)
    second = latency(base)
    return {b: min(first[b], second[b]) for b in first}, pruned


def torch_pruning_at(model: nn.Module, goal: int) -> nn.Module:
    """Torch-Pruning's MetaPruner (group L2 magnitude), its ratio bisected to reach ``goal`` MACs."""
    import torch_pruning as tp

    def prune(ratio):
        m = copy.deepcopy(model)
        last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(m, X, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[last])
        pruner.step()
        return m
    def value(ratio):
        m = prune(ratio)
        return macs(m), m

    found = bisect(value, 0.0, 0.95, goal, increasing=False, steps=12)
    return None if found is None else found.result


def finetune(model, train, steps, device):
    if steps > 0:
        fit(model, train, TrainConfig(epochs=1, lr=0.01, batch_size=64, max_steps_per_epoch=steps, weight_decay=5e-4),
            device=device, progress=False)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet56,vgg16")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=60)
    p.add_argument("--calibration-images", type=int, default=128)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    test_full = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
    test = Subset(test_full, sorted(order[: args.test_images].tolist())) if args.test_images < len(test_full) else test_full
    train = nsdata.get("cifar10", "train", augment=True)
    plain = nsdata.get("cifar10", "train")
    picks = torch.randperm(len(plain), generator=torch.Generator().manual_seed(1))[: args.calibration_images].tolist()
    images = torch.stack([plain[i][0] for i in picks])
    taylor_data = DataLoader(Subset(plain, picks), batch_size=32)
    form = (f"{'GPU' if device == 'cuda' else 'CPU'} form: top-1 on {len(test):,} test images (fixed random subset); "
            f"fine-tune {args.ft_steps} steps of batch 64 (SGD lr 0.01 cosine) for every method alike; SFP spends the "
            f"same steps training with soft pruning; Slimming ranks the trained BN scales (no sparsity-training phase "
            f"in this form); reconstruction (He 2017) on {len(images)} images, reported before and after the fine-tune")
    rows, details = [], {"form": form, "speedup_share_of_mac_reduction": {}}
    for name in args.models.split(","):
        base = zoo.get(name, weights="shared").eval()
        dense_macs, base_top1, base_lat = macs(base), evaluate(base, test, device=device)["top1"], latency(base)
        rows.append(dict(model=name, dataset="cifar10", method="dense", tool="netslim", setting={}, top1=base_top1,
                         baseline_top1=base_top1, params=sum(q.numel() for q in base.parameters()), macs=dense_macs,
                         size_bytes=None, latency_ms=base_lat, baseline_latency_ms=base_lat, notes=form))
        for t in (float(v) for v in args.targets.split(",")):
            goal = f"macs:{t}"
            runs = {}
            for crit in ("l1", "fpgm", "taylor", "random", "slimming"):
                t0 = time.time()
                runs[(crit, "netslim")] = (structured(base, X, criterion=crit, target=goal, calib_data=taylor_data), time.time() - t0)
            t0 = time.time()
            runs[("reconstruction (He 2017)", "netslim")] = (reconstruct_prune(base, X, images, target=goal), time.time() - t0)
            t0 = time.time()
            try:
                runs[("group L2 (MetaPruner)", "torch-pruning")] = (torch_pruning_at(base, int(dense_macs / t)), time.time() - t0)
            except Exception as exc:  # a peer failure is reported, not hidden
                details[f"{name}@{t:g}x torch-pruning"] = f"failed: {type(exc).__name__}: {exc}"
            for (method, tool), (model, seconds) in runs.items():
                before = evaluate(model, test, device=device)["top1"]
                m = macs(model)
                base_lat, lat = paired_latency(base, model)
                after = evaluate(finetune(model, train, args.ft_steps, device), test, device=device)["top1"]
                share = (base_lat[64] / lat[64]) / (dense_macs / m)
                details["speedup_share_of_mac_reduction"][f"{name}@{t:g}x {tool} {method}"] = {
                    "batch1": (base_lat[1] / lat[1]) / (dense_macs / m), "batch64": share}
                print(f"{name} {t:g}x {tool:13} {method:26} MACs {dense_macs / m:.2f}x top1 {100 * before:.2f} -> "
                      f"{100 * after:.2f} speed-up b1 {base_lat[1] / lat[1]:.2f}x b64 {base_lat[64] / lat[64]:.2f}x", flush=True)
                rows.append(dict(model=name, dataset="cifar10", method=method, tool=tool,
                                 setting={"mac_target": t, "fine_tune_steps": args.ft_steps, "prune_seconds": round(seconds, 1)},
                                 top1=after, baseline_top1=base_top1, params=sum(q.numel() for q in model.parameters()),
                                 macs=m, size_bytes=None, latency_ms=lat, baseline_latency_ms=base_lat,
                                 notes=f"top-1 before fine-tune {100 * before:.2f}%; MAC reduction {dense_macs / m:.2f}x; {form}"))
                write_result("structured_pruning", rows, args.out, device=device, details=details)  # survives a stop
            sfp_base = copy.deepcopy(base)
            t0 = time.time()
            sfp = soft_filter_prune(sfp_base, X, train, TrainConfig(epochs=1, lr=0.01, batch_size=64,
                                    max_steps_per_epoch=args.ft_steps), target=goal, device=device, progress=False).eval()
            m, top1 = macs(sfp), evaluate(sfp, test, device=device)["top1"]
            base_lat, lat = paired_latency(base, sfp)
            rows.append(dict(model=name, dataset="cifar10", method="SFP (He 2018)", tool="netslim",
                             setting={"mac_target": t, "fine_tune_steps": args.ft_steps, "prune_seconds": round(time.time() - t0, 1)},
                             top1=top1, baseline_top1=base_top1, params=sum(q.numel() for q in sfp.parameters()), macs=m,
                             size_bytes=None, latency_ms=lat, baseline_latency_ms=base_lat,
                             notes=f"soft pruning during the fine-tune steps; MAC reduction {dense_macs / m:.2f}x; {form}"))
            print(f"{name} {t:g}x netslim       SFP                        MACs {dense_macs / m:.2f}x top1 {100 * top1:.2f}", flush=True)
            write_result("structured_pruning", rows, args.out, device=device, details=details)
    print(write_result("structured_pruning", rows, args.out, device=device, details=details))


if __name__ == "__main__":
    main()
