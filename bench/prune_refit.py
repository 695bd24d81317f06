"""Benchmark: structured pruning repaired without training - the layers that lost input channels re-solved by
least squares (``structured(..., refit_images=, refit_mode=)``, He et al. 2017's refit step) - against the
same pruning unrepaired, on ResNet-56 (CIFAR-10), before any fine-tuning.

Channels are chosen by l1 at the uniform keeps the search uses (inside blocks only, and residual streams
too); BatchNorm statistics are re-estimated on the same training images in every row. Top-1 is read on
500 held-out *training* images (what the search's estimate sees) and on a fixed 2,000-image test subset
(CPU form; ``--full``: the whole test set). The refit's wall time on this machine is in each row.

    .venv/bin/python bench/prune_refit.py [--images 128] [--full]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import Subset

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.prune.structured import structured
from netslim.report import write_result
from netslim.search.api import split_training_data
from netslim.search.apply import plan_of, recalibrate_batchnorm_
from netslim.search.space import build_space
from netslim.train import evaluate

BENCH = "prune_refit"
X = torch.randn(1, 3, 32, 32)
CUTS = {"inside blocks 0.5": (0.5, 1.0), "inside blocks and streams 0.5": (0.5, 0.5)}
MODES = ("none", "local", "sequential", "one_pass")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128, help="training images the refit and BatchNorm see")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--full", action="store_true", help="the whole test set")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.set_num_threads(1)
    base = zoo.get("resnet56", weights="shared").eval()
    plain = nsdata.get("cifar10", "train")
    held, calib = split_training_data(plain, 500, 256)  # the search's own split (seed 0)
    test = nsdata.get("cifar10", "test")
    if not args.full:
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
        test = Subset(test, sorted(order[: args.test_images].tolist()))
    form = "full" if args.full else "cpu"
    notes = (f"{form} form: no fine-tuning; top-1 on {len(test):,} test images and on 500 held-out training images; "
             f"refit and BatchNorm on {args.images} training images; 1 thread")
    space = build_space(base, X, ["prune"])
    base_top1 = evaluate(base, test)["top1"]
    rows = [dict(model="resnet56", dataset="cifar10", method="dense", tool="netslim", top1=base_top1,
                 baseline_top1=base_top1, params=sum(q.numel() for q in base.parameters()),
                 macs=netslim.profile(base, X, latency=False).macs,
                 setting={"form": form, "held_out_top1": evaluate(base, held)["top1"]}, notes=notes)]
    images = calib[: args.images]
    for cut, (keep, stream) in CUTS.items():
        ratios = plan_of(space, space.uniform(keep=keep, stream=stream))["ratios"]
        for mode in MODES:
            t0 = time.perf_counter()
            refit = {} if mode == "none" else {"refit_images": args.images, "refit_mode": mode}
            model = structured(base, X, ratio=0.0, ratios=ratios, criterion="l1", calib_data=images, **refit).eval()
            seconds = time.perf_counter() - t0
            recalibrate_batchnorm_(model, images)
            row = dict(model="resnet56", dataset="cifar10", method=f"l1, refit {mode}", tool="netslim",
                       top1=evaluate(model, test)["top1"], baseline_top1=base_top1,
                       params=sum(q.numel() for q in model.parameters()), macs=netslim.profile(model, X, latency=False).macs,
                       setting={"form": form, "cut": cut, "refit_mode": mode, "refit_images": args.images,
                                "held_out_top1": evaluate(model, held)["top1"], "seconds": seconds}, notes=notes)
            rows.append(row)
            print(f"{cut:32s} refit {mode:10s} test {100 * row['top1']:.2f}  held-out "
                  f"{100 * row['setting']['held_out_top1']:.2f}  {seconds:.1f} s", flush=True)
            write_result(BENCH, rows, args.out)


if __name__ == "__main__":
    main()
