"""Benchmark: the dense baselines of the model zoo, measured with netslim's own API.

For every shared checkpoint: top-1 on the full test set, parameters, MACs, stored size and CPU
latency at batch 1 and 64. These rows are the reference every compression benchmark compares to.

    .venv/bin/python bench/zoo_baselines.py [--models lenet5,resnet20] [--out bench/results]
"""
from __future__ import annotations

import argparse

import torch

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.report import write_result
from netslim.train import evaluate

DATASET = {"lenet300": "mnist", "lenet5": "mnist", "resnet20": "cifar10", "resnet56": "cifar10",
           "mobilenetv2": "cifar10", "vgg16": "cifar10"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DATASET))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        model = zoo.get(name, weights="shared").eval()
        test = nsdata.get(DATASET[name], "test")
        top1 = evaluate(model, test, device="cpu", batch_size=500)["top1"]
        prof = netslim.profile(model, test[0][0][None], batch_sizes=(1, 64), threads=args.threads, repeats=30)
        print(f"{name:<12} top-1 {100 * top1:.2f}%  {prof.params:,} params "
              f"{prof.macs / 1e6:.2f} M MACs  {prof.latency_ms[1]:.3f} / {prof.latency_ms[64]:.2f} ms (batch 1 / 64)")
        rows.append(dict(model=name, dataset=DATASET[name], method="dense", tool="netslim", setting={},
                         top1=top1, baseline_top1=top1, params=prof.params, macs=prof.macs,
                         size_bytes=prof.stored_bytes, latency_ms=prof.latency_ms, baseline_latency_ms=prof.latency_ms,
                         notes=f"fp32 CPU, {args.threads} threads; latency median of 30 runs after 5 warm-up"))
    path = write_result("zoo_baselines", rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
