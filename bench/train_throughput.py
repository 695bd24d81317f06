"""Benchmark: training images per second of netslim's fine-tuning loop, the DataLoader path against the
device-resident path, on the same device in the same run.

Paths, each one :class:`netslim.train.TrainConfig` on the CIFAR-10 training set:

* ``dataloader``: ``resident_data=False``, the per-sample ``Dataset`` + ``DataLoader`` loop (the old path);
* ``resident``: the images kept as uint8 on the device, crop and flip done a batch at a time there;
* on CUDA also ``resident + channels-last`` and ``resident + channels-last + compile`` (bf16 autocast on
  every CUDA path: ``amp`` is on by default).

The paths are timed in alternation (``--rounds`` rounds, the median counts), so a slow spell of a
shared machine hits every path alike. Each row's ``setting.speedup`` is its images/s over the
``dataloader`` path's. The JSON says the device; a CPU run is the CPU form.

    .venv/bin/python bench/train_throughput.py [--models resnet20,resnet56] [--steps 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.report import write_result
from netslim.train import TrainConfig, training_throughput


def paths(device: str) -> dict[str, dict]:
    found = {"dataloader": {"resident_data": False, "channels_last": False},
             "resident": {"resident_data": True, "channels_last": False}}
    if device == "cuda":
        found["resident + channels-last"] = {"resident_data": True, "channels_last": True}
        found["resident + channels-last + compile"] = {"resident_data": True, "channels_last": True, "compile": True}
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = nsdata.get("cifar10", "train", augment=True)
    form = "full" if device == "cuda" else "cpu"
    rows, details = [], {"form": form, "form_text": (
        f"{form} form on {device}: {args.steps} timed steps of batch {args.batch_size} after 3 warm-up steps, "
        f"{args.rounds} alternating rounds per path, median images/s; SGD, random crop + flip"), "samples": {}}
    for name in args.models.split(","):
        model = zoo.get(name, weights="shared")
        prof = netslim.profile(model, torch.randn(1, 3, 32, 32), latency=False)
        samples: dict[str, list[float]] = {k: [] for k in paths(device)}
        for _ in range(args.rounds):
            for label, knobs in paths(device).items():
                cfg = TrainConfig(batch_size=args.batch_size, lr=1e-4, **knobs)
                samples[label].append(training_throughput(model, train, cfg, steps=args.steps, warmup=3, device=device))
        base = statistics.median(samples["dataloader"])
        for label, got in samples.items():
            ips = statistics.median(got)
            details["samples"][f"{name} {label}"] = [round(v, 1) for v in got]
            print(f"{name:10} {label:36} {ips:9.1f} images/s  {ips / base:5.2f}x", flush=True)
            rows.append(dict(model=name, dataset="cifar10", method=f"fine-tune loop: {label}", tool="netslim",
                             setting={"form": form, "images_per_second": round(ips, 1), "speedup": round(ips / base, 3),
                                      "batch_size": args.batch_size, **paths(device)[label]},
                             params=prof.params, macs=prof.macs,
                             latency_ms={args.batch_size: 1000 * args.batch_size / ips},
                             baseline_latency_ms={args.batch_size: 1000 * args.batch_size / base},
                             notes=f"training step time at batch {args.batch_size} in latency_ms; "
                                   f"baseline = the dataloader path; {details['form_text']}"))
    print(write_result("train_throughput", rows, args.out, device=device, details=details))


if __name__ == "__main__":
    main()
