"""Benchmark: structured (channel) pruning of ResNet-56 and VGG-16 on CIFAR-10 at 2x and 3x fewer MACs.

For each model and MAC target: netslim's criteria (L1, FPGM, Taylor, random, Slimming, SFP) pruned
to the target, then fine-tuned with the same budget; He 2017 reconstruction reported without
fine-tuning; side by side with Torch-Pruning (``pip install torch-pruning``; MetaPruner with
group-L2 magnitude importance, the same MAC target by bisection on its pruning ratio, the same
fine-tuning). Also measured: CPU latency at batch 1 and 64 of each pruned model against the dense
one in the same run, and the speed-up as a share of the MAC reduction.

CPU form (default): top-1 on a fixed random subset of the test set and a few dozen fine-tuning steps
(on the GPU when there is one). ``--full``: the full test set and ``--ft-epochs`` epochs of fine-tuning
(batch 128, SGD lr 0.01 cosine, on the GPU when there is one, else the CPU). In both forms Slimming
ranks by the trained BN scales without its sparsity-training phase (said in the JSON). ``--methods``
picks the rows (the dense row of each model is always written); ``--dry-run`` keeps the chosen form
and every code path but makes it tiny (64 test images, 2 fine-tuning steps, cheap latency), on the
CPU, to prove a command line works. The JSON's ``details.form`` is ``cpu``, ``full`` or ``dry-run``,
``details.form_text`` describes it.

    .venv/bin/python bench/structured_pruning.py [--models resnet56,vgg16] [--targets 2,3] [--ft-steps 60]
        [--test-images 2000] [--methods l1,fpgm,taylor,random,slimming,reconstruction,sfp,torch-pruning]
        [--full [--ft-epochs 30]] [--dry-run]
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
METHODS = ("l1", "fpgm", "taylor", "random", "slimming", "reconstruction", "sfp", "torch-pruning")
LATENCY = {"repeats": 15, "warmup": 3}  # --dry-run: cheaper


def macs(model: nn.Module) -> int:
    return netslim.profile(model, X.to(next(model.parameters()).device), latency=False).macs


def latency(model: nn.Module) -> dict[int, float]:
    """CPU latency at batch 1 and 64 (of a CPU copy when the model sits on a GPU)."""
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return netslim.profile(model, X, batch_sizes=(1, 64), **LATENCY).latency_ms


def top1(model: nn.Module, test, device) -> float:
    """Top-1 on ``device``; the model goes back to the CPU (pruning and profiling run there)."""
    result = evaluate(model, test, device=device)["top1"]
    model.cpu()
    return result


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


def ft_config(args) -> TrainConfig | None:
    """The fine-tune of every method (SFP trains with it): CPU form ``--ft-steps`` steps of batch 64 (None: 0
    steps, no fine-tune), full form ``--ft-epochs`` epochs of batch 128; ``--dry-run`` at most 1 epoch of 2 steps."""
    if args.full:
        return TrainConfig(epochs=1 if args.dry_run else args.ft_epochs, lr=0.01, batch_size=128, weight_decay=5e-4,
                           max_steps_per_epoch=2 if args.dry_run else None)
    if args.ft_steps <= 0:
        return None
    return TrainConfig(epochs=1, lr=0.01, batch_size=64, max_steps_per_epoch=args.ft_steps, weight_decay=5e-4)


def finetune(model, train, cfg, device):
    if cfg is not None:
        fit(model, train, cfg, device=device, progress=False)
        model.cpu()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet56,vgg16")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (the dense row is always written)")
    p.add_argument("--test-images", type=int, default=2000, help="CPU form: size of the fixed random test subset")
    p.add_argument("--ft-steps", type=int, default=60, help="CPU form: fine-tune steps of batch 64 per method")
    p.add_argument("--ft-epochs", type=int, default=30, help="--full: fine-tune epochs of batch 128 per method")
    p.add_argument("--calibration-images", type=int, default=128)
    p.add_argument("--full", action="store_true",
                   help="full form: the whole test set, --ft-epochs epochs of fine-tuning (GPU when there is one)")
    p.add_argument("--dry-run", action="store_true",
                   help="the chosen form made tiny (64 test images, 2 fine-tune steps, cheap latency) to prove it runs")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    if args.dry_run:
        args.ft_steps = min(args.ft_steps, 2)
        args.calibration_images = min(args.calibration_images, 64)
        LATENCY.update(repeats=1, warmup=1)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"  # a dry run: the CPU
    test_full = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
    n_test = 64 if args.dry_run else (len(test_full) if args.full else args.test_images)
    test = Subset(test_full, sorted(order[:n_test].tolist())) if n_test < len(test_full) else test_full
    train = nsdata.get("cifar10", "train", augment=True)
    plain = nsdata.get("cifar10", "train")
    picks = torch.randperm(len(plain), generator=torch.Generator().manual_seed(1))[: args.calibration_images].tolist()
    images = torch.stack([plain[i][0] for i in picks])
    taylor_data = DataLoader(Subset(plain, picks), batch_size=32)
    cfg = ft_config(args)
    if args.full:
        budget = {"fine_tune_epochs": cfg.epochs, "batch_size": cfg.batch_size}
        ft = (f"fine-tune {cfg.epochs} epoch(s) of batch {cfg.batch_size}"
              + (f", at most {cfg.max_steps_per_epoch} steps each" if cfg.max_steps_per_epoch else "")
              + " (SGD lr 0.01 cosine, weight decay 5e-4)")
        same = "the same epochs"
    else:
        budget = {"fine_tune_steps": args.ft_steps}
        ft = f"fine-tune {args.ft_steps} steps of batch 64 (SGD lr 0.01 cosine)"
        same = "the same steps"
    kind = "full" if args.full else "cpu"
    form_word = "dry-run" if args.dry_run else kind
    form = (f"{'full' if args.full else ('GPU' if device == 'cuda' else 'CPU')} form"
            f"{' (dry run: tiny, proves the command only)' if args.dry_run else ''}: top-1 on {len(test):,} test images"
            f"{'' if len(test) == len(test_full) else ' (fixed random subset)'}; {ft} for every method alike on "
            f"{device}; SFP spends {same} training with soft pruning; Slimming ranks the trained BN scales (no "
            f"sparsity-training phase in this form); reconstruction (He 2017) on {len(images)} images, reported before "
            f"and after the fine-tune")
    rows, details = [], {"form": form_word, "form_text": form, "methods": chosen, "speedup_share_of_mac_reduction": {}}

    def save():
        return write_result("structured_pruning", rows, args.out, device=device, details=details)

    for name in args.models.split(","):
        base = zoo.get(name, weights="shared").eval()
        dense_macs, base_top1, base_lat = macs(base), top1(base, test, device), latency(base)
        rows.append(dict(model=name, dataset="cifar10", method="dense", tool="netslim", setting={}, top1=base_top1,
                         baseline_top1=base_top1, params=sum(q.numel() for q in base.parameters()), macs=dense_macs,
                         size_bytes=None, latency_ms=base_lat, baseline_latency_ms=base_lat, notes=form))
        save()
        for t in (float(v) for v in args.targets.split(",")):
            goal = f"macs:{t}"
            runs = {}
            for crit in ("l1", "fpgm", "taylor", "random", "slimming"):
                if crit not in chosen:
                    continue
                t0 = time.time()
                runs[(crit, "netslim")] = (structured(base, X, criterion=crit, target=goal, calib_data=taylor_data), time.time() - t0)
            if "reconstruction" in chosen:
                t0 = time.time()
                runs[("reconstruction (He 2017)", "netslim")] = (reconstruct_prune(base, X, images, target=goal), time.time() - t0)
            if "torch-pruning" in chosen:
                t0 = time.time()
                try:
                    runs[("group L2 (MetaPruner)", "torch-pruning")] = (torch_pruning_at(base, int(dense_macs / t)), time.time() - t0)
                except Exception as exc:  # a peer failure is reported, not hidden
                    details[f"{name}@{t:g}x torch-pruning"] = f"failed: {type(exc).__name__}: {exc}"
            for (method, tool), (model, seconds) in runs.items():
                before = top1(model, test, device)
                m = macs(model)
                base_lat, lat = paired_latency(base, model)
                after = top1(finetune(model, train, cfg, device), test, device)
                share = (base_lat[64] / lat[64]) / (dense_macs / m)
                details["speedup_share_of_mac_reduction"][f"{name}@{t:g}x {tool} {method}"] = {
                    "batch1": (base_lat[1] / lat[1]) / (dense_macs / m), "batch64": share}
                print(f"{name} {t:g}x {tool:13} {method:26} MACs {dense_macs / m:.2f}x top1 {100 * before:.2f} -> "
                      f"{100 * after:.2f} speed-up b1 {base_lat[1] / lat[1]:.2f}x b64 {base_lat[64] / lat[64]:.2f}x", flush=True)
                rows.append(dict(model=name, dataset="cifar10", method=method, tool=tool,
                                 setting={"mac_target": t, **budget, "prune_seconds": round(seconds, 1)},
                                 top1=after, baseline_top1=base_top1, params=sum(q.numel() for q in model.parameters()),
                                 macs=m, size_bytes=None, latency_ms=lat, baseline_latency_ms=base_lat,
                                 notes=f"top-1 before fine-tune {100 * before:.2f}%; MAC reduction {dense_macs / m:.2f}x; {form}"))
                save()  # survives a stop
            if "sfp" not in chosen:
                continue
            sfp_base = copy.deepcopy(base)
            t0 = time.time()
            sfp_cfg = cfg or TrainConfig(epochs=1, lr=0.01, batch_size=64, max_steps_per_epoch=args.ft_steps)
            sfp = soft_filter_prune(sfp_base, X, train, sfp_cfg, target=goal, device=device, progress=False).eval().cpu()
            m, sfp_top1 = macs(sfp), top1(sfp, test, device)
            base_lat, lat = paired_latency(base, sfp)
            rows.append(dict(model=name, dataset="cifar10", method="SFP (He 2018)", tool="netslim",
                             setting={"mac_target": t, **budget, "prune_seconds": round(time.time() - t0, 1)},
                             top1=sfp_top1, baseline_top1=base_top1, params=sum(q.numel() for q in sfp.parameters()), macs=m,
                             size_bytes=None, latency_ms=lat, baseline_latency_ms=base_lat,
                             notes=f"soft pruning during the fine-tune {'epochs' if args.full else 'steps'}; MAC "
                                   f"reduction {dense_macs / m:.2f}x; {form}"))
            print(f"{name} {t:g}x netslim       SFP                        MACs {dense_macs / m:.2f}x top1 {100 * sfp_top1:.2f}", flush=True)
            save()
    print(save())


if __name__ == "__main__":
    main()
