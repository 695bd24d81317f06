"""Benchmark: realized speed. Does a compressed model run as much faster as its MAC cut promises?

VGG-16 and ResNet-56 (CIFAR-10) structurally pruned (L1) and low-rank factorized (spatial k×1/1×k, energy
bisected to the MAC target, refit on training images) to 2x and 3x fewer MACs, each in two forms: as the
method gives it, and with netslim's hardware-aware step (pruning: kept channel counts rounded by measured
latency, ``round_to="measured"``; low rank: factorizations kept only where the lookup table says they are
faster on the target, ``latency_device``), both tuned for onnxruntime CPU at batch 64 and one thread.
Torch-Pruning's MetaPruner (group L2) at the same MACs is the peer row. Every model and its dense original
are timed in the same run in PyTorch eager (BatchNorm folded, memory format picked by measurement),
``torch.compile`` (inductor, freezing) and onnxruntime, at batch 1 and 64, with 1 and 2 threads
(:func:`netslim.profile.runtimes.time_runtimes`, round-robin, fastest of ``--rounds``).
Each row: speed-up over dense per runtime cell, the MAC reduction, their ratio, and top-1 after the same
fine-tune (KD from the dense model), so a faster shape that costs accuracy shows it.

CPU form (default): top-1 on a fixed 2,000-image test subset, ``--ft-steps`` fine-tuning steps of batch 128.
``--full``: the whole test set and ``--ft-epochs`` epochs (GPU for training when there is one; timing is
always on the CPU). ``--dry-run``: every code path, tiny (64 test images, 2 steps, 1 round of 2 repeats).

    .venv/bin/python bench/realized_speed.py [--models vgg16,resnet56] [--targets 2,3]
        [--methods l1,l1-measured,torch-pruning,lowrank,lowrank-measured] [--runtimes eager,compile,ort]
        [--batches 1,64] [--threads 1,2] [--rounds 3] [--ft-steps 150] [--full [--ft-epochs 10]] [--dry-run]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netslim  # noqa: E402
from netslim import data as nsdata  # noqa: E402
from netslim import zoo  # noqa: E402
from netslim.distill import distill  # noqa: E402
from netslim.lowrank import DecomposeConfig, decompose  # noqa: E402
from netslim.profile.runtimes import RUNTIMES, Setting, time_runtimes  # noqa: E402
from netslim.prune.structured import structured  # noqa: E402
from netslim.report import write_result  # noqa: E402
from netslim.search.cost import Device  # noqa: E402
from netslim.train import TrainConfig, evaluate  # noqa: E402

X = torch.randn(1, 3, 32, 32)
METHODS = ("l1", "l1-measured", "torch-pruning", "lowrank", "lowrank-measured")
LABELS = {"l1": ("L1 channels", "netslim"), "l1-measured": ("L1 channels, measured rounding", "netslim"),
          "torch-pruning": ("group L2 (MetaPruner)", "torch-pruning"),
          "lowrank": ("spatial low rank", "netslim"),
          "lowrank-measured": ("spatial low rank, kept where faster", "netslim")}


def macs(model: nn.Module) -> int:
    return netslim.profile(model, X, latency=False).macs


def build(method: str, base: nn.Module, target: float, plain, hw: Device, details: dict,
          refit_mode: str = "one_pass") -> nn.Module:
    """The model of one row at ``target``x fewer MACs (hardware-aware forms tuned for ``hw``)."""
    goal = f"macs:{target:g}"
    if method in ("l1", "l1-measured"):
        rounding: list = []
        extra = {"round_to": "measured", "latency_device": hw, "rounding": rounding} if method == "l1-measured" else {}
        model = structured(base, X, criterion="l1", target=goal, **extra)
        if rounding:
            details["rounding"] = [r.to_dict() for r in rounding]
        return model
    if method == "torch-pruning":
        from structured_pruning import torch_pruning_at
        return torch_pruning_at(base, int(macs(base) / target))
    cfg = DecomposeConfig(method="spatial", selector="energy_target", target=goal, refit_images=256,
                          refit_mode=refit_mode,
                          **({"latency_device": hw.name, "latency_batch": hw.batch, "latency_threads": hw.threads}
                             if method == "lowrank-measured" else {}))
    result = decompose(base, X, cfg, calib_data=plain, device="cpu", progress=False)
    if "slower_on_target" in result.details:
        details["left_dense"] = result.details["slower_on_target"]
        details["on_target_ms"] = result.details.get("on_target")
    details["energy"] = result.details.get("energy")
    return result.model


def fine_tune(model: nn.Module, base: nn.Module, train, config: TrainConfig | None, device: str) -> nn.Module:
    """The same fine-tune for every row: KD from the dense model (Hinton 2015, weight 0.9, T = 4)."""
    if config is not None:
        distill(model, base, train, {"kd": 0.9}, config=config, device=device, progress=False)
    base.cpu()
    return model.cpu().eval()


def previous_rows(path: Path, args, chosen: list[str], details: dict) -> list[dict]:
    """The rows (and their cells) of ``path`` that this run does not redo; a redone model's dense row stays
    only when its own dense row is not rerun (every row carries its own dense latencies)."""
    import json

    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    models = set(args.models.split(","))
    targets = {float(v) for v in args.targets.split(",")}
    labels = {LABELS[m][0] for m in chosen}
    keep = []
    for row in old["rows"]:
        redone = row["model"] in models and (row["method"] == "dense" or (
            row["method"] in labels and row["setting"].get("mac_target") in targets))
        if not redone:
            keep.append(row)
    for key, cell in old.get("details", {}).get("cells", {}).items():
        model, row_key = key.split(" ", 1)
        method, _, target = row_key.partition("@")
        redone = model in models and (row_key == "dense" or (method in chosen and float(target.rstrip("x")) in targets))
        if not redone:
            details["cells"][key] = cell
    details["merged_from"] = old.get("command")
    return keep


GOAL_SHARE = {"vgg16": 0.9, "resnet56": 0.7}  # the speed-up / MAC-reduction goals


def summarize(rows: list[dict]) -> dict:
    """Per (model, target, batch, threads) cell and per row: the runtime where speed-up / MAC reduction is
    highest, that share, and whether it meets the model's goal; netslim's pruned rows against Torch-Pruning's
    in the same runtime."""
    cells: dict[str, dict] = {}
    for row in rows:
        target = row["setting"].get("mac_target")
        if row["method"] == "dense" or not row.get("latency_ms"):
            continue
        reduction = row["macs"] and next(r["macs"] for r in rows if r["model"] == row["model"]
                                         and r["method"] == "dense") / row["macs"]
        for key, ms in row["latency_ms"].items():
            runtime, batch, threads = key.split("/")
            cell = cells.setdefault(f"{row['model']} {target:g}x {batch} {threads}", {})
            share = row["baseline_latency_ms"][key] / ms / reduction
            entry = cell.setdefault(row["method"], {"best_runtime": None, "best_share": 0.0, "shares": {}})
            entry["shares"][runtime] = share
            if share > entry["best_share"]:
                entry["best_runtime"], entry["best_share"] = runtime, share
    for key, cell in cells.items():
        goal = GOAL_SHARE.get(key.split()[0])
        for method, entry in cell.items():
            entry["meets_goal"] = goal is not None and entry["best_share"] >= goal
        peer = cell.get(LABELS["torch-pruning"][0])
        for method in (LABELS["l1"][0], LABELS["l1-measured"][0]):
            if peer and method in cell:
                mine = cell[method]["shares"]
                cell[method]["at_or_above_torch_pruning"] = {
                    r: mine[r] >= peer["shares"][r] for r in mine if r in peer["shares"]}
    return cells


def settings_from(args) -> list[Setting]:
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise SystemExit(f"unknown runtimes {bad}; valid: {', '.join(RUNTIMES)}")
    return [Setting(r, int(b), int(t)) for r in runtimes for b in args.batches.split(",") for t in args.threads.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg16,resnet56")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (round-robin over the models; fastest kept)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per round (median)")
    p.add_argument("--hw-batch", type=int, default=64, help="batch the hardware-aware forms are tuned for")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=150, help="CPU form: fine-tune steps of batch 128 (0: none)")
    p.add_argument("--ft-epochs", type=int, default=10, help="--full: fine-tune epochs of batch 128")
    p.add_argument("--ft-lr", type=float, default=0.005)
    p.add_argument("--full", action="store_true", help="the whole test set and --ft-epochs epochs of fine-tuning")
    p.add_argument("--dry-run", action="store_true", help="every code path, tiny, to prove the command runs")
    p.add_argument("--refit-mode", default="one_pass", choices=("one_pass", "sequential"),
                   help="low-rank rows: the data-aware refit of every factorized layer at once or layer by layer")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the existing JSON that this run does not redo (same model, method, target)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    settings = settings_from(args)
    logging.getLogger("netslim.lowrank").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rounds, repeats = (1, 2) if args.dry_run else (args.rounds, args.repeats)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    test_full = nsdata.get("cifar10", "test")
    n_test = 64 if args.dry_run else (len(test_full) if args.full else args.test_images)
    order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
    test = Subset(test_full, sorted(order[:n_test].tolist())) if n_test < len(test_full) else test_full
    train = nsdata.get("cifar10", "train", augment=True)
    plain = nsdata.get("cifar10", "train")
    if args.full:
        cfg = TrainConfig(epochs=1 if args.dry_run else args.ft_epochs, lr=args.ft_lr, weight_decay=5e-4,
                          max_steps_per_epoch=2 if args.dry_run else None)
    else:
        steps = min(args.ft_steps, 2) if args.dry_run else args.ft_steps
        cfg = TrainConfig(epochs=1, lr=args.ft_lr, weight_decay=5e-4, max_steps_per_epoch=steps) if steps > 0 else None
    ft_text = "no fine-tune" if cfg is None else (
        f"fine-tune {cfg.epochs} epoch(s)" + (f" of at most {cfg.max_steps_per_epoch} steps" if cfg.max_steps_per_epoch
                                              else "") + f" of batch {cfg.batch_size}, KD from the dense model, SGD lr "
        f"{cfg.lr:g} cosine")
    form_word = "dry-run" if args.dry_run else ("full" if args.full else "cpu")
    form = (f"{form_word} form: top-1 on {len(test):,} test images"
            f"{'' if len(test) == len(test_full) else ' (fixed random subset)'}; {ft_text} for every row on {device}; "
            f"latency on this CPU, every model and its dense original in the same run, round-robin, fastest of "
            f"{rounds} rounds of {repeats} runs (median); hardware-aware forms tuned for ort-cpu at batch "
            f"{args.hw_batch}, 1 thread")
    details = {"form": form_word, "form_text": form, "settings": [s.key for s in settings], "cells": {}}
    rows: list[dict] = []
    kept = previous_rows(Path(args.out) / "realized_speed.json", args, chosen, details) if args.merge else []

    def save():
        details["summary"] = summarize(kept + rows)
        return write_result("realized_speed", kept + rows, args.out, device=device, details=details)

    hw = Device("ort-cpu", threads=1, batch=args.hw_batch)
    for name in args.models.split(","):
        base = zoo.get(name, weights="shared").eval()
        dense_macs, base_top1 = macs(base), evaluate(base, test, device=device)["top1"]
        base.cpu()
        built: dict[str, nn.Module] = {"dense": base}
        meta: dict[str, dict] = {"dense": {"method": "dense", "target": None, "top1": base_top1, "details": {}}}
        for t in (float(v) for v in args.targets.split(",")):
            for method in chosen:
                key = f"{method}@{t:g}x"
                info: dict = {}
                t0 = time.time()
                try:
                    model = build(method, base, t, plain, hw, info, args.refit_mode)
                except Exception as exc:  # a failing row is reported, not hidden
                    details[f"{name} {key}"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                    print(f"{name} {key} failed: {exc}", flush=True)
                    continue
                seconds = time.time() - t0
                before = evaluate(model, test, device=device)["top1"]
                model = fine_tune(model.cpu(), base, train, cfg, device)
                after = evaluate(model, test, device=device)["top1"]
                model.cpu()
                built[key] = model
                meta[key] = {"method": method, "target": t, "top1": after, "top1_before_ft": before,
                             "build_seconds": round(seconds, 1), "details": info}
                print(f"{name} {key}: MACs {dense_macs / macs(model):.2f}x, top-1 {100 * before:.2f} -> "
                      f"{100 * after:.2f} ({seconds:.0f} s)", flush=True)
        timed = time_runtimes(built, X, settings, rounds=rounds, repeats=repeats, warmup=2,
                              progress=lambda msg: print(f"  {name} {msg}", flush=True))
        dense = timed["dense"]
        for key, model in built.items():
            m = macs(model)
            reduction = dense_macs / m
            lat = {s: v.ms for s, v in timed[key].items()}
            base_lat = {s: v.ms for s, v in dense.items()}
            speed = {s: base_lat[s] / lat[s] for s in lat}
            share = {s: speed[s] / reduction for s in lat}
            layouts = {s: v.layout for s, v in timed[key].items() if v.setting.runtime == "eager"}
            details["cells"][f"{name} {key}"] = {"mac_reduction": reduction, "speedup": speed,
                                                 "speedup_share_of_mac_reduction": share, "eager_layout": layouts}
            info = meta[key]
            label, tool = LABELS.get(info["method"], ("dense", "netslim"))
            rows.append(dict(model=name, dataset="cifar10", method=label, tool=tool,
                             setting={"mac_target": info["target"], "build_seconds": info.get("build_seconds"),
                                      "fine_tune": ft_text, "form": form_word,
                                      **({"refit_mode": args.refit_mode} if "lowrank" in info["method"] else {}),
                                      **{k: v for k, v in info["details"].items() if v is not None}},
                             top1=info["top1"], baseline_top1=base_top1, params=sum(q.numel() for q in model.parameters()),
                             macs=m, size_bytes=None, latency_ms=lat, baseline_latency_ms=base_lat,
                             notes=(f"MAC reduction {reduction:.2f}x; top-1 before fine-tune "
                                    f"{100 * info.get('top1_before_ft', info['top1']):.2f}%; {form}")))
            best = max(share.values()) if share else float("nan")
            print(f"{name} {key:24} MACs {reduction:.2f}x  best share {best:.2f}  " +
                  "  ".join(f"{s} {speed[s]:.2f}x" for s in speed), flush=True)
        save()
    print(save())


if __name__ == "__main__":
    main()
