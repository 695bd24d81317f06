"""The full-budget suite: the ``--full`` form of every benchmark, as many processes sharing one GPU,
scheduled longest-first to fit a wall-clock budget.

One *row* is one process: a slice of one benchmark (one model, target and method) that writes its
own JSON under ``<out>/rows/<row id>/``; at the end the slices of each benchmark are merged into
``<out>/<benchmark>.json`` (the common schema, ``details.form`` = ``full``, ``device`` naming the GPU).

Before starting, the suite prints its plan: every row with its estimated time, the slot it runs in,
and the rows dropped because the budget cannot hold them (lowest priority first: the rows the
open issues' goals need come first). The estimate of a row is

    start-up + epochs x 50,000 images x (seconds per training image of its model on this device)

where the seconds per image are **measured** on a CUDA device before the plan (a few dozen training
steps of each model through :func:`netslim.train.training_throughput`, alone and with every slot busy,
which gives how much the GPU overlaps concurrent processes). Without a GPU they are **extrapolated**
from each model's MACs at an assumed rate (``--assume-tflops``) and overlap (``--assume-overlap``),
and the plan says so.

``--dry-run`` runs every row's exact command line on the CPU with ``--dry-run`` appended (each
benchmark then trains 2 steps on 64 test images), one after another, so the suite is known to start
before a GPU is ever available. ``--plan`` prints the plan and stops. A killed suite started again
skips the rows that finished (``<out>/rows/<id>/done.json``).

    .venv/bin/python bench/full_suite.py [--budget 10m] [--slots 8] [--out bench/results/full]
                                         [--only 'distillation:*'] [--dry-run] [--plan]
"""
from __future__ import annotations

import argparse
import fnmatch
import heapq
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAIN_IMAGES = 50_000
MODELS = ("resnet20", "resnet56", "vgg16", "mobilenetv2")
#: without a GPU the plan is extrapolated with these (see ``--assume-tflops`` / ``--assume-overlap``)
ASSUMED_TFLOPS, ASSUMED_OVERLAP = 12.0, 3.0
#: start-up of one row: interpreter, imports, data, checkpoint, pruning or decomposition, full-test-set evaluations
STARTUP_S = {"structured_pruning": 60, "distillation": 30, "quantization": 45, "lowrank": 120,
             "compact_filters": 90, "auto_compress": 300}


@dataclass
class Row:
    """One process of the suite."""

    id: str
    bench: str
    args: list[str]
    model: str
    epochs: float
    priority: int          # 0: an open issue's goal needs this row; higher: drop first
    work: float = 1.0      # training cost per image relative to ``model``'s plain training
    extra: dict = field(default_factory=dict)

    def command(self, out: Path, dry_run: bool = False) -> list[str]:
        cmd = [sys.executable, str(HERE / f"{self.bench}.py"), *self.args, "--out", str(out)]
        return cmd + ["--dry-run"] if dry_run else cmd


def suite_rows(prune_epochs: int = 30, distill_epochs: int = 20, qat_epochs: int = 6, lowrank_epochs: int = 10,
               compact_epochs: int = 10, search_epochs: int = 10) -> list[Row]:
    """Every row of the full suite, the goals' rows first."""
    rows: list[Row] = []
    for model in ("resnet56", "vgg16"):
        for target in ("2", "3"):
            for method in ("l1", "fpgm", "taylor", "reconstruction", "torch-pruning"):
                rows.append(Row(f"structured_pruning:{model}:{target}x:{method}", "structured_pruning",
                                ["--full", "--models", model, "--targets", target, "--methods", method,
                                 "--ft-epochs", str(prune_epochs)], model, prune_epochs,
                                priority=0 if method in ("l1", "torch-pruning") else 1, work=1 / float(target)))
    for method in ("CE", "KD", "FitNet", "AT", "SP", "RKD", "NST", "PKT", "CRD", "KD+CRD"):
        # student ResNet-20 trained, teacher ResNet-56 forward only (a third of a training step)
        rows.append(Row(f"distillation:{method}", "distillation",
                        ["--full", "--methods", method, "--skip-pruned", "--epochs", str(distill_epochs)],
                        "resnet20", distill_epochs, priority=0,
                        work=1 + model_macs("resnet56") / (3 * model_macs("resnet20"))))
    for model in MODELS:
        # fake quantization of weights and activations roughly doubles a training step
        rows.append(Row(f"quantization:{model}:w4a4-qat", "quantization",
                        ["--qat-full", "--models", model, "--qat-epochs", str(qat_epochs)], model, qat_epochs,
                        priority=0, work=2.0))
    for model in ("vgg16", "resnet56"):
        for target in ("2", "3"):
            rows.append(Row(f"lowrank:{model}:{target}x", "lowrank",
                            ["--full", "--models", model, "--targets", target, "--ft-epochs", str(lowrank_epochs)],
                            model, 2 * lowrank_epochs, priority=2, work=1 / float(target)))  # two rows fine-tuned
            rows.append(Row(f"compact_filters:{model}:{target}x:bsconv", "compact_filters",
                            ["--full", "--models", model, "--targets", target, "--blocks", "bsconv",
                             "--ft-epochs", str(compact_epochs)], model, compact_epochs, priority=2,
                            work=1 / float(target)))
    for model in ("resnet56", "mobilenetv2"):
        for target in ("3", "5"):
            # batch 1 and 64; per batch the joint, three single-family and peers' models, three front points
            # and the recipe's run fine-tuned (at most; a family that cannot reach the target trains nothing)
            rows.append(Row(f"auto_compress:{model}:{target}x", "auto_compress",
                            ["--full", "--models", model, "--targets", target, "--ft-epochs", str(search_epochs),
                             "--families", "joint,prune,lowrank,quant", "--front-points", "3"], model,
                            2 * 9 * search_epochs, priority=3, work=1 / float(target)))
    return rows


@lru_cache(maxsize=None)
def model_macs(name: str) -> int:
    """Forward MACs per 32x32 image of a shared CIFAR-10 model (``netslim.profile``)."""
    import torch

    import netslim
    from netslim import zoo

    return netslim.profile(zoo.get(name, num_classes=10), torch.randn(1, 3, 32, 32), latency=False).macs


# ------------------------------------------------------------------ cost model
@dataclass
class Rates:
    """Seconds per training image of each model with the GPU to itself, and how many processes the GPU
    overlaps before each one slows down (``overlap`` = slots x solo time / time with every slot busy)."""

    seconds_per_image: dict[str, float]
    overlap: float
    source: str

    def row_seconds(self, row: Row, slots: int) -> float:
        """Wall time of ``row`` while ``slots`` processes share the GPU."""
        slowdown = max(1.0, slots / self.overlap)
        train = row.epochs * TRAIN_IMAGES * self.seconds_per_image[row.model] * row.work * slowdown
        return STARTUP_S[row.bench] + train


def extrapolated_rates(tflops: float, overlap: float) -> Rates:
    """Seconds per image from MACs: a training step is ~3 forward passes of 2 FLOPs per MAC."""
    per_image = {m: 6 * model_macs(m) / (tflops * 1e12) for m in MODELS}
    return Rates(per_image, overlap, f"extrapolated, not measured: no GPU here; 6 FLOPs per MAC per training image "
                                     f"at an assumed {tflops:g} TFLOP/s for one process, the GPU assumed to overlap "
                                     f"{overlap:g} processes")


def measured_rates(slots: int, steps: int = 30) -> Rates:
    """Seconds per image of each model measured here, alone; then the heaviest with ``slots`` copies at once."""
    per_image = {m: 1.0 / probe(m, steps) for m in MODELS}
    heavy = max(MODELS, key=lambda m: per_image[m])
    procs = [subprocess.Popen([sys.executable, __file__, "--probe", heavy, "--probe-steps", str(steps)],
                              stdout=subprocess.PIPE, text=True) for _ in range(slots)]
    together = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    overlap = overlap_of(per_image[heavy], together)
    return Rates(per_image, overlap, f"measured here: {steps} training steps of batch 128 per model "
                                     f"(bf16, resident data), {heavy} x {slots} at once for the overlap")


def overlap_of(solo: float, together: list[float]) -> float:
    """How many processes the GPU runs at once without slowing: ``solo`` seconds per image alone, ``together``
    each process's seconds per image with all of them running (1: they only take turns; len: no slowdown)."""
    busy = sum(together) / len(together)
    return min(float(len(together)), max(1.0, len(together) * solo / busy))


def probe(model_name: str, steps: int) -> float:
    """Training images per second of one shared model on this machine's default device."""
    from netslim import data as nsdata
    from netslim import zoo
    from netslim.train import TrainConfig, training_throughput

    model = zoo.get(model_name, weights="shared")
    train = nsdata.get("cifar10", "train", augment=True)
    return training_throughput(model, train, TrainConfig(batch_size=128, lr=1e-4), steps=steps)


# ------------------------------------------------------------------ schedule
@dataclass
class Plan:
    slots: list[list[tuple[str, float, float]]]  # per slot: (row id, start s, estimated s)
    dropped: list[tuple[str, float]]
    makespan: float
    budget: float
    source: str


def lpt(estimates: dict[str, float], slots: int) -> tuple[list[list[tuple[str, float, float]]], float]:
    """Longest-processing-time-first onto ``slots`` workers: each row to the slot that frees first."""
    free = [(0.0, s) for s in range(slots)]
    heapq.heapify(free)
    placed: list[list[tuple[str, float, float]]] = [[] for _ in range(slots)]
    for rid, est in sorted(estimates.items(), key=lambda kv: -kv[1]):
        start, s = heapq.heappop(free)
        placed[s].append((rid, start, est))
        heapq.heappush(free, (start + est, s))
    return placed, max((t for t, _ in free), default=0.0)


def make_plan(rows: list[Row], rates: Rates, slots: int, budget: float) -> Plan:
    """Keep rows in priority order while the longest-first schedule of the kept ones fits ``budget``."""
    estimates = {r.id: rates.row_seconds(r, slots) for r in rows}
    kept: dict[str, float] = {}
    dropped = []
    for r in sorted(rows, key=lambda r: (r.priority, rows.index(r))):
        trial = {**kept, r.id: estimates[r.id]}
        if lpt(trial, slots)[1] <= budget:
            kept = trial
        else:
            dropped.append((r.id, estimates[r.id]))
    placed, makespan = lpt(kept, slots)
    return Plan(placed, dropped, makespan, budget, rates.source)


def format_plan(plan: Plan, rows: dict[str, Row]) -> str:
    lines = [f"plan: {sum(len(s) for s in plan.slots)} rows in {len(plan.slots)} slots, estimated "
             f"{plan.makespan / 60:.1f} min of a {plan.budget / 60:.1f} min budget", f"  rates: {plan.source}"]
    for i, slot in enumerate(plan.slots):
        for rid, start, est in slot:
            lines.append(f"  slot {i:2d}  start {start / 60:5.1f} min  est {est / 60:5.1f} min  {rid} "
                         f"({rows[rid].epochs:g} epochs)")
    for rid, est in plan.dropped:
        lines.append(f"  dropped: {rid} (est {est / 60:.1f} min; the budget cannot hold it)")
    return "\n".join(lines)


# ------------------------------------------------------------------ running
def run_rows(order: list[Row], out: Path, slots: int, deadline: float, dry_run: bool, log,
             row_limit: float = float("inf")) -> dict[str, dict]:
    """Run ``order`` (already longest-first) ``slots`` at a time; a row still running at ``deadline``, or
    after ``row_limit`` seconds, is killed."""
    results: dict[str, dict] = {}
    pending = list(order)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    while pending or running:
        while pending and len(running) < slots:
            row = pending.pop(0)
            row_dir = out / "rows" / row.id.replace(":", "_")
            if (row_dir / "done.json").is_file():
                results[row.id] = json.loads((row_dir / "done.json").read_text()) | {"skipped": "finished earlier"}
                log(f"  {row.id}: finished in an earlier run, kept")
                continue
            row_dir.mkdir(parents=True, exist_ok=True)
            with open(row_dir / "log.txt", "w") as stream:
                proc = subprocess.Popen(row.command(row_dir, dry_run), stdout=stream, stderr=subprocess.STDOUT,
                                        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            running[row.id] = (proc, time.time(), row_dir)
            log(f"  start {row.id}")
        time.sleep(0.5)
        for rid, (proc, started, row_dir) in list(running.items()):
            if proc.poll() is None and time.time() < min(deadline, started + row_limit):
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            wall = time.time() - started
            done = {"id": rid, "rc": proc.returncode, "wall_s": round(wall, 1), "dir": str(row_dir)}
            if proc.returncode == 0:
                (row_dir / "done.json").write_text(json.dumps(done))
                log(f"  done  {rid} in {wall:.0f} s")
            else:
                tail = (row_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
                log(f"  FAIL  {rid} (exit {proc.returncode}, {wall:.0f} s): {' | '.join(tail)}")
            results[rid] = done
            del running[rid]
    return results


def merge(results: dict[str, dict], rows: dict[str, Row], out: Path, form: str, device: str) -> list[Path]:
    """One JSON per benchmark from its rows' slices; identical rows (the dense model) kept once."""
    from netslim.report import write_result

    by_bench: dict[str, list[str]] = {}
    for rid, res in results.items():
        if res.get("rc") == 0:
            by_bench.setdefault(rows[rid].bench, []).append(rid)
    written = []
    for bench, ids in sorted(by_bench.items()):
        merged, seen, details = [], set(), {"form": form, "rows": {}}
        for rid in sorted(ids):
            doc = json.loads((Path(results[rid]["dir"]) / f"{bench}.json").read_text())
            details["rows"][rid] = {"command": doc["command"], "wall_s": results[rid]["wall_s"],
                                    "details": doc.get("details", {})}
            for r in doc["rows"]:
                key = json.dumps({k: r[k] for k in ("model", "method", "tool", "setting")}, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    merged.append(r)
        details["form_text"] = next(iter(details["rows"].values()))["details"].get("form_text", "")
        written.append(write_result(bench, merged, out, device=device, details=details,
                                    command=" ".join(["bench/full_suite.py", *sys.argv[1:]])))
    return written


def parse_budget(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise SystemExit(f"error: --budget {text!r} is not a duration such as 600, 600s, 10m or 1h") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="10m", help="wall-clock budget of the whole suite (e.g. 10m)")
    p.add_argument("--slots", type=int, default=8, help="processes sharing the GPU at once")
    p.add_argument("--out", default="bench/results/full")
    p.add_argument("--only", default="*", help="comma-separated glob patterns of row ids (e.g. 'distillation:*')")
    p.add_argument("--dry-run", action="store_true", help="every row's command on the CPU with a few steps")
    p.add_argument("--plan", action="store_true", help="print the plan and stop")
    p.add_argument("--assume-tflops", type=float, default=ASSUMED_TFLOPS,
                   help="without a GPU: training TFLOP/s assumed for one process (plan only)")
    p.add_argument("--assume-overlap", type=float, default=ASSUMED_OVERLAP,
                   help="without a GPU: processes the GPU is assumed to run at once without slowing (plan only)")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=30, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(1.0 / probe(args.probe, args.probe_steps))
        return 0
    if args.slots < 1:
        raise SystemExit(f"error: --slots must be at least 1, got {args.slots}")
    budget = parse_budget(args.budget)
    all_rows = suite_rows()
    patterns = [s.strip() for s in args.only.split(",") if s.strip()]
    rows = [r for r in all_rows if any(fnmatch.fnmatchcase(r.id, pat) for pat in patterns)]
    if not rows:
        raise SystemExit(f"error: --only {args.only!r} matches no row; rows are e.g. {', '.join(r.id for r in all_rows[:3])}")
    by_id = {r.id: r for r in all_rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / ("dry_run.log" if args.dry_run else "suite.log")

    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    rates = (measured_rates(args.slots) if gpu and not args.plan
             else extrapolated_rates(args.assume_tflops, args.assume_overlap))
    plan = make_plan(rows, rates, args.slots, budget)
    log(format_plan(plan, by_id))
    plan_doc = {"plan": asdict(plan), "rows": {r.id: asdict(r) for r in rows}, "gpu": gpu}
    (out / "plan.json").write_text(json.dumps(plan_doc, indent=1))
    if args.plan:
        return 0
    from netslim import data as nsdata

    nsdata.load_raw("cifar10")  # decode the JPEGs once, before the rows read the cache
    if args.dry_run:
        order, slots, deadline = rows, 1, float("inf")
        log(f"dry run: {len(order)} rows one after another on the CPU, 2 training steps each")
    else:
        order = [by_id[rid] for rid, _, est in sorted((x for s in plan.slots for x in s), key=lambda x: -x[2])]
        slots, deadline = args.slots, time.time() + budget
    started = time.time()
    results = run_rows(order, out, slots, deadline, args.dry_run, log, row_limit=900 if args.dry_run else float("inf"))
    device = "cuda" if gpu else "cpu"
    written = merge(results, by_id, out, "dry-run" if args.dry_run else "full", device)
    failed = [rid for rid, r in results.items() if r.get("rc") != 0]
    summary = {"rows": results, "dropped": [d[0] for d in plan.dropped], "wall_s": round(time.time() - started, 1),
               "estimated_s": round(plan.makespan, 1), "written": [str(w) for w in written], "failed": failed}
    (out / ("dry_run.json" if args.dry_run else "suite.json")).write_text(json.dumps(summary, indent=1))
    log(f"{'dry run' if args.dry_run else 'suite'}: {len(results) - len(failed)} of {len(results)} rows passed in "
        f"{summary['wall_s'] / 60:.1f} min (estimate {plan.makespan / 60:.1f} min); failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
