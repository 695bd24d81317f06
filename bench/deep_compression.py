"""Benchmark: Deep Compression (Han et al. ICLR 2016) on LeNet-300-100 and LeNet-5, against the paper, and the
storage frontier past it (sparse variational dropout, soft weight-sharing, per-layer precision).

Runs ``recipes/deep_compression_<model>.yaml``, ``recipes/frontier_<model>.yaml`` and
``recipes/frontier_accurate_lenet5.yaml`` and ``recipes/soft_sharing_lenet300.yaml`` through the public pipeline
(the same code as ``netslim compress``), then checks and measures what the issues ask for:

* stored size: the ``.nsz`` file vs. the fp32 parameters (LeNet-300-100: 1,066,440 bytes);
  the paper: 40x at 1.58 % error (LeNet-300-100), 39x at 0.74 % (LeNet-5), from 1.64 % / 0.80 %;
* per layer, each coded stream vs. its Shannon bound;
* the round trip: ``encode.load`` gives outputs identical to the pre-encode model on the whole
  MNIST test set; a truncated and a bit-flipped file are refused with a clear error;
* wall time of every stage; CPU latency sparse (CSR) vs. dense per LeNet-300-100 layer.

    .venv/bin/python bench/deep_compression.py [--models lenet300,lenet5] [--recipes deep_compression,frontier,...]
                                               [--runs runs/bench]

The frontier's goals (issue 17): LeNet-5 at least 420x at <= 1.0 % error and 200x at <= 0.80 %; LeNet-300-100 at
least 120x at <= 1.8 %. The literature's rows (ratio, error) are in ``LITERATURE`` for the README's table.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
from pathlib import Path

import torch

import netslim
from netslim import NetslimError, encode, zoo
from netslim import data as nsdata
from netslim.pipeline import load_recipe, restore_stage_model, run_recipe
from netslim.prune import magnitude_prune_
from netslim.prune.sparse_exec import sparse_vs_dense
from netslim.report import write_result
from netslim.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"lenet300": {"ratio": 40, "error": 0.0164, "paper_error_after": 0.0158},
         "lenet5": {"ratio": 39, "error": 0.0080, "paper_error_after": 0.0074}}
# (ratio, error) goals of the frontier recipes: every pair is a goal of its own
FRONTIER_GOALS = {"lenet300": [(120, 0.018)], "lenet5": [(420, 0.010), (200, 0.0080)]}
LITERATURE = {  # compression ratio, test error (issue 17's table)
    "Deep Compression (Han 2016)": {"lenet300": (40, 0.0158), "lenet5": (39, 0.0074)},
    "Dynamic network surgery (Guo 2016)": {"lenet300": (56, 0.0199), "lenet5": (108, 0.0091)},
    "Soft weight-sharing (Ullrich 2017)": {"lenet300": (64, 0.0194), "lenet5": (162, 0.0097)},
    "Sparse VD (Molchanov 2017), parameter count ratio": {"lenet300": (68, 0.0192), "lenet5": (280, 0.0075)},
    "Bayesian compression, group horseshoe (Louizos 2017)": {"lenet5": (419, 0.010)},
}
METHODS = {"deep_compression": "deep compression (prune AGP + k-means + .nsz)",
           "frontier": "storage frontier (sparse variational dropout + per-layer k-means + .nsz)",
           "frontier_accurate": "storage frontier, accuracy point (milder sparse variational dropout + per-layer "
                                "k-means + .nsz)",
           "soft_sharing": "soft weight-sharing (Gaussian-mixture prior retraining + .nsz)"}


def identical_outputs(a: torch.nn.Module, b: torch.nn.Module, data) -> bool:
    loader = torch.utils.data.DataLoader(data, batch_size=1000)
    a.eval(), b.eval()
    with torch.no_grad():
        return all(torch.equal(a(x), b(x)) for x, _ in loader)


def corruption_checks(nsz: Path) -> dict[str, str]:
    """Truncate and bit-flip copies of the file; each must fail with a NetslimError."""
    results = {}
    blob = nsz.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"truncated": blob[: len(blob) // 2], "bit_flipped": bytearray(blob),
                    "header_bit_flipped": bytearray(blob)}
        variants["bit_flipped"][len(blob) * 2 // 3] ^= 0x10
        variants["header_bit_flipped"][20] ^= 0x01
        for name, data in variants.items():
            path = Path(tmp) / f"{name}.nsz"
            path.write_bytes(bytes(data))
            try:
                encode.load(path)
                results[name] = "LOADED (bad)"
            except NetslimError as exc:
                results[name] = f"refused: {exc}"
    return results


def goal_text(kind: str, name: str, ratio: float, error: float) -> str:
    if kind == "deep_compression":
        paper = PAPER[name]
        return (f"compression {ratio:.1f}x (paper {paper['ratio']}x), error {100 * error:.2f}% "
                f"(goal <= {100 * paper['error']:.2f}%; paper reached {100 * paper['paper_error_after']:.2f}%); "
                f"goal {'MET' if ratio >= paper['ratio'] and error <= paper['error'] else 'NOT met'}")
    parts = [f"compression {ratio:.1f}x at error {100 * error:.2f}%"]
    for goal_ratio, goal_error in FRONTIER_GOALS[name]:
        met = ratio >= goal_ratio and error <= goal_error
        parts.append(f"goal >= {goal_ratio}x at <= {100 * goal_error:.2f}%: {'MET' if met else 'NOT met'}")
    return "; ".join(parts)


def run_model(name: str, runs: Path, kind: str = "deep_compression") -> tuple[list[dict], dict]:
    recipe = load_recipe(ROOT / "recipes" / f"{kind}_{name}.yaml")
    run_dir = runs / f"{kind}_{name}"
    metrics = run_recipe(recipe, run_dir, progress=False)
    nsz = run_dir / "stages" / f"{len(recipe.stages) - 1:02d}-encode" / "model.nsz"
    test = nsdata.get("mnist", "test")

    original = zoo.get(name, weights="shared").eval()
    # the model the encode stage evaluated: before it for Deep Compression; the frontier's encode stage folds dead
    # units and rounds to float16 first, so its own output (the decoded model it verified) is the reference
    reference_stage = len(recipe.stages) - (2 if kind == "deep_compression" else 1)
    pre_encode = restore_stage_model(zoo.get(name, weights="shared"), recipe, run_dir, reference_stage)
    decoded = encode.load(nsz).eval()
    same = identical_outputs(pre_encode, decoded, test)
    top1 = evaluate(decoded, test, device="cpu")["top1"]
    base_top1 = evaluate(original, test, device="cpu")["top1"]
    dense_bytes = sum(p.numel() * 4 for p in original.parameters())
    size = nsz.stat().st_size
    ratio = dense_bytes / size

    with tempfile.TemporaryDirectory() as tmp:
        reports = encode.save(copy.deepcopy(decoded), Path(tmp) / "again.nsz", arch=name)
    layers = []
    for r in reports:
        v_over, i_over = r.overhead()
        layers.append({"tensor": r.name, "encoding": r.encoding, "elements": r.numel, "nonzeros": r.nonzeros,
                       "bytes": r.total_bytes, "bits_per_nonzero": r.bits_per_nonzero,
                       "value_bound_bits_per_nonzero": r.value_bound_bits / max(r.nonzeros, 1),
                       "bits_per_index": r.bits_per_index,
                       "index_bound_bits_per_nonzero": r.index_bound_bits / max(r.nonzeros, 1),
                       "value_overhead": v_over, "index_overhead": i_over,
                       "within_5pct": all(o is None or o <= 0.05 for o in (v_over, i_over)),
                       "coders": [r.value_coder, r.index_coder],
                       **{k: getattr(r, k) for k in ("codebook_bits", "structure_bits") if hasattr(r, k)},
                       **r.detail})

    example = test[0][0][None]
    prof_c = netslim.profile(decoded, example, batch_sizes=(1, 64), repeats=100)
    prof_o = netslim.profile(original, example, batch_sizes=(1, 64), repeats=100)
    error = 1 - top1
    row_base = dict(model=name, dataset="mnist", method="dense baseline", tool="netslim", setting={},
                    top1=base_top1, baseline_top1=base_top1, params=prof_o.params, macs=prof_o.macs,
                    size_bytes=dense_bytes, latency_ms=prof_o.latency_ms, baseline_latency_ms=prof_o.latency_ms,
                    notes="fp32 parameters as stored densely")
    row = dict(model=name, dataset="mnist", method=METHODS[kind],
               tool="netslim", setting={s.name: s.options for s in recipe.stages},
               top1=top1, baseline_top1=base_top1, params=prof_c.nonzero_params, macs=prof_c.effective_macs,
               size_bytes=size, latency_ms=prof_c.latency_ms, baseline_latency_ms=prof_o.latency_ms,
               notes=(goal_text(kind, name, ratio, error) + f"; decoded outputs identical on all 10,000 test images: "
                      f"{same}; latency is the decoded model run with dense kernels"))
    nonzeros = sum(r.nonzeros for r in reports)
    details = {"compression_ratio": ratio, "test_error": error, "identical_outputs_full_test_set": same,
               "stored_bytes": size, "nonzeros": nonzeros, "bits_per_nonzero_all_in": 8 * size / max(nonzeros, 1),
               "all_streams_within_5pct": all(layer["within_5pct"] for layer in layers),
               "stage_wall_s": {f"{m['index'] + 1}-{m['stage']}": m["wall_s"] for m in metrics[1:]},
               "stage_top1": {f"{m['index'] + 1}-{m['stage']}": m["top1"] for m in metrics[1:]},
               "layers": layers, "corruption": corruption_checks(nsz),
               "report": str(run_dir / "report.md")}
    if name == "lenet300" and kind == "deep_compression":
        details["sparse_vs_dense_cpu"] = [
            {"layer": t.layer, "shape": list(t.shape), "sparsity": t.sparsity, "batch": t.batch,
             "dense_ms": t.dense_ms, "sparse_csr_ms": t.sparse_ms, "speedup": t.speedup}
            for t in sparse_vs_dense(copy.deepcopy(pre_encode))]
        # every layer of LeNet-300-100 at 90 %, 95 % and 99 % sparsity (per-layer magnitude)
        sweep = []
        for target in (0.90, 0.95, 0.99):
            pruned = zoo.get(name, weights="shared")
            magnitude_prune_(pruned, target, scope="uniform")
            sweep += [{"layer": t.layer, "shape": list(t.shape), "sparsity": t.sparsity, "batch": t.batch,
                       "dense_ms": t.dense_ms, "sparse_csr_ms": t.sparse_ms, "speedup": t.speedup}
                      for t in sparse_vs_dense(pruned)]
        details["sparse_vs_dense_cpu_by_sparsity"] = sweep
    plot = run_dir / "stages" / "00-prune" / "sensitivity.png"
    if plot.is_file() and kind == "deep_compression":  # keep the sensitivity picture beside the results
        shutil.copyfile(plot, ROOT / "bench" / "results" / f"deep_compression_{name}_sensitivity.png")
        details["sensitivity_plot"] = f"bench/results/deep_compression_{name}_sensitivity.png"
    print(f"{kind} {name}: {ratio:.1f}x, error {100 * error:.2f}%, identical outputs: {same}")
    return [row_base, row], details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--recipes", default="deep_compression,frontier,frontier_accurate,soft_sharing",
                        help="recipe families to run: deep_compression, frontier, frontier_accurate, soft_sharing "
                             "(comma-separated; "
                             "recipes/<family>_<model>.yaml, skipped where there is none)")
    parser.add_argument("--runs", default="runs/bench", help="run directories (resumable)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--fresh", action="store_true", help="discard earlier run directories")
    args = parser.parse_args()
    runs = Path(args.runs)
    if args.fresh and runs.exists():
        shutil.rmtree(runs)
    torch.set_num_threads(torch.get_num_threads())
    kinds = [k for k in args.recipes.split(",") if k]
    bad = [k for k in kinds if k not in METHODS]
    if bad:
        raise SystemExit(f"unknown recipe family {bad[0]!r}; valid: {', '.join(METHODS)}")
    out = Path(args.out) / "deep_compression.json"
    rows, details = merge_base(out, kinds, args.models.split(","))
    for name in args.models.split(","):
        for kind in kinds:
            if not (ROOT / "recipes" / f"{kind}_{name}.yaml").is_file():
                continue  # the accuracy point exists for LeNet-5 only
            r, d = run_model(name, runs, kind)
            rows = [row for row in rows if not (row["model"] == name and row["method"] in (r[0]["method"], r[1]["method"]))]
            rows += r  # one dense baseline per model: the latest
            details[name if kind == "deep_compression" else f"{kind}_{name}"] = d
    details["form"] = "full"  # the LeNets need no reduced form: whole recipes, the full test set, on the CPU
    details["form_text"] = ("full form on the CPU: every recipe run whole from the shared checkpoint, error on all "
                            "10,000 MNIST test images")
    details["literature"] = {k: {m: {"ratio": v[0], "error": v[1]} for m, v in d.items()} for k, d in LITERATURE.items()}
    print(write_result("deep_compression", rows, args.out, details=details))


def merge_base(out: Path, kinds: list[str], models: list[str]) -> tuple[list[dict], dict]:
    """Rows and details of an earlier result for what this run does not redo (one file holds both recipe families)."""
    import json

    if not out.is_file():
        return [], {}
    old = json.loads(out.read_text())
    redo = {METHODS[k] for k in kinds}
    rows = [r for r in old.get("rows", []) if not (r["model"] in models and r["method"] in redo)]
    return rows, dict(old.get("details", {}))


if __name__ == "__main__":
    main()
