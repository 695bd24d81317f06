"""Benchmark: compact and transferred filters (netslim.compact) on VGG-16 and ResNet-56 (CIFAR-10) at 2x
and 3x fewer MACs, against netslim's spatial low-rank (energy_target + refit) and structured pruning
(FPGM) at the same MAC target.

Per (model, target): each block type (separable, bsconv, fire; CReLU once per model at the reduction it
reaches, it has no width knob) converted from the trained weights by the public API
(``netslim.compact.replace``), top-1 as converted, after the data-aware refit on training images, and
after the same short fine-tune with KD from the dense model for every row; params, MACs, and latency at
batch 1 and 64 in torch and in onnxruntime (one thread), the dense model measured in the same run.

CPU form (default): top-1 on a fixed 2,000-image subset of the test set, a few dozen fine-tune steps.
``--full`` (for a GPU, else the CPU): the full test set, ``--ft-epochs`` epochs of fine-tuning, 1,024
refit images. ``--dry-run`` keeps the chosen form and every code path but makes it tiny (64 test and
refit images, 1 epoch of at most 2 steps, 1 latency repeat) on the CPU to prove a command line works. The JSON's
``details.form`` (``cpu``, ``full`` or ``dry-run``) and ``details.form_text``, and every row's notes, say
which form produced them.

    .venv/bin/python bench/compact_filters.py [--models vgg16,resnet56] [--targets 2,3] [--blocks separable,bsconv,fire,crelu]
        [--test-images 2000] [--ft-steps 30] [--refit-images 256] [--merge] [--full [--ft-epochs 10]] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.compact import ReplaceConfig, replace
from netslim.distill import distill
from netslim.export import ort_latency_ms, ort_session, to_onnx
from netslim.lowrank import DecomposeConfig, decompose
from netslim.prune import structured
from netslim.report import write_result
from netslim.train import TrainConfig, evaluate

X = torch.randn(1, 3, 32, 32)
BENCH = "compact_filters"
REPEATS = {"latency": 15, "interleaved": 7}  # --dry-run: 1


def macs(model: nn.Module) -> int:
    return netslim.profile(model, X.to(next(model.parameters()).device), latency=False).macs


def top1(model: nn.Module, test, device) -> float:
    """Top-1 on ``device``; the model goes back to the CPU (conversion, pruning and profiling read it there)."""
    result = evaluate(model, test, device=device)["top1"]
    model.cpu()
    return result


def latencies(model: nn.Module, repeats: int | None = None) -> dict[str, dict[int, float]]:
    """Median ms at batch 1 and 64: torch (one thread) and onnxruntime (one thread), CPU."""
    repeats = repeats or REPEATS["latency"]
    cpu = copy.deepcopy(model).cpu().eval()
    torch_ms = netslim.profile(cpu, X, batch_sizes=(1, 64), repeats=repeats, warmup=2).latency_ms
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        to_onnx(cpu, X, path)
        ort_ms = ort_latency_ms(ort_session(path, threads=1), X, (1, 64), threads=1, repeats=repeats, warmup=2)
    return {"torch": {int(k): float(v) for k, v in torch_ms.items()}, "ort": {int(k): float(v) for k, v in ort_ms.items()}}


def fine_tune(model: nn.Module, base: nn.Module, train, args, device: str) -> None:
    """The same fine-tune for every row: KD from the dense model (Hinton 2015, weight 0.9, T = 4)."""
    cfg = TrainConfig(epochs=args.ft_epochs, lr=args.ft_lr, batch_size=args.ft_batch, weight_decay=5e-4,
                      max_steps_per_epoch=(2 if args.dry_run else None) if args.full else args.ft_steps)
    distill(model, base, train, {"kd": 0.9}, config=cfg, device=device, progress=False)
    model.cpu()
    base.cpu()


def candidates(base: nn.Module, name: str, t: float, blocks: list[str], images: torch.Tensor, device: str):
    """(method, tool, converted model, refit model or None, details) for every row of one target."""
    for block in blocks:
        if block == "crelu":
            continue
        cfg = dict(block=block, selector="target", target=f"macs:{t:g}")
        t0 = time.time()
        converted = replace(base, X, ReplaceConfig(**cfg), device=device, progress=False)
        refit = replace(base, X, ReplaceConfig(**cfg, refit_images=len(images)), calib_data=images, device=device,
                        progress=False)
        yield (f"compact {block}", "netslim", converted.model, refit.model,
               {"width_fraction": converted.details["width"], "replaced": len(converted.plan.replaced),
                "skipped": {n: p.skipped for n, p in converted.plan.layers.items() if p.skipped},
                "refit_relative_error": refit.details["refit_relative_error"], "convert_and_refit_s": time.time() - t0})
    low = dict(method="spatial", selector="energy_target", target=f"macs:{t:g}")
    converted = decompose(base, X, DecomposeConfig(**low), device=device, progress=False)
    refit = decompose(base, X, DecomposeConfig(**low, refit_images=len(images)), calib_data=images, device=device,
                      progress=False)
    yield ("lowrank spatial / energy_target", "netslim", converted.model, refit.model,
           {"energy": converted.details["energy"], "refit_relative_error": refit.details["refit_relative_error"]})
    pruned = structured(base, X, target=f"macs:{t:g}", criterion="fpgm")
    yield ("structured fpgm", "netslim", pruned, None, {})


def crelu_candidate(base: nn.Module, images: torch.Tensor, device: str):
    converted = replace(base, X, ReplaceConfig(block="crelu"), device=device, progress=False)
    refit = replace(base, X, ReplaceConfig(block="crelu", refit_images=len(images)), calib_data=images,
                    device=device, progress=False)
    return ("compact crelu", "netslim", converted.model, refit.model,
            {"replaced": len(converted.plan.replaced),
             "skipped": {n: p.skipped for n, p in converted.plan.layers.items() if p.skipped},
             "refit_relative_error": refit.details["refit_relative_error"]})


def rebuild(base: nn.Module, row: dict) -> nn.Module:
    """A row's architecture again, from its method and MAC target (weights do not change the time)."""
    method, t = row["method"], row["setting"].get("mac_target")
    if method == "dense":
        return base
    if method.startswith("compact "):
        block = method.split(" ", 1)[1]
        cfg = ReplaceConfig(block=block) if t is None else ReplaceConfig(block=block, selector="target",
                                                                           target=f"macs:{t:g}")
        return replace(base, X, cfg, device="cpu", progress=False).model
    if method.startswith("lowrank"):
        return decompose(base, X, DecomposeConfig(method="spatial", selector="energy_target", target=f"macs:{t:g}"),
                         device="cpu", progress=False).model
    return structured(base, X, target=f"macs:{t:g}", criterion="fpgm")


def interleaved(base: nn.Module, model: nn.Module, rounds: int = 2) -> tuple[dict, dict]:
    """Dense and row measured alternately ``rounds`` times (7 runs each), the best median of each kept."""
    got = [(latencies(base, REPEATS["interleaved"]), latencies(model, REPEATS["interleaved"])) for _ in range(rounds)]
    best = lambda k: {rt: {b: min(g[k][rt][b] for g in got) for b in (1, 64)} for rt in ("torch", "ort")}  # noqa: E731
    return best(0), best(1)


def latency_pass(path: Path, models: list[str], targets: list[float] | None = None) -> None:
    """Re-measure the latency of every row of ``models`` (of ``targets`` only, and the CReLU rows, when given)
    in this one process, the dense model again right before each row (architectures rebuilt, MACs checked):
    for a run whose machine was busy."""
    doc = json.loads(path.read_text())

    def chosen(row: dict) -> bool:
        target = (row["setting"] or {}).get("mac_target")
        return targets is None or (row["method"] != "dense" and (target is None or float(target) in targets))

    for name in models:
        base = zoo.get(name, weights="shared").eval()
        for row in [r for r in doc["rows"] if r["model"] == name and chosen(r)]:
            model = rebuild(base, row)
            if macs(model) != row["macs"]:
                raise SystemExit(f"{name} {row['method']}: rebuilt MACs {macs(model)} != {row['macs']}")
            dense, lat = interleaved(base, model)
            row["latency_ms"], row["baseline_latency_ms"] = lat["torch"], dense["torch"]
            row["setting"]["ort_latency_ms"], row["setting"]["baseline_ort_latency_ms"] = lat["ort"], dense["ort"]
            row["notes"] += (f"; latency re-measured by --latency-pass: speed-up torch "
                             f"{dense['torch'][1] / lat['torch'][1]:.2f}x / {dense['torch'][64] / lat['torch'][64]:.2f}x, "
                             f"ort {dense['ort'][1] / lat['ort'][1]:.2f}x / {dense['ort'][64] / lat['ort'][64]:.2f}x")
            print(f"{name} {row['method']:32} {row['setting'].get('mac_target')} torch {lat['torch']} vs {dense['torch']} "
                  f"ort {lat['ort']} vs {dense['ort']}", flush=True)
    details = {**doc.get("details", {}), "latency": "re-measured by --latency-pass in one process: the dense model "
                                                    "and each row alternately, 2 rounds of 7 runs, best median of each, "
                                                    "pinned to one core (a shared, busy machine)"}
    print(write_result(BENCH, doc["rows"], path.parent, device="cpu",
                       command=doc["command"] + " ; python bench/compact_filters.py --latency-pass", details=details))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg16,resnet56")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--blocks", default="separable,bsconv,fire,crelu")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=30, help="CPU form: fine-tune steps per row")
    p.add_argument("--ft-epochs", type=int, default=None, help="--full: fine-tune epochs per row (default 10)")
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--ft-lr", type=float, default=0.005)
    p.add_argument("--refit-images", type=int, default=None, help="training images of the refit (256; --full 1024)")
    p.add_argument("--full", action="store_true", help="GPU form: full test set, epochs of fine-tuning")
    p.add_argument("--dry-run", action="store_true",
                   help="the chosen form made tiny (64 test / refit images, 2 fine-tune steps, 1 latency repeat)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the (model, target) cells not run now from the existing JSON")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--latency-pass", action="store_true", help="only re-measure the latencies of <out>/compact_filters.json")
    p.add_argument("--latency-targets", default=None,
                   help="with --latency-pass: only the rows of these MAC targets (and the CReLU rows)")
    args = p.parse_args()
    logging.getLogger("netslim.compact").setLevel(logging.ERROR)
    logging.getLogger("netslim.lowrank").setLevel(logging.ERROR)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"  # a dry run: the CPU
    if device == "cpu":
        torch.set_num_threads(1)
    if args.latency_pass:
        return latency_pass(Path(args.out) / f"{BENCH}.json", args.models.split(","),
                            [float(v) for v in args.latency_targets.split(",")] if args.latency_targets else None)
    args.ft_epochs = args.ft_epochs or (10 if args.full else 1)
    args.refit_images = args.refit_images or (1024 if args.full else 256)
    if args.dry_run:
        args.ft_epochs, args.ft_steps, args.refit_images = 1, min(args.ft_steps, 2), min(args.refit_images, 64)
        REPEATS.update(latency=1, interleaved=1)
    test_full = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
    n_test = 64 if args.dry_run else (len(test_full) if args.full else args.test_images)
    test = test_full if n_test >= len(test_full) else Subset(test_full, sorted(order[:n_test].tolist()))
    train = nsdata.get("cifar10", "train", augment=True)
    plain = nsdata.get("cifar10", "train")  # the refit reads training images, never the test set
    picked = torch.randperm(len(plain), generator=torch.Generator().manual_seed(2))[: args.refit_images].tolist()
    images = torch.stack([plain[i][0] for i in picked])
    form_word = "dry-run" if args.dry_run else ("full" if args.full else "cpu")
    ft = (f"{args.ft_epochs} epochs{' of at most 2 steps' if args.dry_run else ''}" if args.full
          else f"{args.ft_steps} steps")
    form = (f"{'full' if args.full else 'CPU'} form{' (dry run: tiny, proves the command only)' if args.dry_run else ''}"
            f": top-1 on {len(test):,} test images; refit on {args.refit_images} "
            f"training images; fine-tune {ft} of batch {args.ft_batch} with KD 0.9 from the dense model (SGD lr "
            f"{args.ft_lr:g} cosine), the same for every row; latency on CPU, 1 thread, torch and onnxruntime")
    models = args.models.split(",")
    targets = [float(v) for v in args.targets.split(",")]
    blocks = args.blocks.split(",")
    path = Path(args.out) / f"{BENCH}.json"
    rows, details = [], {"form": form_word, "form_text": form, "layers": {}}
    if args.merge and path.exists():
        doc = json.loads(path.read_text())
        def kept(model: str, target) -> bool:  # rows of (model, target) cells not run now
            return model not in models or (target is not None and float(target) not in targets)

        rows = [r for r in doc["rows"] if kept(r["model"], (r["setting"] or {}).get("mac_target"))]
        details["layers"] = {k: v for k, v in doc.get("details", {}).get("layers", {}).items()
                             if kept(k.split("@")[0].split(" ")[0], k.split("@")[1].split("x ")[0] if "@" in k else None)}
    for name in models:
        base = zoo.get(name, weights="shared").eval()
        dense_macs = macs(base)
        base_top1 = top1(base, test, device)
        base_lat = latencies(base)
        rows.append(dict(model=name, dataset="cifar10", method="dense", tool="netslim", setting={"form": form_word,
                         "ort_latency_ms": base_lat["ort"]}, top1=base_top1, baseline_top1=base_top1,
                         params=sum(q.numel() for q in base.parameters()), macs=dense_macs, size_bytes=None,
                         latency_ms=base_lat["torch"], baseline_latency_ms=base_lat["torch"], notes=form))
        print(f"{name} dense top1 {100 * base_top1:.2f} torch {base_lat['torch']} ort {base_lat['ort']}", flush=True)
        write_result(BENCH, rows, args.out, device=device, details=details)
        def cells():  # one row at a time, so a stopped run keeps what it finished
            for t in targets:
                for c in candidates(base, name, t, blocks, images, device):
                    yield t, c
            if "crelu" in blocks:
                yield None, crelu_candidate(base, images, device)

        for t, (method, tool, converted, refit, info) in cells():
            t0 = time.time()
            top1_converted = top1(converted, test, device)
            model = refit if refit is not None else converted
            top1_refit = top1(model, test, device) if refit is not None else None
            fine_tune(model, base, train, args, device)
            top1_ft = top1(model, test, device)
            lat = latencies(model)
            m = macs(model)
            reduction = dense_macs / m
            key = f"{name}@{t:g}x {method}" if t else f"{name} {method}"
            details["layers"][key] = info
            setting = {"form": form_word, "mac_target": t, "mac_reduction": reduction, "top1_converted": top1_converted,
                       "top1_refit": top1_refit, "top1_fine_tuned": top1_ft, "ort_latency_ms": lat["ort"],
                       "baseline_ort_latency_ms": base_lat["ort"], "refit_images": args.refit_images if refit else 0,
                       "fine_tune": ft, **{k: v for k, v in info.items() if k in ("width_fraction", "energy", "replaced")}}
            notes = (f"top-1 converted {100 * top1_converted:.2f}%"
                     + (f", after refit {100 * top1_refit:.2f}%" if top1_refit is not None else " (no refit: pruned)")
                     + f", after fine-tune {100 * top1_ft:.2f}%; MACs {reduction:.2f}x fewer"
                     + (" (CReLU has no width knob: the reduction it reaches)" if t is None else "")
                     + f"; speed-up torch {base_lat['torch'][1] / lat['torch'][1]:.2f}x / {base_lat['torch'][64] / lat['torch'][64]:.2f}x,"
                     f" ort {base_lat['ort'][1] / lat['ort'][1]:.2f}x / {base_lat['ort'][64] / lat['ort'][64]:.2f}x (batch 1 / 64); {form}")
            rows.append(dict(model=name, dataset="cifar10", method=method, tool=tool, setting=setting, top1=top1_ft,
                             baseline_top1=base_top1, params=sum(q.numel() for q in model.parameters()), macs=m,
                             size_bytes=None, latency_ms=lat["torch"], baseline_latency_ms=base_lat["torch"], notes=notes))
            print(f"{name} {t or '-'}x {method:32} MACs {reduction:.2f}x top1 {100 * top1_converted:.2f} -> "
                  f"{'-' if top1_refit is None else f'{100 * top1_refit:.2f}'} -> {100 * top1_ft:.2f} | torch "
                  f"{lat['torch'][1]:.2f}/{lat['torch'][64]:.1f} ms ort {lat['ort'][1]:.2f}/{lat['ort'][64]:.1f} ms "
                  f"({time.time() - t0:.0f}s)", flush=True)
            write_result(BENCH, rows, args.out, device=device, details=details)  # partial results survive a stop
    print(write_result(BENCH, rows, args.out, device=device, details=details))


if __name__ == "__main__":
    main()
