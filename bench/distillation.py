"""Benchmark: knowledge distillation on CIFAR-10, ResNet-56 teacher -> ResNet-20 student from scratch.

One row per loss, all with the same student initialisation, seed, data order and budget: cross-entropy
only, KD (Hinton 2015), FitNets (Romero 2015), AT (Zagoruyko 2017), SP (Tung 2019), RKD (Park 2019),
NST (Huang 2017), PKT (Passalis 2018), CRD (Tian 2020) and KD+CRD. Loss weights, layers and KD
temperature follow the settings of CRD's benchmark (Tian et al. 2020, appendix; PKT's weight is
divided by the batch size because netslim's PKT sums over the batch per anchor instead of averaging).

Second part: ResNet-56 structurally pruned to 2x fewer MACs (``netslim.prune.structured``, L1 filter
norms), then fine-tuned with the same budget with plain cross-entropy vs. KD from the unpruned model.

The epochs form (``--full``, or by default when there is a GPU) trains every method for ``--epochs``
epochs and tests on the whole test set, on the GPU when there is one, else the CPU; the CPU form (by
default without a GPU) trains ``--steps`` steps per method and tests on a fixed random subset of
``--test-images`` test images. ``--dry-run`` keeps the chosen form and every code path but makes it tiny
(1 epoch of at most 2 steps, 64 test images) on the CPU to prove a command line works. The JSON's
``details.form`` is ``full``, ``cpu`` or ``dry-run``; ``details.form_text`` describes it.

    .venv/bin/python bench/distillation.py [--steps 300] [--test-images 2000] [--methods KD,AT] [--skip-pruned]
        [--full [--epochs 30]] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time

import torch
from torch.utils.data import Subset

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.distill import agreement, distill
from netslim.report import write_result
from netslim.train import TrainConfig, evaluate, fit

X = torch.randn(1, 3, 32, 32)
GROUPS = ["layer1", "layer2", "layer3"]


def methods(batch_size: int) -> dict[str, tuple[dict[str, float] | None, object]]:
    """Method name -> (losses, layers); ``None`` losses: plain cross-entropy through ``fit``."""
    return {
        "CE": (None, None),
        "KD": ({"kd": 0.9}, None),                                   # 0.1 CE + 0.9 KD, T = 4
        "FitNet": ({"ce": 1.0, "fitnet": 100.0}, ["layer2"]),         # hint: the middle group
        "AT": ({"ce": 1.0, "at": 1000.0}, GROUPS),
        "SP": ({"ce": 1.0, "sp": 3000.0}, ["layer3"]),
        "RKD": ({"ce": 1.0, "rkd": 25.0}, None),                      # 25 distance + 50 angle
        "NST": ({"ce": 1.0, "nst": 50.0}, GROUPS),
        "PKT": ({"ce": 1.0, "pkt": 30000.0 / batch_size}, None),
        "CRD": ({"ce": 1.0, "crd": 0.8}, None),
        "KD+CRD": ({"ce": 1.0, "kd": 1.0, "crd": 0.8}, None),
    }


def model_size(model) -> tuple[int, int]:
    prof = netslim.profile(model, X.to(next(model.parameters()).device), latency=False)
    return prof.params, prof.macs


def train_config(args, device: str) -> TrainConfig:
    """The epochs form (``--full``, or a GPU without ``--full``): ``--epochs`` epochs; the CPU form: ``--steps``
    steps (``--dry-run`` has set both to at most 1 epoch of 2 steps)."""
    if args.epochs_form:
        return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                           workers=args.workers, max_steps_per_epoch=2 if args.dry_run else None)
    return TrainConfig(epochs=1, lr=args.lr, batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                       max_steps_per_epoch=args.steps)


def student_from_scratch(seed: int):
    torch.manual_seed(seed)
    return zoo.get("resnet20")


def distillation_rows(args, device, train, test, teacher, teacher_top1, form, details, rows, save) -> None:
    cfg = train_config(args, device)
    table = methods(args.batch_size)
    names = {m.lower(): m for m in table}  # case-insensitive: "kd+crd" is "KD+CRD"
    asked = list(table) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in asked if m.lower() not in names]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {', '.join(table)}")
    chosen = [names[m.lower()] for m in asked]
    for name in chosen:
        losses, layers = table[name]
        student = student_from_scratch(args.seed)
        t0 = time.time()
        if losses is None:
            history = fit(student, train, cfg, device=device, progress=args.progress)
        else:
            history = distill(student, teacher, train, losses, layers, cfg, temperature=args.temperature,
                              device=device, progress=args.progress).history
        wall = time.time() - t0
        top1 = evaluate(student, test, device=device)["top1"]
        agree = agreement(student, teacher, test, device=device)
        params, macs = model_size(student)
        print(f"{name:8} top1 {100 * top1:.2f}  agreement with teacher {100 * agree:.2f}  {wall:.0f} s", flush=True)
        details["methods"][name] = {"wall_s": wall, "agreement_with_teacher": agree, "last_epoch": history[-1]}
        rows.append(dict(model="resnet20", dataset="cifar10", method=name, tool="netslim",
                         setting={"teacher": "resnet56", "losses": losses or {"ce": 1.0}, "layers": layers,
                                  "temperature": args.temperature if losses and "kd" in losses else None,
                                  **budget(args, device)},
                         top1=top1, baseline_top1=teacher_top1, params=params, macs=macs, size_bytes=4 * params,
                         latency_ms=None, baseline_latency_ms=None,
                         notes=f"student from scratch; top-1 agreement with the teacher {100 * agree:.2f}%; {form}"))
        save()  # partial results survive a stop


def budget(args, device: str) -> dict:
    if args.epochs_form:
        return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                **({"max_steps_per_epoch": 2} if args.dry_run else {})}
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}


def pruned_rows(args, device, train, test, teacher, teacher_top1, form, details, rows, save) -> None:
    """ResNet-56 pruned to 2x fewer MACs, fine-tuned with CE vs. KD from the unpruned model (same budget)."""
    try:
        from netslim.prune import structured
    except ImportError as exc:
        details["pruned"] = f"not run: netslim.prune.structured is not available ({exc})"
        print(details["pruned"], flush=True)
        return
    dense_params, dense_macs = model_size(teacher)
    t0 = time.time()
    pruned = structured(copy.deepcopy(teacher).cpu().eval(), X, criterion="l1", target="macs:2")
    params, macs = model_size(pruned)
    details["pruned"] = {"prune_s": time.time() - t0, "mac_reduction": dense_macs / macs,
                         "param_reduction": dense_params / params}
    cfg = dataclasses.replace(train_config(args, device), lr=args.ft_lr)
    variants = [("pruned 2x MACs, no fine-tune", None), ("pruned 2x MACs + CE fine-tune", "ce"),
                ("pruned 2x MACs + KD fine-tune", "kd")]
    for label, how in variants:
        model = copy.deepcopy(pruned).to(device)
        t0 = time.time()
        if how == "ce":
            fit(model, train, cfg, device=device, progress=args.progress)
        elif how == "kd":
            distill(model, teacher, train, {"kd": 0.9}, config=cfg, temperature=args.temperature, device=device,
                    progress=args.progress)
        top1 = evaluate(model, test, device=device)["top1"]
        agree = agreement(model, teacher, test, device=device)
        details["pruned"][label] = {"wall_s": time.time() - t0, "agreement_with_teacher": agree}
        print(f"{label:32} top1 {100 * top1:.2f}  agreement {100 * agree:.2f}", flush=True)
        rows.append(dict(model="resnet56", dataset="cifar10", method=label, tool="netslim",
                         setting={"criterion": "l1", "target": "macs:2", "fine_tune": how,
                                  **({**budget(args, device), "lr": args.ft_lr} if how else {})},
                         top1=top1, baseline_top1=teacher_top1, params=params, macs=macs, size_bytes=4 * params,
                         latency_ms=None, baseline_latency_ms=None,
                         notes=f"MACs {dense_macs / macs:.2f}x fewer; agreement with the unpruned model "
                               f"{100 * agree:.2f}%; {form}"))
        save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="all",
                   help="comma-separated subset (any case) of: " + ", ".join(methods(128)))
    p.add_argument("--steps", type=int, default=300, help="CPU form: training steps per method")
    p.add_argument("--epochs", type=int, default=30, help="epochs form (--full or a GPU): training epochs per method")
    p.add_argument("--test-images", type=int, default=2000, help="CPU form: size of the fixed random test subset")
    p.add_argument("--full", action="store_true",
                   help="the epochs form (--epochs, whole test set) even without a GPU (default: with a GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="the chosen form made tiny (1 epoch of at most 2 steps, 64 test images) to prove it runs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ft-lr", type=float, default=0.01, help="learning rate of the pruned model's fine-tuning")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--skip-pruned", action="store_true", help="leave out the pruned ResNet-56 part")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu and not args.dry_run else "cpu"  # a dry run: the CPU, in the form a GPU would choose
    args.epochs_form = args.full or gpu
    if args.dry_run:
        args.epochs, args.steps = min(args.epochs, 1), min(args.steps, 2)
    test_full = nsdata.get("cifar10", "test")
    n_test = 64 if args.dry_run else (len(test_full) if args.epochs_form else args.test_images)
    if n_test < len(test_full):
        order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
        test = Subset(test_full, sorted(order[:n_test].tolist()))
    else:
        test = test_full
    train = nsdata.get("cifar10", "train", augment=True)
    dry = " (dry run: tiny, proves the command only)" if args.dry_run else ""
    if args.epochs_form:
        form = (f"{'full' if args.full else 'GPU'} form{dry}: {args.epochs} epochs per method"
                f"{' of at most 2 steps' if args.dry_run else ''}, batch {args.batch_size}, SGD lr {args.lr} cosine, "
                f"on {device}; top-1 on {'all ' if len(test) == len(test_full) else ''}{len(test):,} test images")
    else:
        form = (f"CPU form{dry}: {args.steps} steps per method ({args.steps * args.batch_size / len(train):.2f} epochs), "
                f"batch {args.batch_size}, SGD lr {args.lr} cosine; top-1 on a fixed random subset of "
                f"{len(test):,} test images")
    form_word = "dry-run" if args.dry_run else ("full" if args.epochs_form else "cpu")
    teacher = zoo.get("resnet56", weights="shared").to(device).eval()
    teacher_top1 = evaluate(teacher, test, device=device)["top1"]
    reference = zoo.get("resnet20", weights="shared").to(device).eval()
    ref_top1 = evaluate(reference, test, device=device)["top1"]
    t_params, t_macs = model_size(teacher)
    s_params, s_macs = model_size(reference)
    reference_rows = [
        dict(model="resnet56", dataset="cifar10", method="teacher (shared checkpoint)", tool="netslim", setting={},
             top1=teacher_top1, baseline_top1=teacher_top1, params=t_params, macs=t_macs, size_bytes=4 * t_params,
             latency_ms=None, baseline_latency_ms=None, notes=form),
        dict(model="resnet20", dataset="cifar10", method="reference: shared checkpoint (160 epochs CE)",
             tool="netslim", setting={}, top1=ref_top1, baseline_top1=teacher_top1, params=s_params, macs=s_macs,
             size_bytes=4 * s_params, latency_ms=None, baseline_latency_ms=None,
             notes="the fully trained student for context, not the same budget; " + form),
    ]
    print(f"teacher resnet56 top1 {100 * teacher_top1:.2f}; resnet20 reference {100 * ref_top1:.2f}; {form}", flush=True)
    details = {"form": form_word, "form_text": form, "methods": {}, "pruned": "not run yet"}
    rows = list(reference_rows)

    def save():
        return write_result("distillation", rows, args.out, device=device, details=details)

    distillation_rows(args, device, train, test, teacher, teacher_top1, form, details, rows, save)
    if args.skip_pruned:
        details["pruned"] = "not run (--skip-pruned)"
    else:
        pruned_rows(args, device, train, test, teacher, teacher_top1, form, details, rows, save)
    print(save())


if __name__ == "__main__":
    main()
