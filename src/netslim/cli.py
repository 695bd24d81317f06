"""``netslim`` command line: a thin layer over the Python API.

A user mistake prints one line ``netslim: error: ...`` and exits with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import NetslimError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"netslim: error: {message} (see '{self.prog} --help')\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,3,32,32, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _device(text: str) -> str:
    from .train import check_device

    try:
        check_device(text)
    except NetslimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _check_output_file(out: Path) -> None:
    """``out`` can be written as a file: not a directory, its folder exists or can be made, and is writable."""
    import os

    if out.is_dir():
        raise NetslimError(f"--out {out} is a directory; name the state_dict file to write")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NetslimError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise NetslimError(f"--out {out} is not writable")


def _model(args) -> "torch.nn.Module":
    from . import zoo

    if args.weights and str(args.weights).endswith(".nsz"):
        from . import encode

        return encode.load(args.weights, None if args.model == "auto" else zoo.get(args.model, None, args.num_classes))
    return zoo.get(args.model, args.weights, args.num_classes)


def _add_model_args(p: argparse.ArgumentParser, weights_required: bool = False) -> None:
    p.add_argument("--model", required=True,
                   help="zoo name (lenet5, resnet56, ...), torchvision:<name>, timm:<name>, path/to/file.py:factory or "
                        "package.module:factory (loading your file runs its code)")
    p.add_argument("--weights", required=weights_required,
                   help="state_dict file to load (strict), a .nsz file, or 'shared' for ../shared/models")
    p.add_argument("--num-classes", type=_positive_int, default=None)


def _profile_model(args) -> tuple["torch.nn.Module", tuple[int, ...]]:
    """The model to profile and its input shape: a reference (zoo name, torchvision:/timm: name, factory) with
    optional --weights, or a file written by netslim.save (.pt, .nsz, .nsq), which needs --input."""
    from . import zoo

    if Path(args.model).suffix.lower() in (".pt", ".pth", ".nsz", ".nsq") or (
            Path(args.model).is_file() and Path(args.model).suffix.lower() != ".py"):
        import netslim

        if args.weights:
            raise NetslimError(f"--weights does not apply to the model file {args.model}: the file holds its weights")
        if not args.input:
            raise NetslimError(f"give the input shape of the model file {args.model} with --input, "
                               "e.g. --input 1,3,32,32")
        return netslim.load(args.model), args.input
    model = _model(args)
    shape = args.input or zoo.spec(args.model).input_size
    if not shape:
        raise NetslimError(f"{args.model} has no default input shape; give one with --input, e.g. --input 1,3,224,224")
    return model, shape


def _write_json(doc: dict, where: str) -> None:
    """``--json`` alone prints ``doc``; ``--json PATH`` writes it to PATH."""
    if where == "-":
        print(json.dumps(doc, indent=2))
        return
    from .io import save_json

    if Path(where).is_dir():
        raise NetslimError(f"--json {where} is a directory; name the JSON file to write")
    save_json(doc, where)


def cmd_profile_compare(args, model, shape) -> int:
    import torch

    import netslim
    from .profile import compare_breakdown

    for flag, given in (("--sparse", args.sparse), ("--totals", args.totals), ("--no-latency", args.no_latency),
                        ("--batch-sizes", args.batch_sizes is not None)):
        if given:
            raise NetslimError(f"{flag} does not combine with --compare; --compare takes --runtime, --batch-size, "
                               "--threads, --repeats, --top and --json")
    compressed = netslim.load(args.compare)
    cmp = compare_breakdown(model, compressed, torch.randn(*shape), runtime=args.runtime or "torch",
                            batch=args.batch_size or 1, threads=args.threads or 1, repeats=args.repeats or 20)
    top = args.top or 5
    if args.json:
        _write_json({"model": args.model, "compressed": args.compare, "input_shape": list(shape),
                     **cmp.to_dict(top)}, args.json)
    if args.json != "-":
        print(f"{args.model} vs. {args.compare}: time per layer, {cmp.runtime}, batch {cmp.batch}, "
              f"{cmp.threads} thread(s)\n")
        print(cmp.markdown(top))
        if args.json:
            print(f"\nwrote {args.json}")
    return 0


def _runtime_list(text: str) -> list[str]:
    from .errors import unknown_choice
    from .profile.runtimes import RUNTIMES

    chosen = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in chosen if r not in RUNTIMES] or ([] if chosen else [text])
    if bad:
        raise unknown_choice("runtime", bad[0], RUNTIMES)
    return chosen


def cmd_profile_runtimes(args, model, shape) -> int:
    """``--runtimes``: the model (and --compare's compressed form, side by side) timed in each runtime."""
    import torch

    import netslim
    from .profile.runtimes import Setting, time_runtimes

    for flag, given in (("--sparse", args.sparse), ("--totals", args.totals), ("--no-latency", args.no_latency),
                        ("--runtime", args.runtime is not None), ("--batch-size", args.batch_size is not None),
                        ("--top", args.top is not None)):
        if given:
            raise NetslimError(f"{flag} does not combine with --runtimes; --runtimes takes --batch-sizes, --threads, "
                               "--repeats, --compare and --json")
    models = {args.model: model}
    if args.compare:
        models[args.compare] = netslim.load(args.compare)
    settings = [Setting(r, b, args.threads or 1) for r in _runtime_list(args.runtimes)
                for b in (args.batch_sizes or (1,))]
    timed = time_runtimes(models, torch.randn(*shape), settings, repeats=args.repeats or 20)
    names = list(models)
    rows = []
    for setting in settings:
        row = {"runtime": setting.runtime, "batch": setting.batch, "threads": setting.threads}
        for name in names:
            row[name] = {"ms": timed[name][setting.key].ms, "layout": timed[name][setting.key].layout}
        if len(names) == 2:
            row["speedup"] = row[names[0]]["ms"] / row[names[1]]["ms"]
        rows.append(row)
    if args.json:
        _write_json({"model": args.model, "compressed": args.compare, "input_shape": list(shape), "rows": rows},
                    args.json)
    if args.json != "-":
        print(f"{' vs. '.join(names)}: median ms per forward, {args.threads or 1} thread(s)\n")
        head = f"{'runtime':<9}{'batch':>6}" + "".join(f"{n[-22:]:>24}" for n in names)
        print(head + ("   speed-up" if len(names) == 2 else ""))
        for row in rows:
            line = f"{row['runtime']:<9}{row['batch']:>6}" + "".join(f"{row[n]['ms']:>24.3f}" for n in names)
            print(line + (f"{row['speedup']:>10.2f}x" if len(names) == 2 else ""))
        for batch in dict.fromkeys(r["batch"] for r in rows):
            best = min((r for r in rows if r["batch"] == batch), key=lambda r: r[names[-1]]["ms"])
            print(f"fastest at batch {batch}: {best['runtime']} ({best[names[-1]]['ms']:.3f} ms)")
    return 0


def cmd_profile(args) -> int:
    import torch

    from .profile import profile

    model, shape = _profile_model(args)
    if args.runtimes:
        return cmd_profile_runtimes(args, model, shape)
    if args.compare:
        return cmd_profile_compare(args, model, shape)
    given = [f for f, v in (("--runtime", args.runtime), ("--batch-size", args.batch_size), ("--top", args.top),
                            ("--repeats", args.repeats)) if v is not None]
    if given:
        raise NetslimError(f"{', '.join(given)} apply to --compare COMPRESSED only")
    args.batch_sizes = args.batch_sizes or (1,)
    try:
        prof = profile(model, torch.randn(*shape), latency=not args.no_latency, batch_sizes=args.batch_sizes,
                       threads=args.threads)
    except RuntimeError as exc:
        raise NetslimError(f"{args.model} cannot run on input {tuple(shape)}: {str(exc).splitlines()[0]}") from None
    sparse_rows = _sparse_timings(model, args.batch_sizes) if args.sparse else []
    if args.json:
        doc = {"model": args.model, **prof.to_dict(layers=not args.totals)}
        if args.sparse:
            doc["sparse_vs_dense"] = [vars(r) | {"speedup": r.speedup} for r in sparse_rows]
        _write_json(doc, args.json)
    if args.json != "-":
        print(f"{args.model} on input {tuple(shape)}")
        print(prof.table(layers=not args.totals))
        if args.sparse:
            print("\nlinear layers, dense vs. sparse CSR kernels (median ms):")
            print(f"{'layer':<24}{'sparsity':>10}{'batch':>7}{'dense':>10}{'sparse':>10}{'speed-up':>10}")
            for r in sparse_rows:
                print(f"{r.layer:<24}{r.sparsity:>10.1%}{r.batch:>7}{r.dense_ms:>10.4f}{r.sparse_ms:>10.4f}"
                      f"{r.speedup:>9.2f}x")
    return 0


def _sparse_timings(model, batch_sizes):
    from .prune.sparse_exec import sparse_vs_dense
    from .surgery import safe_deepcopy

    return sparse_vs_dense(safe_deepcopy(model), tuple(batch_sizes), repeats=50)


def cmd_evaluate(args) -> int:
    from . import data as nsdata
    from .train import evaluate

    model = _model(args)
    ds = nsdata.get(args.data, "test", args.data_root)
    if args.limit and args.limit < len(ds):
        import torch
        from torch.utils.data import Subset

        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))  # test sets come sorted by class
        ds = Subset(ds, sorted(order[: args.limit].tolist()))
    try:
        res = evaluate(model, ds, device=args.device, batch_size=args.batch_size, progress=not args.json)
    except RuntimeError as exc:
        shape = tuple(ds[0][0].shape) if len(ds) else "?"
        raise NetslimError(f"{args.model} cannot run on {args.data} images of shape {shape}: the model's input shape "
                           f"does not fit the data ({(str(exc).splitlines() or [''])[0][:160]})") from None
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, **res}))
    else:
        print(f"{args.model} on {args.data} test ({res['n']:,} images): top-1 {100 * res['top1']:.2f}%  "
              f"top-5 {100 * res['top5']:.2f}%  loss {res['loss']:.4f}")
    return 0


def cmd_train(args) -> int:
    from . import data as nsdata
    from .io import save_torch
    from .train import TrainConfig, evaluate, fit, init_distributed, rank

    out = Path(args.out)
    _check_output_file(out)
    init_distributed()
    model = _model(args)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                      weight_decay=args.weight_decay, seed=args.seed, amp=not args.no_amp,
                      max_steps_per_epoch=args.max_steps)
    fit(model, nsdata.get(args.data, "train", args.data_root, augment=True), cfg, device=args.device,
        checkpoint_path=out.with_name(out.name + ".train.ckpt"))
    res = evaluate(model, nsdata.get(args.data, "test", args.data_root), device=args.device)
    if rank() == 0:
        save_torch(model.state_dict(), out)
        print(f"saved {out}; top-1 {100 * res['top1']:.2f}% on {args.data} test")
    return 0


def cmd_compress(args) -> int:
    from .pipeline import load_recipe, run_recipe
    from .pipeline.report import stage_table

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    if out.exists() and not out.is_dir():
        raise NetslimError(f"--out {out} is a file; name a run directory")
    metrics = run_recipe(recipe, out, restart=args.restart, progress=not args.no_progress)
    print(stage_table(metrics))
    print(f"\nrun directory: {out} (report.md, metrics.json)")
    return 0


def cmd_search(args) -> int:
    from .pipeline.recipe import Recipe
    from .pipeline.runner import inputs_from_recipe
    from .search import SearchConfig, auto_compress
    from .train import check_device

    cfg = SearchConfig(target=args.target, device=args.device, threads=args.threads, batch=args.batch,
                       families=args.families.split(",") if args.families else SearchConfig().families,
                       max_drop=args.max_drop, trials=args.trials, time_budget=args.time_budget,
                       strategy=args.strategy, held_out=args.held_out, storage=args.storage, seed=args.seed,
                       exclude=args.exclude.split(",") if args.exclude else [])
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NetslimError(f"--out {out} is a file; name a run directory")
    recipe = Recipe(model=args.model, data=args.data, stages=[], weights=args.weights, data_root=args.data_root)
    inputs = inputs_from_recipe(recipe, check_device("cpu"))
    result = auto_compress(inputs.original, inputs.example_input, inputs.data.train_plain, cfg, out=out,
                           refs={"model": args.model, "weights": args.weights, "data": args.data,
                                 "data_root": args.data_root}, progress=not args.no_progress)
    chosen = result.summary["chosen"]
    print((out / "front.md").read_text())
    where = (f"{chosen['measured_ms']:.3f} ms measured on {args.device} ({chosen['speedup_measured']:.2f}x faster than "
             f"dense; lookup table predicted {chosen.get('predicted_ms') or 0:.3f} ms)" if chosen.get("measured_ms")
             else f"{chosen['macs']:,} MACs, {chosen['size_bytes']:,} stored bytes")
    print(f"chosen: estimated top-1 {100 * chosen['top1']:.2f}% (dense {100 * result.dense.top1:.2f}%, held-out "
          f"training slice), {where}")
    print(f"recipe: {result.recipe} (netslim compress {result.recipe} fine-tunes and exports it)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .pipeline.report import ratio_table, stage_table

    out = Path(args.out)
    metrics = run_demo(out, restart=args.restart, progress=not args.no_progress)
    print("\nstages:\n" + stage_table(metrics))
    print("\nsix ratios, final model vs. original:\n" + ratio_table(metrics[0], metrics[-1]))
    onnx = out / "model.onnx"
    print(f"\nrun directory: {out} (report.md, metrics.json" + (f", {onnx.name}: the deployable file)" if onnx.is_file()
                                                               else ")"))
    return 0


def cmd_stages(args) -> int:
    import dataclasses

    from .pipeline import get_stage, stage_names

    for name in stage_names():
        sdef = get_stage(name)
        keys = ", ".join(f.name for f in dataclasses.fields(sdef.config) if not f.metadata.get("deprecated"))
        print(f"{name:<10} {sdef.doc}\n{'':<10} keys: {keys}")
    return 0


def cmd_bench_report(args) -> int:
    from .report import bench_report

    md, plot = bench_report(args.results, args.out)
    print(md.read_text())
    print(f"wrote {md}" + (f" and {plot}" if plot else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netslim", description="Make trained CNNs smaller and faster, and measure it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("profile", help="per-layer params, MACs, size, latency, energy; "
                                       "--compare: time per layer against a compressed form")
    _add_model_args(p)
    p.add_argument("--input", type=_int_list, help="input shape, e.g. 1,3,32,32 (default: the model's)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="machine-readable output (to PATH when given)")
    p.add_argument("--totals", action="store_true", help="totals only, no per-layer table")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="latency batch sizes (default 1)")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--sparse", action="store_true", help="also time linear layers with sparse CSR kernels")
    p.add_argument("--compare", metavar="COMPRESSED", default=None,
                   help="a compressed form of the model (a netslim.save file): time per layer of both, matched by name")
    p.add_argument("--runtime", choices=("torch", "ort"), default=None,
                   help="with --compare: torch (eager, torch.profiler) or ort (onnxruntime's node profile); "
                        "default torch")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="with --compare: batch size (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="with --compare: profiled runs (default 20)")
    p.add_argument("--top", type=_positive_int, default=None,
                   help="with --compare: flag the K slowest layers and the K furthest below their MAC cut (default 5)")
    p.add_argument("--runtimes", default=None, metavar="LIST",
                   help="time the model (and --compare's, side by side) in these runtimes: eager, compile, ort "
                        "(comma-separated), at --batch-sizes with --threads")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("evaluate", help="top-1 / top-5 on a dataset's test split")
    _add_model_args(p, weights_required=True)
    p.add_argument("--data", required=True, help="mnist, fashion-mnist, cifar10, cifar100 or an ImageFolder path")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate a fixed random subset of N test images")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N or mps (default: cuda if present)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train or fine-tune a model (torchrun for several processes)")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True, help="state_dict file to write (resumes from OUT.train.ckpt)")
    p.add_argument("--epochs", type=_nonneg_int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=_positive_int, default=None, help="steps per epoch cap")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N or mps (default: cuda if present)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compress", help="run a YAML recipe of stages into a run directory")
    p.add_argument("recipe")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe name>)")
    p.add_argument("--restart", action="store_true", help="discard an existing run directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("search", help="search every family per layer for a latency / size budget on a device")
    p.add_argument("--model", required=True, help="zoo name, torchvision:/timm:<name>, file.py:factory, pkg.mod:factory")
    p.add_argument("--weights", default=None, help="state_dict path or 'shared'")
    p.add_argument("--data", required=True, help="dataset name, ImageFolder path or file.py:factory")
    p.add_argument("--data-root", default=None)
    p.add_argument("--target", default="latency:3", help="latency:N (N x faster, measured), size:N or macs:N")
    p.add_argument("--device", default="ort-cpu", help="ort-cpu, torch-cpu or torch-cuda: where latency is measured")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-drop", type=float, default=1.0, help="points of top-1 (held-out training slice) to lose at most")
    p.add_argument("--time-budget", default=None, help="wall-clock limit of this run, e.g. 30m, 2h, 90s")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--strategy", default="nsga2", help="nsga2 (Optuna) or greedy (NetAdapt-style baseline)")
    p.add_argument("--families", default=None, help="comma-separated: prune,lowrank,compact,quant (default all)")
    p.add_argument("--exclude", default=None, help="comma-separated layers to leave alone")
    p.add_argument("--held-out", type=int, default=1000, help="training images set aside to estimate top-1")
    p.add_argument("--storage", default=None, help="Optuna database URL (default: SQLite in --out; share one to "
                                                   "run several workers on one study)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/search")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("demo", help="LeNet-5 on Fashion-MNIST: train briefly, compress, print the six ratios")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--restart", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("stages", help="list recipe stages and their keys")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("bench-report", help="table and Pareto plot of bench/results/*.json")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--out", default=None, help="output folder (default: the results folder)")
    p.set_defaults(func=cmd_bench_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except NetslimError as exc:
        print(f"netslim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netslim: interrupted", file=sys.stderr)
        return 130
    except PermissionError as exc:  # a read-only output directory or file met half-way
        print(f"netslim: error: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
