"""Benchmark: low-rank factorization of VGG-16 and ResNet-56 (CIFAR-10) at 2x and 3x fewer MACs.

For each model and MAC target: netslim's methods (spatial SVD, Tucker-2, CP) with rank selectors
(uniform fixed fraction, energy, greedy target search on measured sensitivity; VBMF is one-shot
and reported at the reduction it picks), side by side with TensorLy-Torch's factorized
convolutions (``tltorch.FactorizedConv``, implementation "factorized" and "reconstructed") at the
same MAC target. Every netslim model is then refit
on a few hundred training images (asymmetric reconstruction, :func:`netslim.lowrank.refit_`).
Reported: MACs, params, top-1 as decomposed, after the refit, and after the same short fine-tune with
KD from the dense model (the best netslim config and the best peer config of each target), CPU
latency at batch 1 and 64 measured in the same run as the dense model.

CPU form (default): top-1 on a fixed random subset of the test set, a fine-tune of ``--ft-steps`` steps.
``--full``: the whole test set, a fine-tune of ``--ft-epochs`` epochs (on the GPU when there is one, else
the CPU), CP-ALS / Tucker-HOOI at 100 iterations. ``--dry-run`` keeps the chosen form and every code path
but makes it tiny (64 test, search and refit images, 1 epoch of at most 2 steps, 2 ALS iterations, cheap
latency) on the CPU to prove a command line works. The JSON's ``details.form`` is ``cpu``, ``full`` or ``dry-run``;
``details.form_text`` describes it.

    .venv/bin/python bench/lowrank.py [--models vgg16,resnet56] [--targets 2,3] [--test-images 2000] [--ft-steps 150] [--merge]
        [--full [--ft-epochs 10]] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.distill import distill
from netslim.lowrank import apply_plan_, greedy_rank_search, plan_decomposition, refit_
from netslim.lowrank.search import model_cost_after
from netslim.report import write_result
from netslim.targets import bisect
from netslim.surgery import replace_module_
from netslim.train import TrainConfig, evaluate

X = torch.randn(1, 3, 32, 32)
ALS_ITERS = 100 if torch.cuda.is_available() else 6  # CP-ALS / Tucker-HOOI iterations (CPU form: fewer)


LATENCY = {"repeats": 15, "warmup": 3}  # --dry-run: cheaper


def macs(model: nn.Module) -> int:
    return netslim.profile(model, X.to(next(model.parameters()).device), latency=False).macs


def top1(model: nn.Module, test, device) -> float:
    """Top-1 on ``device``; the model goes back to the CPU (decomposition, refit and profiling run there)."""
    result = evaluate(model, test, device=device)["top1"]
    model.cpu()
    return result


def bisect_knob(build, target_macs: int, lo: float = 0.02, hi: float = 1.0, steps: int = 14):
    """The largest knob in [lo, hi] whose model has at most ``target_macs`` (knob: rank fraction or energy)."""
    def value(knob):
        model = build(knob)
        return macs(model), model

    found = bisect(value, lo, hi, target_macs, increasing=True, steps=steps)
    return None if found is None else (found.knob, found.result)


def netslim_plan(base, method, selector, dense_macs, goal, lo, hi):
    """Bisect the rank fraction (or energy) on formula MACs, then decompose once."""
    def value(knob):
        plan = plan_decomposition(base, X, method, selector, min(knob, 0.999999) if selector == "energy" else knob)
        return model_cost_after(plan, dense_macs, "macs"), plan

    found = bisect(value, lo, hi, goal, increasing=True, steps=14)
    if found is None:
        return None
    model = copy.deepcopy(base)
    apply_plan_(model, found.result, iters=ALS_ITERS)
    return found.knob, model


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


def _get_factorized_conv(weight, implementation):
    from tltorch.factorized_layers.factorized_convolution import _get_factorized_conv as pick

    return pick(weight, implementation)


def tltorch_at_target(base, factorization, goal):
    """Bisect TensorLy-Torch's rank fraction on MACs with random factors (fast), decompose once, and
    return the model in both of its implementations ("factorized", "reconstructed"), same factors."""
    got = bisect_knob(tltorch_build(base, factorization, "factorized", decompose=False), goal, lo=0.01, hi=1.0, steps=10)
    if got is None:
        return {}
    factorized = tltorch_build(base, factorization, "factorized")(got[0])
    reconstructed = copy.deepcopy(factorized)
    for m in reconstructed.modules():
        if hasattr(m, "forward_fun"):  # TensorLy-Torch picks the forward function when the layer is built
            m.implementation = "reconstructed"
            m.forward_fun = _get_factorized_conv(m.weight, "reconstructed")
    return {"factorized": (got[0], factorized), "reconstructed": (got[0], reconstructed)}


def previous_rows(path: Path, rerun: dict[str, set[float]], details: dict) -> tuple[list[dict], dict]:
    """Rows and config details of (model, MAC target) pairs that are not being rerun, from an earlier
    result file. A rerun model's dense row is replaced too (it is measured again in this run)."""
    if not path.exists():
        return [], details

    def kept(model: str, target: float | None) -> bool:
        return model not in rerun or (target is not None and target not in rerun[model])

    doc = json.loads(path.read_text())
    rows = [r for r in doc["rows"] if kept(r["model"], r["setting"].get("mac_target"))]
    configs = {k: v for k, v in doc.get("details", {}).get("configs", {}).items()
               if "@" not in k or kept(k.split("@")[0], float(k.split("@")[1].split("x")[0]))}
    return rows, {**details, "configs": configs}


def latency(model) -> dict[int, float]:
    """CPU latency at batch 1 and 64 (of a CPU copy when the model sits on a GPU)."""
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return netslim.profile(model, X, batch_sizes=(1, 64), **LATENCY).latency_ms


def decomposed_layers(model: nn.Module, base: nn.Module) -> list[str]:
    """Names (forward order) of the layers of ``base`` that ``model`` holds as a decomposed Sequential."""
    original = dict(base.named_modules())
    return [n for n, m in model.named_modules()
            if n and isinstance(m, nn.Sequential) and n in original and not isinstance(original[n], nn.Sequential)]


def ft_config(args) -> TrainConfig:
    """The fine-tune: ``--ft-steps`` steps (CPU form) or ``--ft-epochs`` epochs (``--full``) of batch 128;
    ``--dry-run`` has capped both to 1 epoch of at most 2 steps."""
    if args.full:
        return TrainConfig(epochs=args.ft_epochs, lr=args.ft_lr, weight_decay=5e-4,
                           max_steps_per_epoch=2 if args.dry_run else None)
    return TrainConfig(epochs=1, lr=args.ft_lr, max_steps_per_epoch=args.ft_steps, weight_decay=5e-4)


def fine_tune(model: nn.Module, base: nn.Module, train, config: TrainConfig, device: str) -> None:
    """The same fine-tune for every model: KD from the dense model (Hinton 2015, weight 0.9, T = 4)."""
    distill(model, base, train, {"kd": 0.9}, config=config, device=device, progress=False)
    model.cpu()
    base.cpu()


def netslim_candidates(base, dense_macs: int, goal: int, t: float, held, device: str, details: dict, name: str) -> dict:
    """netslim's methods and rank selectors at the MAC goal: {(method, selector, tool): (knob, model)}."""
    candidates = {}
    for method in ("spatial", "tucker2", "cp"):  # a CP rank may exceed max(N, C): fractions up to 4
        got = netslim_plan(base, method, "fixed", dense_macs, goal, 0.01, 4.0 if method == "cp" else 1.0)
        if got:
            candidates[(method, "fixed uniform", "netslim")] = got
    got = netslim_plan(base, "spatial", "energy", dense_macs, goal, 0.3, 1.0)
    if got:
        candidates[("spatial", "energy", "netslim")] = got
    t0 = time.time()
    report, _ = greedy_rank_search(copy.deepcopy(base), X, held, f"macs:{t}", "spatial", progress=False,
                                   device=device, model_cost=float(dense_macs))
    greedy = copy.deepcopy(base)
    apply_plan_(greedy, report)
    candidates[("spatial", "greedy target", "netslim")] = (None, greedy)
    details["configs"][f"{name}@{t:g}x greedy search s"] = time.time() - t0
    return candidates


def vbmf_rows(base, name: str, dense_macs: int, base_top1: float, base_lat: dict, test, refit_images, form: str,
              device: str) -> list[dict]:
    """One-shot VBMF ranks (Kim 2016) for spatial and Tucker-2: reported at the MAC reduction they pick."""
    rows = []
    for method in ("spatial", "tucker2"):
        model = copy.deepcopy(base)
        report = plan_decomposition(model, X, method, "vbmf")
        if all(p.skipped for p in report.layers.values()):
            continue
        apply_plan_(model, report, iters=ALS_ITERS)
        model.eval()
        raw = top1(model, test, device)
        refit_top1 = raw
        if refit_images is not None:
            refit_(model, base, refit_images, decomposed_layers(model, base))
            refit_top1 = top1(model, test, device)
        m, lat = macs(model), latency(model)
        print(f"{name} vbmf {method:8} MACs {dense_macs / m:.2f}x top1 {100 * raw:.2f} refit {100 * refit_top1:.2f} "
              f"speed-up {base_lat[1] / lat[1]:.2f}x / {base_lat[64] / lat[64]:.2f}x", flush=True)
        rows.append(dict(model=name, dataset="cifar10", method=f"{method} / vbmf", tool="netslim",
                         setting={"mac_target": None, "fine_tune_steps": 0, "top1_decomposed": raw,
                                  "top1_before_fine_tune": refit_top1, "refit_images": len(refit_images) if refit_images is not None else 0},
                         top1=refit_top1, baseline_top1=base_top1, params=sum(q.numel() for q in model.parameters()), macs=m,
                         size_bytes=None, latency_ms=lat, baseline_latency_ms=base_lat,
                         notes=f"one-shot VBMF ranks; top-1 decomposed {100 * raw:.2f}%, after refit {100 * refit_top1:.2f}%, "
                               f"not fine-tuned; MAC reduction {dense_macs / m:.2f}x; {form}"))
    return rows


def rebuild(base: nn.Module, row: dict, held, device: str) -> nn.Module:
    """A row's architecture again, from its method and knob (weights are irrelevant to latency: factors
    come from one ALS / HOOI iteration, TensorLy-Torch's are random)."""
    method, selector = row["method"].split(" / ")
    setting = row["setting"]
    if row["tool"] == "tensorly-torch":
        impl = "reconstructed" if "reconstructed" in selector else "factorized"
        return tltorch_build(base, method, impl, decompose=False)(setting["knob"])
    if selector == "fixed uniform":
        report = plan_decomposition(base, X, method, "fixed", setting["knob"])
    elif selector == "energy":
        report = plan_decomposition(base, X, method, "energy", min(setting["knob"], 0.999999))
    elif selector == "vbmf":
        report = plan_decomposition(base, X, method, "vbmf")
    else:  # the greedy search is deterministic for the same held-out images
        report, _ = greedy_rank_search(copy.deepcopy(base), X, held, f"macs:{setting['mac_target']}", method,
                                       progress=False, device=device, model_cost=float(macs(base)))
    model = copy.deepcopy(base)
    apply_plan_(model, report, iters=1)
    return model


def latency_pass(path: Path, held, device: str) -> None:
    """Re-measure every row's latency in one quiet process, each model beside its dense model, so rows from
    runs that shared the machine are compared on equal terms. A rebuilt model must have the row's MACs."""
    doc = json.loads(path.read_text())
    models = list(dict.fromkeys(r["model"] for r in doc["rows"]))
    for name in models:
        base = zoo.get(name, weights="shared").eval()
        base_lat = latency(base)
        for row in (r for r in doc["rows"] if r["model"] == name):
            model = base if row["method"] == "dense" else rebuild(base, row, held, device).eval()
            if "reconstructed" in row["method"] and macs(model) != row["macs"]:  # runs before this fix ran the
                row["macs"] = macs(model)  # factorized forward; this pass measures the full kernel it rebuilds
                row["notes"] += "; MACs and latency as executed (the full kernel is rebuilt at every forward)"
            if macs(model) != row["macs"]:
                raise SystemExit(f"{name} {row['method']}: rebuilt model has {macs(model):,} MACs, the row {row['macs']:,}")
            row["latency_ms"], row["baseline_latency_ms"] = latency(model), base_lat
            print(f"{name} {row['tool']:15} {row['method']:45} speed-up {base_lat[1] / row['latency_ms'][1]:.2f}x / "
                  f"{base_lat[64] / row['latency_ms'][64]:.2f}x", flush=True)
    details = {**doc.get("details", {}), "latency": (
        "every latency re-measured by `bench/lowrank.py --latency-pass` in one process on a quiet machine, "
        "pinned to one core, each model's rows after its dense model (architectures rebuilt from each row's knob)")}
    command = f"{doc['command']} ; {' '.join([Path(sys.executable).name, *sys.argv])}"
    print(write_result("lowrank", doc["rows"], path.parent, device=device, command=command, details=details))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg16,resnet56")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=150, help="CPU form: fine-tune steps of batch 128")
    p.add_argument("--ft-epochs", type=int, default=10, help="--full: fine-tune epochs of batch 128")
    p.add_argument("--ft-lr", type=float, default=0.002)
    p.add_argument("--ft-extra", default="",
                   help="netslim rows fine-tuned besides each tool's best, e.g. 'spatial / energy' (comma-separated)")
    p.add_argument("--search-images", type=int, default=500)
    p.add_argument("--refit-images", type=int, default=256,
                   help="training images for netslim's data-aware refit of each decomposed layer (0: off)")
    p.add_argument("--full", action="store_true",
                   help="full form: the whole test set, --ft-epochs epochs of fine-tuning (GPU when there is one)")
    p.add_argument("--dry-run", action="store_true",
                   help="the chosen form made tiny (64 test / search / refit images, 2 fine-tune steps) to prove it runs")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--latency-pass", action="store_true",
                   help="only re-measure the latencies of every row of <out>/lowrank.json (run it on a quiet machine)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows (and details) of the (model, target) pairs not run now from the existing JSON")
    args = p.parse_args()
    logging.getLogger("netslim.lowrank").setLevel(logging.ERROR)  # bisection probes many skipped layers
    warnings.filterwarnings("ignore", message="Trying to compute SVD")  # TensorLy's SVD-init notices
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"  # a dry run: the CPU
    global ALS_ITERS
    if args.full:
        ALS_ITERS = 100
    if args.dry_run:
        ALS_ITERS = 2
        args.ft_steps, args.ft_epochs = min(args.ft_steps, 2), min(args.ft_epochs, 1)
        args.search_images, args.refit_images = min(args.search_images, 64), min(args.refit_images, 64)
        LATENCY.update(repeats=1, warmup=1)
    test_full = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
    n_test = 64 if args.dry_run else (len(test_full) if args.full else args.test_images)
    test = Subset(test_full, sorted(order[:n_test].tolist())) if n_test < len(test_full) else test_full
    train = nsdata.get("cifar10", "train", augment=True)
    plain = nsdata.get("cifar10", "train")
    held = Subset(plain, torch.randperm(50_000, generator=torch.Generator().manual_seed(1))[: args.search_images].tolist())
    refit_images = torch.stack([plain[i][0] for i in
                                torch.randperm(50_000, generator=torch.Generator().manual_seed(2))[: args.refit_images].tolist()]) \
        if args.refit_images else None
    if args.latency_pass:
        return latency_pass(Path(args.out) / "lowrank.json", held, device)
    cfg = ft_config(args)
    if args.full:
        ft = (f"{cfg.epochs} epoch(s)" + (f" of at most {cfg.max_steps_per_epoch} steps" if cfg.max_steps_per_epoch else "")
              + f" of batch {cfg.batch_size}")
        budget = {"fine_tune_epochs": cfg.epochs}
    else:
        ft, budget = f"{args.ft_steps} steps of batch 128", {"fine_tune_steps": args.ft_steps}
    form = (f"{'full' if args.full else ('GPU' if device == 'cuda' else 'CPU')} form"
            f"{' (dry run: tiny, proves the command only)' if args.dry_run else ''}: top-1 on {len(test):,} test images; "
            f"netslim rows refit on {args.refit_images} training images; fine-tune {ft} with KD from the dense "
            f"model (SGD lr {args.ft_lr:g} cosine, on {device}) for the best row of each tool; CP-ALS / Tucker-HOOI "
            f"{ALS_ITERS} iterations")
    targets = [float(v) for v in args.targets.split(",")]
    rows, details = [], {"form": "dry-run" if args.dry_run else ("full" if args.full else "cpu"), "form_text": form,
                         "configs": {}}
    if args.merge:
        rows, details = previous_rows(Path(args.out) / "lowrank.json",
                                      {m: set(targets) for m in args.models.split(",")}, details)
    for name in args.models.split(","):
        base = zoo.get(name, weights="shared").eval()
        dense_macs = macs(base)
        base_top1 = top1(base, test, device)
        base_lat = latency(base)
        rows.append(dict(model=name, dataset="cifar10", method="dense", tool="netslim", setting={}, top1=base_top1,
                         baseline_top1=base_top1, params=sum(q.numel() for q in base.parameters()), macs=dense_macs,
                         size_bytes=None, latency_ms=base_lat, baseline_latency_ms=base_lat, notes=form))
        rows.extend(vbmf_rows(base, name, dense_macs, base_top1, base_lat, test, refit_images, form, device))
        write_result("lowrank", rows, args.out, device=device, details=details)
        for t in targets:
            goal = int(dense_macs / t)
            candidates = netslim_candidates(base, dense_macs, goal, t, held, device, details, name)
            for fac in ("tucker", "cp"):
                try:
                    for impl, got in tltorch_at_target(base, fac, goal).items():
                        candidates[(fac, f"tltorch rank fraction ({impl})", "tensorly-torch")] = got
                except Exception as exc:  # report a peer failure rather than hide it
                    details["configs"][f"{name}@{t:g}x tltorch {fac}"] = f"failed: {exc}"
            scored = []
            for (method, selector, tool), (knob, model) in candidates.items():
                model.eval()
                raw = top1(model, test, device)
                refit_top1, refit_s = raw, None
                if tool == "netslim" and refit_images is not None:
                    t0 = time.time()
                    refit_(model, base, refit_images, decomposed_layers(model, base))
                    refit_s = time.time() - t0
                    refit_top1 = top1(model, test, device)
                lat = latency(model)
                m = macs(model)
                scored.append(dict(top1=refit_top1, raw=raw, refit_s=refit_s, method=method, selector=selector, tool=tool,
                                   knob=knob, model=model, lat=lat, macs=m))
                print(f"{name} {t:g}x {tool:15} {method:8} {selector:34} MACs {dense_macs / m:.2f}x top1 {100 * raw:.2f}"
                      f"{f' refit {100 * refit_top1:.2f}' if refit_s is not None else ''} "
                      f"speed-up {base_lat[1] / lat[1]:.2f}x / {base_lat[64] / lat[64]:.2f}x", flush=True)
            best = {}
            for s in scored:
                if s["tool"] not in best or s["top1"] > best[s["tool"]]["top1"]:
                    best[s["tool"]] = s
            extra = {v.strip() for v in args.ft_extra.split(",") if v.strip()}
            for s in scored:
                ft_top1 = None
                wanted = best[s["tool"]] is s or (s["tool"] == "netslim" and f"{s['method']} / {s['selector']}" in extra)
                if wanted and (args.full or args.ft_steps > 0):
                    fine_tune(s["model"], base, train, cfg, device)
                    ft_top1 = top1(s["model"], test, device)
                    print(f"   fine-tuned {s['tool']} {s['method']} {s['selector']}: {100 * ft_top1:.2f}", flush=True)
                setting = {"mac_target": t, "knob": s["knob"],
                           **{k: v if ft_top1 is not None else 0 for k, v in budget.items()},
                           "top1_decomposed": s["raw"], "top1_before_fine_tune": s["top1"],
                           "refit_images": args.refit_images if s["refit_s"] is not None else 0, "refit_s": s["refit_s"]}
                before = (f"top-1 decomposed {100 * s['raw']:.2f}%"
                          + (f", after refit {100 * s['top1']:.2f}%" if s["refit_s"] is not None else "")
                          + (f", after fine-tune {100 * ft_top1:.2f}%" if ft_top1 is not None else ", not fine-tuned"))
                rows.append(dict(model=name, dataset="cifar10", method=f"{s['method']} / {s['selector']}", tool=s["tool"],
                                 setting=setting, top1=ft_top1 if ft_top1 is not None else s["top1"], baseline_top1=base_top1,
                                 params=sum(q.numel() for q in s["model"].parameters()), macs=s["macs"], size_bytes=None,
                                 latency_ms=s["lat"], baseline_latency_ms=base_lat,
                                 notes=f"{before}; MAC reduction {dense_macs / s['macs']:.2f}x; {form}"))
            write_result("lowrank", rows, args.out, device=device, details=details)  # partial results survive a stop
    print(write_result("lowrank", rows, args.out, device=device, details=details))


if __name__ == "__main__":
    main()
