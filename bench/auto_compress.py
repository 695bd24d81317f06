"""Benchmark: the cross-family search (``netslim search``) against the best each single family reaches
alone, at the same measured latency target on onnxruntime CPU (1 thread).

Per (model, target): the joint search (prune + lowrank + compact + quant); the same search restricted to
one family (structured pruning alone, low-rank alone, quantization alone including mixed precision), each
with the same trial budget; every chosen model gets the same short KD fine-tune from the dense model.
Each row: measured onnxruntime latency (the dense model timed in the same run), the lookup table's
predicted latency, the search's wall time on this machine, top-1 before and after the fine-tune. The
joint search's Pareto front is also fine-tuned point by point to measure the rank correlation (Spearman)
between the cheap estimate (held-out training slice, no training) and top-1 after the fine-tune.

CPU form (default): top-1 on a fixed 2,000-image subset of the test set, ``--ft-steps`` fine-tune steps,
``--trials`` per search, onnxruntime at batch 1. ``--full`` (for a GPU, else the CPU): full test set,
``--ft-epochs`` epochs (default 10), batch 1 and batch 64 (``--batches`` sets them in either form). ``--dry-run`` keeps the chosen form and every code path but makes it tiny (64 test,
held-out and calibration images, only the search's seeded trials, 1 epoch of at most 2 steps, cheap
latency) on the CPU to prove a command line works. The JSON's ``details.form`` (``cpu``, ``full`` or
``dry-run``) and ``details.form_text`` say which.

The peers' pipeline a user would assemble today: Torch-Pruning (MetaPruner, group L2; ``pip install
torch-pruning``) at the channel ratio whose model, after onnxruntime's ``quantize_static`` (QDQ, per-channel
int8 weights, uint8 activations, MinMax calibration on 256 training images), meets the same measured
latency (bisection on the ratio), with the same KD fine-tune before quantization; top-1 of the int8 ONNX
model in onnxruntime.

    .venv/bin/python bench/auto_compress.py [--models resnet56,mobilenetv2] [--targets 3,5] [--trials 40]
        [--families joint,prune,lowrank,quant] [--ft-steps 150] [--test-images 2000] [--batches 1,64] [--merge]
        [--full] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

import netslim
from netslim import data as nsdata
from netslim import zoo
from netslim.distill import distill
from netslim.report import write_result
from netslim.search import SearchConfig, auto_compress
from netslim.search.cost import measure_ms, paired_ms, parse_device
from netslim.train import TrainConfig, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCH = "auto_compress"
X = torch.randn(1, 3, 32, 32)
TIMING = {"repeats": 50, "rounds": 5, "pair_rounds": 3, "pairs": 200, "warmup": 10, "calib": 256}  # --dry-run: cheaper
FAMILY_SETS = {"joint": ["prune", "lowrank", "compact", "quant"], "prune": ["prune"], "lowrank": ["lowrank"],
               "quant": ["quant"], "greedy": ["prune", "lowrank", "compact", "quant"]}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None under 3 points."""
    if len(a) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else None


def fine_tune(model, base, train, args) -> None:
    """The same fine-tune for every row: KD from the dense model (weight 0.9, T = 4), SGD cosine."""
    cfg = TrainConfig(epochs=args.ft_epochs, lr=args.ft_lr, batch_size=64, weight_decay=5e-4,
                      max_steps_per_epoch=(2 if args.dry_run else None) if args.full else args.ft_steps)
    distill(model, base, train, {"kd": 0.9}, config=cfg, device=args.device, progress=False)
    model.cpu()
    base.cpu()


def top1(model, test, device) -> float:
    """Top-1 on ``device``; the model goes back to the CPU (the search, export and timing read it there)."""
    result = evaluate(model, test, device=device)["top1"]
    model.cpu()
    return result


def interleaved_ms(device, model, base, rounds: int | None = None) -> tuple[float, float]:
    """The model's and the dense model's latency, timed run by run in turn (``paired_ms``: the same noise
    hits both); of ``rounds`` rounds, the one with the median speed-up."""
    timed = sorted((paired_ms(device, model, base, X, pairs=TIMING["pairs"], warmup=TIMING["warmup"])
                    for _ in range(rounds or TIMING["pair_rounds"])), key=lambda p: p[1] / p[0])
    return timed[len(timed) // 2]


def dry_run_trials(base, family: str, trials: int) -> int:
    """``--dry-run``'s trials: the search's seeded starting points only (2 for quant alone, 26 for the joint
    space of ResNet-56), which end at the fastest corners of the space, so a dry run reaches the target
    when the real run can and goes on through the fine-tune; two trials would stop at the dense end."""
    from netslim.search.engine import seeds
    from netslim.search.space import build_space

    return max(1, min(trials, len(seeds(build_space(base, X, FAMILY_SETS[family])))))


def tuned_model(base, families, candidate, calib, train, args):
    """The recipe's order: the candidate's structure in float (channels, factorizations, blocks, refit on
    training images), the KD fine-tune, then post-training quantization of the layers the candidate puts
    in 8 / 4 bits, calibrated on training images."""
    from netslim.quant import QuantConfig, quantize
    from netslim.search.apply import apply_candidate, plan_of, quant_options
    from netslim.search.space import build_space

    space = build_space(base, X, families)
    floating = {k: ("float" if k.startswith("bits:") else v) for k, v in candidate.items()}
    model, _ = apply_candidate(base, X, space, floating, calib)
    fine_tune(model, base, train, args)
    model.eval()
    bits = plan_of(space, candidate)["bits"]
    if bits:
        batches = [calib[i:i + 64] for i in range(0, len(calib), 64)]
        model = quantize(model, X, batches, QuantConfig(**quant_options(model, bits)), device="cpu")
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet56")
    p.add_argument("--targets", default="3")
    p.add_argument("--families", default="joint,prune,lowrank,quant,greedy",
                   help="rows: joint (NSGA-II over every family), prune / lowrank / quant (one family), greedy "
                        "(NetAdapt-style over every family)")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--held-out", type=int, default=500)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=150)
    p.add_argument("--ft-epochs", type=int, default=None)
    p.add_argument("--ft-lr", type=float, default=0.005)
    p.add_argument("--front-points", type=int, default=5, help="front points fine-tuned for the rank correlation")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="the Torch-Pruning + onnxruntime quantize_static row")
    p.add_argument("--full", action="store_true", help="full form: the whole test set, --ft-epochs epochs (default 10)")
    p.add_argument("--dry-run", action="store_true",
                   help="the chosen form made tiny (64 test / held-out / calibration images, only the search's seeded "
                        "trials, 2 fine-tune steps)")
    p.add_argument("--batches", default=None,
                   help="onnxruntime batch sizes the targets are measured at (default: 1; --full: 1,64)")
    p.add_argument("--merge", action="store_true")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--runs", default="runs/bench_auto_compress",
                   help="the searches' run folders (under --dry-run: its dry-run/ subfolder, apart from real studies)")
    args = p.parse_args()
    logging.getLogger("netslim").setLevel(logging.ERROR)
    args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"  # a dry run: the CPU
    torch.set_num_threads(1)
    args.ft_epochs = args.ft_epochs or (10 if args.full else 1)
    batches = [int(b) for b in (args.batches or ("1,64" if args.full else "1")).split(",")]
    if args.dry_run:
        args.ft_epochs, args.ft_steps = 1, min(args.ft_steps, 2)
        args.held_out, args.front_points = min(args.held_out, 64), min(args.front_points, 2)
        TIMING.update(repeats=2, rounds=1, pair_rounds=1, pairs=2, warmup=1, calib=64)
        args.runs = str(Path(args.runs) / "dry-run")
    test_full = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test_full), generator=torch.Generator().manual_seed(0))
    n_test = 64 if args.dry_run else (len(test_full) if args.full else args.test_images)
    test = test_full if n_test >= len(test_full) else Subset(test_full, sorted(order[:n_test].tolist()))
    train = nsdata.get("cifar10", "train", augment=True)
    plain = nsdata.get("cifar10", "train")
    from netslim.search.api import split_training_data
    _, calib = split_training_data(plain, args.held_out, TIMING["calib"])  # the search's own calibration images
    form = "dry-run" if args.dry_run else ("full" if args.full else "cpu")
    ft = (f"{args.ft_epochs} epochs{' of at most 2 steps' if args.dry_run else ''}" if args.full
          else f"{args.ft_steps} steps")
    dry = " (dry run: tiny, proves the command only)" if args.dry_run else ""
    form_text = (f"{'full' if args.full else 'cpu'} form{dry}: top-1 on {len(test):,} test images; every chosen model fine-tuned {ft} (batch 64, KD "
                 f"0.9 from the dense model, SGD lr {args.ft_lr:g} cosine); searches estimate top-1 on {args.held_out} "
                 f"held-out training images, "
                 f"{'the seeded starting points (at most ' if args.dry_run else ''}{args.trials}"
                 f"{')' if args.dry_run else ''} trials each; latency: onnxruntime CPU, 1 thread, batch {', '.join(map(str, batches))}")
    path = Path(args.out) / f"{BENCH}.json"
    rows, details = [], {"form": form, "form_text": form_text, "searches": {}}
    models = args.models.split(",")
    fams = args.families.split(",")
    targets = [float(v) for v in args.targets.split(",")]
    if args.merge and path.exists():  # keep every row this run does not redo
        rows, details["searches"] = kept_rows(json.loads(path.read_text()), models, fams, batches, targets, args.peers)
    for name in models:
        base = zoo.get(name, weights="shared").eval()
        dense = {b: measure_ms(parse_device("ort-cpu", 1, b), base, X, repeats=TIMING["repeats"], rounds=TIMING["rounds"])
                 for b in batches}
        base_top1 = top1(base, test, args.device)
        rows.append(dict(model=name, dataset="cifar10", method="dense", tool="netslim",
                         setting={"form": form, "ort_latency_ms": dense}, top1=base_top1, baseline_top1=base_top1,
                         params=sum(q.numel() for q in base.parameters()), macs=netslim.profile(base, X, latency=False).macs,
                         latency_ms=dense, baseline_latency_ms=dense, notes=form_text))
        write_result(BENCH, rows, args.out, device=args.device, details=details)
        for batch in batches:
            for t in targets:
                cell(name, base, base_top1, batch, t, dense[batch], fams, rows, details, calib, train, plain, test, args,
                     form, form_text)


def kept_rows(doc: dict, models, fams, batches, targets, peers: bool) -> tuple[list[dict], dict]:
    """The rows and searches of an earlier result that this run does not redo: another model, method, batch
    or target (the dense rows of this run's models are measured again)."""
    redo = {f"search {f}" for f in fams} | ({"Torch-Pruning + ort quantize_static"} if peers else set())

    def redone(r: dict) -> bool:
        if r["model"] not in models:
            return False
        if r["method"] == "dense":
            return True
        s = r.get("setting", {})
        return r["method"] in redo and s.get("batch", 1) in batches and s.get("latency_target") in targets

    def search_redone(key: str) -> bool:
        where, what = key.split(" ", 1)
        model, cell = where.split("@")
        target, _, batch = cell.partition("/b")
        return (model in models and what in {*fams, "peers"} and float(target.rstrip("x")) in targets
                and int(batch or 1) in batches)

    rows = [r for r in doc["rows"] if not redone(r)]
    searches = {k: v for k, v in doc.get("details", {}).get("searches", {}).items() if not search_redone(k)}
    return rows, searches


def cell(name, base, base_top1, batch, t, dense_ms, fams, rows, details, calib, train, plain, test, args, form, form_text):
    """Every row of one (model, batch, target) cell: each search, then the peers' pipeline; the JSON is
    rewritten after each row."""
    device = parse_device("ort-cpu", 1, batch)
    at = f"{name}@{t:g}x" + ("" if batch == 1 else f"/b{batch}")  # batch 1 keeps the keys of earlier results
    for fam in fams:
        key = f"{at} {fam}"
        tiny = ({"trials": dry_run_trials(base, fam, args.trials), "calib_images": TIMING["calib"],
                 "refit_images": 64} if args.dry_run else {"trials": args.trials})
        cfg = SearchConfig(target=f"latency:{t:g}", device="ort-cpu", batch=batch, families=FAMILY_SETS[fam],
                           held_out=args.held_out, max_drop=1.0, strategy="greedy" if fam == "greedy" else "nsga2",
                           **tiny)
        t0 = time.time()
        try:
            result = auto_compress(base, X, plain, cfg, out=Path(args.runs) / f"{name}_{t:g}x_b{batch}_{fam}",
                                   refs={"model": name, "weights": "shared", "data": "cifar10"}, progress=True)
        except netslim.NetslimError as exc:  # e.g. the family alone cannot reach the target
            details["searches"][key] = {"error": str(exc)}
            print(f"{key}: {exc}", flush=True)
            write_result(BENCH, rows, args.out, device=args.device, details=details)
            continue
        search_s = time.time() - t0
        chosen = result.summary["chosen"]
        before_ms, _ = interleaved_ms(device, result.model, base)
        top1_before = top1(result.model, test, args.device)
        model = tuned_model(base, FAMILY_SETS[fam], result.candidate, calib, train, args)
        top1_after = top1(model, test, args.device)
        measured, dense_again = interleaved_ms(device, model, base)
        info = {"form": form, "latency_target": t, "batch": batch, "families": FAMILY_SETS[fam],
                "ort_latency_ms": measured, "baseline_ort_latency_ms": dense_again, "speedup": dense_again / measured,
                "ort_latency_ms_before_ft": before_ms, "search_measured_ms": chosen["measured_ms"],
                "search_dense_ms": chosen.get("dense_ms"), "predicted_ms": chosen.get("predicted_ms"),
                "prediction_error": chosen["prediction_error"], "search_seconds": search_s,
                "trials": result.summary.get("trials", result.summary.get("evaluated")),
                "top1_estimate": chosen["top1"], "top1_before_ft": top1_before, "top1_after_ft": top1_after,
                "candidate": result.candidate,
                "latency_fit_max_error": result.summary["latency_model"]["max_fit_error"]}
        rows.append(dict(model=name, dataset="cifar10", method=f"search {fam}", tool="netslim", setting=info,
                         top1=top1_after, baseline_top1=base_top1, params=sum(q.numel() for q in model.parameters()),
                         macs=chosen["macs"], size_bytes=chosen["size_bytes"], latency_ms={batch: measured},
                         baseline_latency_ms={batch: dense_again}, notes=form_text))
        details["searches"][key] = {k: result.summary[k] for k in ("dense", "chosen", "verified", "latency_model",
                                                                     "search_seconds")}
        print(f"{key}: {dense_again / measured:.2f}x measured, top-1 {100 * top1_before:.2f} -> "
              f"{100 * top1_after:.2f} (dense {100 * base_top1:.2f}), search {search_s:.0f} s", flush=True)
        if fam == "joint":
            info["recipe"] = recipe_check(result, base, train, plain, test, device, args, dense_again / measured)
            print(f"{key} recipe via netslim.compress: {info['recipe']['speedup']:.2f}x measured "
                  f"({100 * info['recipe']['latency_vs_chosen']:+.1f} % latency against the chosen model)", flush=True)
        if fam == "joint" and args.front_points:
            details["searches"][key]["rank_correlation"] = front_correlation(result, base, calib, train, test, args)
        write_result(BENCH, rows, args.out, device=args.device, details=details)
    if args.peers:
        row, info = peers_row(name, base, dense_ms / t, t, batch, train, plain, test, args, form_text)
        if row is not None:
            row["baseline_top1"] = base_top1
            rows.append(row)
            print(f"{at} peers: {info['speedup']:.2f}x, top-1 {100 * info['top1_after_ft']:.2f}", flush=True)
        details["searches"][f"{at} peers"] = info
        write_result(BENCH, rows, args.out, device=args.device, details=details)


def recipe_check(result, base, train, plain, test, device, args, chosen_speedup: float) -> dict:
    """The search's ``recipe.yaml`` run by :func:`netslim.compress` (its fine-tune set to this run's budget,
    everything else as written) and its model timed in turn with the dense model: how close its latency
    comes to the chosen model's."""
    import yaml

    stages = yaml.safe_load(Path(result.recipe).read_text())["stages"]
    for stage in stages:
        if "finetune" in stage:
            stage["finetune"] = {**stage["finetune"], "epochs": args.ft_epochs, "lr": args.ft_lr, "batch_size": 64,
                                 "weight_decay": 5e-4,
                                 "max_steps_per_epoch": (2 if args.dry_run else None) if args.full else args.ft_steps}
    run = netslim.compress(base, stages, train_data=train, eval_data=test, calib_data=plain, example_input=X,
                           out=result.out / "recipe_run", restart=True, progress=False, device=args.device)
    model = run.model.cpu().eval()
    ms, dense_ms = interleaved_ms(device, model, base)
    return {"speedup": dense_ms / ms, "ort_latency_ms": ms, "baseline_ort_latency_ms": dense_ms,
            "chosen_speedup": chosen_speedup, "latency_vs_chosen": chosen_speedup / (dense_ms / ms) - 1,
            "top1": top1(model, test, args.device), "run_dir": str(run.run_dir)}


def ort_top1(onnx_model: bytes, test) -> float:
    from netslim.export import ort_session, run_onnx

    session = ort_session(onnx_model, threads=1)
    correct = total = 0
    loader = torch.utils.data.DataLoader(test, batch_size=250)
    for x, y in loader:
        out = run_onnx(session, x)[0]
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    return correct / total


def peers_row(name, base, goal_ms, factor, batch, train, plain, test, args, form_text):
    """Torch-Pruning then onnxruntime quantize_static, its pruning ratio bisected to the measured goal
    (``goal_ms``: the dense latency over ``factor``)."""
    import torch_pruning as tp
    from netslim.targets import bisect
    from quantization import fp32_onnx, ort_static

    n = TIMING["calib"]
    picked = torch.randperm(len(plain), generator=torch.Generator().manual_seed(5))[:n].tolist()
    calibration = [torch.stack([plain[i][0] for i in picked[j:j + 32]]) for j in range(0, n, 32)]

    def prune(ratio):
        m = copy.deepcopy(base)
        last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
        tp.pruner.MetaPruner(m, X, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                             ignored_layers=[last]).step()
        return m

    device = parse_device("ort-cpu", 1, batch)
    dense_onnx = fp32_onnx(base)

    def latency(ratio):  # the dense latency at the start times the speed-up timed in turn with the dense model
        m = prune(ratio)
        q = ort_static(fp32_onnx(m), calibration, "MinMax")
        ms, dense_now = paired_ms(device, q, dense_onnx, X, pairs=TIMING["pairs"], warmup=TIMING["warmup"])
        return goal_ms * factor * ms / dense_now, m

    t0 = time.time()
    found = bisect(latency, 0.0, 0.95, goal_ms, increasing=False, steps=8)
    if found is None:
        return None, {"error": f"Torch-Pruning + quantize_static does not reach {goal_ms:.3f} ms at any ratio <= 0.95"}
    model = found.result
    fine_tune(model, base, train, args)
    model.eval()
    q = ort_static(fp32_onnx(model), calibration, "MinMax")
    timed = sorted((paired_ms(device, q, dense_onnx, X, pairs=TIMING["pairs"], warmup=TIMING["warmup"])
                    for _ in range(TIMING["pair_rounds"])), key=lambda p: p[1] / p[0])
    measured, dense_ms = timed[len(timed) // 2]
    int8_top1 = ort_top1(q, test)
    info = {"form": "dry-run" if args.dry_run else ("full" if args.full else "cpu"), "ratio": found.knob, "batch": batch,
            "latency_target": factor,
            "ort_latency_ms": measured, "baseline_ort_latency_ms": dense_ms, "speedup": dense_ms / measured,
            "search_seconds": time.time() - t0, "top1_after_ft": int8_top1, "onnx_bytes": len(q)}
    return dict(model=name, dataset="cifar10", method="Torch-Pruning + ort quantize_static", tool="torch-pruning+onnxruntime",
                setting=info, top1=int8_top1, baseline_top1=None, params=sum(p.numel() for p in model.parameters()),
                macs=netslim.profile(model, X, latency=False).macs, size_bytes=len(q), latency_ms={batch: measured},
                baseline_latency_ms={batch: dense_ms}, notes=form_text), info


def front_correlation(result, base, calib, train, test, args) -> dict:
    """Fine-tune up to ``front_points`` points of the front (spread over latency) as the recipe does and
    correlate the cheap estimate with top-1 after the fine-tune."""
    front = result.front
    step = max(1, len(front) // args.front_points)
    picked = front[::step][: args.front_points]
    estimates, tuned = [], []
    for row in picked:
        model = tuned_model(base, FAMILY_SETS["joint"], row["candidate"], calib, train, args)
        estimates.append(row["top1"])
        tuned.append(top1(model, test, args.device))
    return {"points": [{"estimate": e, "fine_tuned": f} for e, f in zip(estimates, tuned)],
            "spearman": spearman(estimates, tuned)}


if __name__ == "__main__":
    main()
