"""Benchmark: quantization of resnet20, resnet56, vgg16 and mobilenetv2 on CIFAR-10, side by side with peers.

Rows per model, all on the same calibration images (``--calibration-images``, default 512 from the
training set) and the same test images:
  * fp32;
  * netslim W8A8, per-tensor and per-channel weights, with each activation calibrator
    (minmax, moving_average, percentile, mse, kl, aciq);
  * netslim W8A8 per-tensor and per-channel after cross-layer equalization + data-free bias correction;
  * netslim W4A8 per-channel, round-to-nearest and AdaRound; W4A4 after a short QAT (LSQ);
  * peers: PyTorch's ``torch.ao`` FX post-training quantization (x86 backend, default qconfig mapping),
    and ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) with its
    MinMax, Entropy and Percentile calibrations.
netslim's W8A8 rows are evaluated in the PyTorch simulation and the per-channel minmax one also as
integers in ONNX Runtime (the two must agree within 0.1 point). Latency (CPU, ``--threads``
threads, batch 1 and 64): ONNX Runtime fp32 vs netslim's int8 QDQ model vs ONNX Runtime's own int8
model, and torch fp32 vs ``torch.ao`` int8, all in the same run. Stored size: netslim's ``.nsq`` of
the W8 and W4 models against params x 1 byte.

CPU form (default): top-1 on a fixed random subset of ``--test-images`` test images, a W4A4 QAT of
``--qat-steps`` steps of batch 64 on the CPU. ``--full``: the whole test set and a W4A4 QAT of
``--qat-epochs`` epochs of batch 128 on the full training set (on the GPU when there is one, else the CPU;
everything else stays on the CPU). ``--qat-full``: a fresh result holding only the fp32 and W4A4 QAT rows
of each model of ``--models`` in the full form. ``--dry-run`` keeps the chosen form and every code path
but makes it tiny (64 test and calibration images, 2 QAT steps, 2 AdaRound iterations, 1 latency repeat)
on the CPU to prove a command line works. The JSON's ``details.form`` is ``cpu``, ``full`` or ``dry-run``;
``details.form_text`` describes it.

    .venv/bin/python bench/quantization.py [--models resnet20,resnet56,vgg16,mobilenetv2] [--test-images 2000]
        [--full [--qat-epochs 15]] [--qat-full] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from netslim import data as nsdata
from netslim import zoo
from netslim.export import onnx_bytes, ort_latency_ms, ort_session, run_onnx
from netslim.profile.latency import measure_latency as profile_latency
from netslim.quant import CALIBRATORS, QuantConfig, quantization_aware_training, quantize, save_quantized
from netslim.report import write_result
from netslim.train import TrainConfig

warnings.filterwarnings("ignore")
X = torch.randn(1, 3, 32, 32)


def top1_torch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> float:
    """Top-1 (percent) of ``model`` on ``device`` (a model moved there stays there)."""
    if device != "cpu":
        model.to(device)
    with torch.no_grad():
        out = torch.cat([model(images[i:i + 250].to(device)).cpu() for i in range(0, len(images), 250)])
    return 100.0 * (out.argmax(1) == labels).float().mean().item()


def top1_ort(session, images: torch.Tensor, labels: torch.Tensor) -> float:
    out = torch.cat([run_onnx(session, images[i:i + 250])[0] for i in range(0, len(images), 250)])
    return 100.0 * (out.argmax(1) == labels).float().mean().item()


def torch_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    return profile_latency(model, x, batch_sizes=(len(x),), warmup=warmup, repeats=repeats)[len(x)]


def torch_ao_ptq(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """PyTorch's own FX-mode static PTQ, x86 backend, default qconfig mapping (per-channel weights)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (X,))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)


def ort_static(fp32_onnx: bytes, calibration: list[torch.Tensor], method: str) -> bytes:
    """ONNX Runtime's quantize_static: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(fp32_onnx)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process
            pre = Path(d) / "pre.onnx"
            quant_pre_process(str(src), str(pre))
            src = pre
        except Exception:  # pre-processing is an optimisation, not a requirement
            pass
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
        return dst.read_bytes()


def fp32_onnx(model: nn.Module) -> bytes:
    """The float model through the same exporter as the QDQ model (netslim.export), batch dimension dynamic."""
    return onnx_bytes(model, X, opset=17)


class Bench:
    def __init__(self, args, device: str, train_device: str = "cpu") -> None:
        self.args, self.device, self.train_device = args, device, train_device
        self.rows: list[dict] = []
        self.command: str | None = None  # the original run's command when a rerun replaces some rows
        self.details: dict = {"latency_ms": {}, "stored_bytes": {}, "sim_vs_ort": {}, "seconds": {}}
        path = Path(args.out) / "quantization.json"
        if args.merge and path.is_file():
            old = json.loads(path.read_text())
            models = set(args.models.split(","))
            self.rows = [r for r in old["rows"] if r["model"] not in models]
            for key, value in old.get("details", {}).items():
                if isinstance(value, dict):
                    self.details[key] = {k: v for k, v in value.items() if k.split(" ")[0] not in models}
                else:
                    self.details[key] = value

    def add(self, model: str, method: str, tool: str, setting: dict, top1: float, base: float, notes: str = "",
            **extra) -> None:
        self.rows.append(dict(model=model, dataset="cifar10", method=method, tool=tool, setting=setting,
                              top1=top1 / 100, baseline_top1=base / 100, notes=notes, **extra))
        print(f"{model:12} {tool:13} {method:42} top1 {top1:6.2f}  ({top1 - base:+.2f})", flush=True)
        write_result("quantization", self.rows, self.args.out, device=self.device, details=self.details,
                     command=self.command)


def qat_config(args) -> TrainConfig:
    """The W4A4 QAT: ``--qat-steps`` steps of batch 64 (CPU form), ``--qat-epochs`` epochs of batch 128 on the
    full training set (``--full``); ``--dry-run`` at most 1 epoch of 2 steps."""
    if args.full:
        return TrainConfig(epochs=1 if args.dry_run else args.qat_epochs, lr=args.qat_lr, batch_size=128, amp=False,
                           max_steps_per_epoch=2 if args.dry_run else None, weight_decay=0)
    return TrainConfig(epochs=1, lr=args.qat_lr, batch_size=64, amp=False, max_steps_per_epoch=args.qat_steps,
                       weight_decay=0)


def qat_row(name, bench, model, train, loader, test_images, test_labels, base, params, label: str = "") -> None:
    """W4A4 (MSE ranges) followed by LSQ quantization-aware training (short in the CPU form, epochs in the
    full form, on ``bench.train_device``)."""
    args = bench.args
    device = bench.train_device
    cfg = qat_config(args)
    w4a4 = quantize(model, X, loader, QuantConfig(weight_bits=4, act_bits=4, weight_range="mse", calibrator="mse"),
                    device="cpu")
    before = top1_torch(w4a4, test_images, test_labels, device)
    t0 = time.time()
    quantization_aware_training(w4a4, train, cfg, learn="lsq", progress=False, device=device)
    bench.details["seconds"][f"{name} W4A4 QAT"] = round(time.time() - t0, 1)
    budget = ({"qat_epochs": cfg.epochs, **({"max_steps_per_epoch": 2} if args.dry_run else {})} if args.full
              else {"qat_steps": args.qat_steps})
    top1 = top1_torch(w4a4.eval(), test_images, test_labels, device)
    w4a4.cpu()
    bench.add(name, f"W4A4 per-channel mse + QAT (LSQ{label})", "netslim",
              {"weight_bits": 4, "act_bits": 4, **budget, "batch_size": cfg.batch_size, "lr": args.qat_lr},
              top1, base, params=params, notes=f"top-1 before QAT {before:.2f}")


def rerun_qat(args, calib, test_images, test_labels) -> None:
    """Add W4A4 QAT rows (labelled with their steps) for ``args.models`` to the existing result."""
    path = Path(args.out) / "quantization.json"
    doc = json.loads(path.read_text())
    bench = Bench(args, "cpu", train_device="cuda" if args.full and torch.cuda.is_available() and not args.dry_run else "cpu")
    bench.rows, bench.details, bench.command = list(doc["rows"]), doc["details"], doc["command"]
    train = nsdata.get("cifar10", "train", augment=True)
    key = "form_text" if "form_text" in bench.details else "form"
    bench.details[key] += (f"; W4A4 QAT rows of {args.models} added with {args.qat_steps} steps "
                              f"(details.qat_reruns; each row's method and setting say its steps)")
    for name in args.models.split(","):
        fp32 = next(r for r in bench.rows if r["model"] == name and r["method"] == "fp32")
        bench.details.setdefault("qat_reruns", {})[name] = " ".join(["python", *__import__("sys").argv])
        model = zoo.get(name, weights="shared").eval()
        qat_row(name, bench, model, train, [(x, None) for x in calib], test_images, test_labels,
                100 * fp32["top1"], fp32["params"], label=f", {args.qat_steps} steps")


def qat_full(args, calib, train, test_images, test_labels, device: str) -> None:
    """A fresh result: the fp32 and the W4A4 QAT row (the full form's epochs) of every model of ``--models``."""
    args.merge = False
    bench = Bench(args, device, train_device=device)
    bench.details["form"] = "dry-run" if args.dry_run else "full"
    cfg = qat_config(args)
    bench.details["form_text"] = (
        f"full form, fp32 and W4A4 QAT rows only{' (dry run: tiny, proves the command only)' if args.dry_run else ''}: "
        f"top-1 on {len(test_images):,} test images; W4A4 per-channel mse ranges calibrated on "
        f"{sum(len(x) for x in calib)} training images, then LSQ QAT for {cfg.epochs} epoch(s)"
        f"{f' of at most {cfg.max_steps_per_epoch} steps' if cfg.max_steps_per_epoch else ''} of batch "
        f"{cfg.batch_size} on the training set (SGD lr {args.qat_lr:g} cosine, no weight decay) on {device}")
    loader = [(x, None) for x in calib]
    for name in args.models.split(","):
        model = zoo.get(name, weights="shared").eval()
        params = sum(p.numel() for p in model.parameters())
        base = top1_torch(model, test_images, test_labels, device)
        model.cpu()
        bench.add(name, "fp32", "netslim", {}, base, base, params=params)
        qat_row(name, bench, model, train, loader, test_images, test_labels, base, params)
    print(Path(args.out) / "quantization.json")


def run_model(name: str, bench: Bench, train, test_images, test_labels, calib: list[torch.Tensor]) -> None:
    args = bench.args
    model = zoo.get(name, weights="shared").eval()
    params = sum(p.numel() for p in model.parameters())
    base = top1_torch(model, test_images, test_labels)
    bench.add(name, "fp32", "netslim", {}, base, base, params=params)
    loader = [(x, None) for x in calib]

    def ptq(label: str, cfg: QuantConfig, timed: str | None = None):
        t0 = time.time()
        q = quantize(model, X, loader, cfg, device="cpu")
        bench.details["seconds"][f"{name} {label}"] = round(time.time() - t0, 1)
        top1 = top1_torch(q, test_images, test_labels)
        bench.add(name, label, "netslim", {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits,
                                           "per_channel": cfg.per_channel, "calibrator": cfg.calibrator},
                  top1, base, params=params)
        return q

    for per_channel in (False, True):
        for calibrator in CALIBRATORS:
            gran = "per-channel" if per_channel else "per-tensor"
            q = ptq(f"W8A8 {gran} {calibrator}", QuantConfig(per_channel=per_channel, calibrator=calibrator))
            if per_channel and calibrator == "minmax":
                w8 = q
    for per_channel in (False, True):
        gran = "per-channel" if per_channel else "per-tensor"
        ptq(f"W8A8 {gran} minmax + CLE + bias correction", QuantConfig(
            per_channel=per_channel, cle=True, relu6_to_relu=False, bias_correction="data_free"))
    w4 = ptq("W4A8 per-channel mse (round to nearest)", QuantConfig(weight_bits=4, weight_range="mse", calibrator="mse"))
    ptq("W4A8 per-channel mse + AdaRound", QuantConfig(weight_bits=4, weight_range="mse", calibrator="mse", adaround=True,
                                                       adaround_iters=args.adaround_iters))
    qat_row(name, bench, model, train, loader, test_images, test_labels, base, params)

    # integer execution of netslim's model, and the peers
    qdq = onnx_bytes(w8, X, opset=17)  # quantized: QDQ, dynamic batch
    session = ort_session(qdq, threads=args.threads)
    sim, ort_top1 = top1_torch(w8, test_images, test_labels), top1_ort(session, test_images, test_labels)
    bench.details["sim_vs_ort"][name] = {"simulation": sim, "onnxruntime": ort_top1}
    bench.add(name, "W8A8 per-channel minmax, executed as int8 in onnxruntime", "netslim",
              {"weight_bits": 8, "act_bits": 8, "per_channel": True, "calibrator": "minmax"}, ort_top1, base,
              params=params, size_bytes=len(qdq))
    ao = torch_ao_ptq(model, calib)
    bench.add(name, "W8A8 x86 default qconfig (FX PTQ)", "torch.ao", {"weight_bits": 8, "act_bits": 8}, top1_torch(
        ao, test_images, test_labels), base, params=params)
    fp32 = fp32_onnx(model)
    peers = {}
    for method in ("MinMax", "Entropy", "Percentile"):
        try:
            peers[method] = ort_static(fp32, calib, method)
        except Exception as exc:  # a peer failure is reported, not hidden
            bench.details[f"{name} onnxruntime {method}"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        bench.add(name, f"W8A8 quantize_static {method} per-channel", "onnxruntime", {"weight_bits": 8, "act_bits": 8},
                  top1_ort(ort_session(peers[method], threads=args.threads), test_images, test_labels), base,
                  params=params, size_bytes=len(peers[method]))

    with tempfile.TemporaryDirectory() as d:
        bench.details["stored_bytes"][name] = {
            "params": params, "W8 .nsq": save_quantized(w8, Path(d) / "w8.nsq").stat().st_size,
            "W4 .nsq": save_quantized(w4, Path(d) / "w4.nsq").stat().st_size, "fp32 onnx": len(fp32),
            "W8 QDQ onnx": len(qdq)}
    if name in args.latency_models.split(","):
        measure_latency(name, bench, model, ao, fp32, qdq, peers.get("MinMax"))


def measure_latency(name, bench, model, ao, fp32, qdq, ort_int8) -> None:
    """Interleaved: each batch size measures every engine back to back, twice; the faster run counts."""
    threads = bench.args.threads
    torch.set_num_threads(threads)
    sessions = {"onnxruntime fp32": ort_session(fp32, threads), "netslim int8 (onnxruntime)": ort_session(qdq, threads)}
    if ort_int8 is not None:
        sessions["onnxruntime quantize_static int8"] = ort_session(ort_int8, threads)
    result = {}
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32)
        runs = {k: [] for k in [*sessions, "torch fp32", "torch.ao int8"]}
        for _ in range(2):
            for k, s in sessions.items():
                runs[k].append(ort_latency_ms(s, x, batch_sizes=(batch,), repeats=bench.args.repeats)[batch])
            runs["torch fp32"].append(torch_latency_ms(model, x, repeats=bench.args.repeats))
            runs["torch.ao int8"].append(torch_latency_ms(ao, x, repeats=bench.args.repeats))
        result[f"batch {batch}"] = {k: round(min(v), 3) for k, v in runs.items()}
        r = result[f"batch {batch}"]
        result[f"batch {batch}"]["netslim int8 speed-up vs onnxruntime fp32"] = round(
            r["onnxruntime fp32"] / r["netslim int8 (onnxruntime)"], 2)
        result[f"batch {batch}"]["torch.ao int8 speed-up vs torch fp32"] = round(r["torch fp32"] / r["torch.ao int8"], 2)
        print(name, f"batch {batch}", result[f"batch {batch}"], flush=True)
    bench.details["latency_ms"][name] = result
    write_result("quantization", bench.rows, bench.args.out, device=bench.device, details=bench.details)


def measure_sizes(args, calib: list[torch.Tensor]) -> None:
    """Stored bytes of the W8 and W4 ``.nsq`` files, written into the existing result's details."""
    path = Path(args.out) / "quantization.json"
    doc = json.loads(path.read_text())
    loader = [(x, None) for x in calib]
    for name in args.models.split(","):
        model = zoo.get(name, weights="shared").eval()
        sizes = {"params": sum(p.numel() for p in model.parameters())}
        with tempfile.TemporaryDirectory() as d:
            for label, cfg in (("W8 .nsq", QuantConfig()), ("W4 .nsq", QuantConfig(weight_bits=4, weight_range="mse"))):
                sizes[label] = save_quantized(quantize(model, X, loader, cfg, device="cpu"), Path(d) / "m.nsq").stat().st_size
        sizes["W8 / params"] = round(sizes["W8 .nsq"] / sizes["params"], 4)
        doc["details"]["stored_bytes"][name] = {**doc["details"]["stored_bytes"].get(name, {}), **sizes}
        print(name, sizes, flush=True)
    doc["details"]["stored_bytes_command"] = " ".join(["python", *__import__("sys").argv])
    write_result("quantization", doc["rows"], args.out, device="cpu", command=doc["command"], details=doc["details"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56,vgg16,mobilenetv2")
    p.add_argument("--latency-models", default="resnet56,mobilenetv2,vgg16")
    p.add_argument("--test-images", type=int, default=2000, help="fixed random subset of the test set (10000: all)")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--adaround-iters", type=int, default=500)
    p.add_argument("--qat-steps", type=int, default=150, help="CPU form: W4A4 QAT steps of batch 64")
    p.add_argument("--qat-epochs", type=int, default=15, help="--full / --qat-full: W4A4 QAT epochs of batch 128")
    p.add_argument("--qat-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--merge", action="store_true", help="keep the rows of models not run this time")
    p.add_argument("--qat-only", action="store_true",
                   help="only add W4A4 QAT rows for --models (e.g. with more --qat-steps) to the existing JSON")
    p.add_argument("--sizes-only", action="store_true",
                   help="only re-measure the .nsq sizes (W8 minmax, W4 mse, per-channel) into the existing JSON")
    p.add_argument("--full", action="store_true",
                   help="full form: the whole test set, W4A4 QAT for --qat-epochs epochs (GPU when there is one)")
    p.add_argument("--qat-full", action="store_true",
                   help="a fresh <out>/quantization.json with only the fp32 and W4A4 QAT rows of --models, full form")
    p.add_argument("--dry-run", action="store_true",
                   help="the chosen form made tiny (64 test / calibration images, 2 QAT steps, 2 AdaRound iterations)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    args.full = args.full or args.qat_full
    if args.full:
        args.test_images = 10_000
    if args.dry_run:
        args.test_images, args.calibration_images = 64, min(args.calibration_images, 64)
        args.adaround_iters, args.qat_steps, args.repeats = min(args.adaround_iters, 2), min(args.qat_steps, 2), 1
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"  # a dry run: the CPU
    torch.manual_seed(0)
    test = nsdata.get("cifar10", "test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.test_images]
    test_images = torch.stack([test[i][0] for i in sorted(order.tolist())])
    test_labels = torch.tensor([test[i][1] for i in sorted(order.tolist())])
    plain = nsdata.get("cifar10", "train")
    picks = torch.randperm(len(plain), generator=torch.Generator().manual_seed(1))[: args.calibration_images].tolist()
    calib = list(torch.stack([plain[i][0] for i in picks]).split(64))
    train = nsdata.get("cifar10", "train", augment=True)
    if args.sizes_only:
        return measure_sizes(args, calib)
    if args.qat_full:
        return qat_full(args, calib, train, test_images, test_labels, device)
    if args.qat_only:
        return rerun_qat(args, calib, test_images, test_labels)
    bench = Bench(args, "cpu", train_device=device if args.full else "cpu")
    bench.details["form"] = "dry-run" if args.dry_run else ("full" if args.full else "cpu")
    cfg = qat_config(args)
    qat = (f"W4A4 QAT {cfg.epochs} epoch(s){f' of at most {cfg.max_steps_per_epoch} steps' if cfg.max_steps_per_epoch else ''} "
           f"of batch {cfg.batch_size} on {bench.train_device}" if args.full
           else f"W4A4 QAT {args.qat_steps} steps of batch 64 (short schedule)")
    bench.details["form_text"] = (
        f"{'full form' if args.full else 'CPU'}{' (dry run: tiny, proves the command only)' if args.dry_run else ''}: "
        f"top-1 on {len(test_images):,} test images{'' if len(test_images) == len(test) else ' (fixed random subset)'}; "
        f"{len(picks)} calibration images from the training set for every tool; "
        f"AdaRound {args.adaround_iters} iterations per layer on {min(256, len(picks))} of them; {qat}; "
        f"latency with {args.threads} thread(s){f', {args.repeats} repeat(s)' if args.dry_run else ''}")
    for name in args.models.split(","):
        run_model(name, bench, train, test_images, test_labels, calib)


if __name__ == "__main__":
    main()
