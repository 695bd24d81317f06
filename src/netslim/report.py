"""Benchmark results: one schema for every benchmark, and ``netslim bench-report``.

``bench/results/<benchmark>.json``::

    {"benchmark", "date", "command", "machine", "device", "torch", "rows": [row, ...]}

each row::

    {"model", "dataset", "method", "tool", "setting": {...}, "top1", "baseline_top1", "params",
     "macs", "size_bytes", "latency_ms": {"<batch>": ms}, "baseline_latency_ms": {...}, "notes"}

A field that does not apply is null. :func:`write_result` fills the header, :func:`bench_report`
tables every result file and draws accuracy-vs-MACs and accuracy-vs-size Pareto plots.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import NetslimError
from .io import atomic_write, save_json, save_text

HEADER_KEYS = ("benchmark", "date", "command", "machine", "device", "torch", "rows")
ROW_KEYS = ("model", "dataset", "method", "tool", "setting", "top1", "baseline_top1", "params", "macs",
            "size_bytes", "latency_ms", "baseline_latency_ms", "notes")


def machine_description() -> str:
    import os

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    pinned = f" (this process pinned to {usable})" if usable != os.cpu_count() else ""
    return (f"{platform.node() or 'host'} {platform.machine()} {os.cpu_count()} CPUs{pinned}, "
            f"{platform.system()} {platform.release()}")


def device_description(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def make_row(**fields: Any) -> dict[str, Any]:
    """A result row with every schema key present (missing ones null); unknown keys are an error."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise NetslimError(f"unknown result row keys {sorted(unknown)}; valid: {', '.join(ROW_KEYS)}")
    row = {k: fields.get(k) for k in ROW_KEYS}
    for k in ("latency_ms", "baseline_latency_ms"):
        if row[k] is not None:
            row[k] = {str(b): float(v) for b, v in row[k].items()}
    return row


def write_result(benchmark: str, rows: Iterable[dict], out_dir: str | Path = "bench/results",
                 device: str | torch.device = "cpu", command: str | None = None,
                 details: dict[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/<benchmark>.json`` atomically with the standard header.

    ``details`` (optional) holds what does not fit a row: per-layer tables, timings of stages.
    """
    doc = {
        "benchmark": benchmark,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine_description(),
        "device": device_description(device),
        "torch": torch.__version__,
        "rows": [make_row(**r) for r in rows],
    }
    if details:
        doc["details"] = details
    validate_result(doc, benchmark)
    return save_json(doc, Path(out_dir) / f"{benchmark}.json")


def validate_result(doc: Any, source: str) -> None:
    if not isinstance(doc, dict):
        raise NetslimError(f"{source}: a result file must be a JSON object")
    missing = [k for k in HEADER_KEYS if k not in doc]
    if missing:
        raise NetslimError(f"{source}: missing keys {', '.join(missing)}")
    if not isinstance(doc["rows"], list):
        raise NetslimError(f"{source}: 'rows' must be a list")
    for i, row in enumerate(doc["rows"]):
        if not isinstance(row, dict):
            raise NetslimError(f"{source}: row {i} is not an object")
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise NetslimError(f"{source}: row {i} lacks {', '.join(missing)}")


def load_results(results_dir: str | Path) -> list[dict]:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise NetslimError(f"results folder not found: {results_dir}")
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise NetslimError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        validate_result(doc, str(path))
        docs.append(doc)
    return docs


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def results_table(docs: list[dict]) -> str:
    lines = ["| benchmark | model | dataset | method | tool | setting | top-1 | Δ vs base | params | MACs "
             "| size bytes | speed-up (batch) | device |", "|" + "---|" * 13]
    for doc in docs:
        for r in doc["rows"]:
            delta = None if r["top1"] is None or r["baseline_top1"] is None else 100 * (r["top1"] - r["baseline_top1"])
            speed = "–"
            if r["latency_ms"] and r["baseline_latency_ms"]:
                common = sorted(set(r["latency_ms"]) & set(r["baseline_latency_ms"]), key=int)
                speed = ", ".join(f"{r['baseline_latency_ms'][b] / r['latency_ms'][b]:.2f}x ({b})" for b in common)
            setting = ", ".join(f"{k}={v}" for k, v in (r["setting"] or {}).items())
            lines.append(
                f"| {doc['benchmark']} | {r['model']} | {r['dataset']} | {r['method']} | {r['tool']} | {setting} "
                f"| {_fmt(None if r['top1'] is None else 100 * r['top1'], '.2f')} | {_fmt(delta, '+.2f')} "
                f"| {_fmt(r['params'], ',')} | {_fmt(r['macs'], ',')} | {_fmt(r['size_bytes'], ',')} | {speed} "
                f"| {doc['device']} |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with cost <= and accuracy >= (cost ascending)."""
    front, best = [], float("-inf")
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def pareto_plot(docs: list[dict], path: str | Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for d in docs for r in d["rows"] if r["top1"] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "macs", "MACs"), (axes[1], "size_bytes", "stored size (bytes)")):
        groups: dict[tuple, list] = {}
        for r in rows:
            if r[key]:
                groups.setdefault((r["model"], r["tool"]), []).append((r[key], 100 * r["top1"]))
        for (model, tool), pts in sorted(groups.items()):
            xs, ys = zip(*pts)
            sc = ax.scatter(xs, ys, label=f"{model} / {tool}", alpha=0.7)
            front = pareto_front(pts)
            ax.plot(*zip(*front), color=sc.get_facecolor()[0], alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("netslim benchmarks: accuracy vs. cost (lines: Pareto fronts)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def bench_report(results_dir: str | Path = "bench/results", out_dir: str | Path | None = None) -> tuple[Path, Path | None]:
    """Write ``README.md``-style ``report.md`` and ``pareto.png`` for every result file."""
    docs = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    plot = pareto_plot(docs, out / "pareto.png")
    text = ["# netslim benchmark results", ""]
    if not docs:
        text.append(f"No result files in {results_dir}.")
    else:
        text += [f"{sum(len(d['rows']) for d in docs)} rows from {len(docs)} file(s).", "", results_table(docs)]
        if plot is not None:
            text += ["", "![accuracy vs. MACs and size](pareto.png)"]
    md = save_text("\n".join(text) + "\n", out / "report.md")
    return md, plot
