"""``report.md`` of a run: one table row per stage, then the stages' own pictures and notes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import save_text
from .recipe import Recipe


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _score(row: dict) -> str:
    value = row.get("score", row.get("top1"))
    return _f(100 * value, ".2f") + "%" if row.get("metric", "top1") == "top1" else _f(value, ".4f")


def stage_table(metrics: list[dict]) -> str:
    """One row per stage: the metric (top-1 unless the run has its own), the six ratios, r_T in onnxruntime
    where an export stage timed it, and the raw measures."""
    metric = metrics[0].get("metric", "top1") if metrics else "top1"
    head = (f"| # | stage | {'top-1' if metric == 'top1' else metric} | r_A | r_p | r_T | r_T ORT | r_c | r_E | r_D "
            "| non-zero params | eff. MACs | stored bytes | latency ms | wall s |")
    lines = [head, "|" + "---|" * 15]
    for row in metrics:
        r = row["ratios"]
        bs = min(row["latency_ms"], key=int) if row["latency_ms"] else None
        lines.append(
            f"| {row['index'] + 1} | {row['stage']} | {_score(row)} | {_f(r['r_A'], '.4f')} "
            f"| {_f(r['r_p'], '.2f')} | {_f(r['r_T'], '.2f')} | {_f(r.get('r_T_ort'), '.2f')} | {_f(r['r_c'], '.2f')} "
            f"| {_f(r['r_E'], '.2f')} "
            f"| {_f(r['r_D'], '.3f')} | {row['nonzero_params']:,} | {row['effective_macs']:,} "
            f"| {row['stored_bytes']:,} | {_f(row['latency_ms'].get(bs) if bs else None, '.3f')} | {row['wall_s']:.1f} |")
    return "\n".join(lines)


def write_report(run_dir: Path, recipe: Recipe, metrics: list[dict]) -> Path:
    parts = [
        f"# netslim run: {recipe.name or recipe.model} on {recipe.data}",
        "",
        f"Model `{recipe.model}`, weights `{recipe.weights}`, {len(recipe.stages)} stage(s): "
        + " → ".join(s.name for s in recipe.stages) + ".",
        "",
        "Ratios are original / compressed (r_A and r_D: compressed / original and index share); "
        "r_T is PyTorch latency measured in the same run as the baseline, batch "
        f"{min(recipe.latency_batch_sizes)}; r_T ORT is onnxruntime latency of the exported file against the "
        "exported original, timed side by side by the export stage.",
        "",
        stage_table(metrics),
    ]
    for row in metrics[1:]:
        stage_dir = run_dir / "stages" / f"{row['index']:02d}-{row['stage']}"
        pictures = sorted(stage_dir.glob("*.png")) if stage_dir.is_dir() else []
        if row.get("notes") or pictures:
            parts += ["", f"## Stage {row['index'] + 1}: {row['stage']}", ""]
            if row.get("notes"):
                parts.append(str(row["notes"]))
            for pic in pictures:
                parts.append(f"![{pic.stem}]({pic.relative_to(run_dir).as_posix()})")
    return save_text("\n".join(parts) + "\n", run_dir / "report.md")


def ratio_table(baseline: dict, final: dict) -> str:
    """The six ratios of ``final`` against ``baseline`` as a fixed-width table."""
    bs = min(set(baseline["latency_ms"]) & set(final["latency_ms"]), key=int, default=None)
    metric = baseline.get("metric", "top1")
    rows = [
        ("r_A", "top-1 accuracy" if metric == "top1" else metric, _score(baseline), _score(final)),
        ("r_p", "stored bytes", f"{baseline['stored_bytes']:,}", f"{final['stored_bytes']:,}"),
        ("r_T", f"latency ms (batch {bs})", _f(final["baseline_latency_ms"].get(bs), ".3f"),
         _f(final["latency_ms"].get(bs), ".3f")),
        *([("r_T_ort", f"onnxruntime ms (batch {min(final['ort_latency_ms'], key=int)})",
             _f(final["baseline_ort_latency_ms"].get(min(final["ort_latency_ms"], key=int)), ".3f"),
             _f(final["ort_latency_ms"][min(final["ort_latency_ms"], key=int)], ".3f"))]
          if final.get("ort_latency_ms") else []),
        ("r_c", "effective MACs", f"{baseline['effective_macs']:,}", f"{final['effective_macs']:,}"),
        ("r_E", "energy uJ (45 nm)", f"{baseline['energy_pj'] / 1e6:.3f}", f"{final['energy_pj'] / 1e6:.3f}"),
        ("r_D", "index bytes", f"{baseline['index_bytes']:,}", f"{final['index_bytes']:,}"),
    ]
    lines = [f"{'ratio':<8}{'measure':<26}{'original':>14}{'compressed':>16}{'ratio':>10}", "-" * 74]
    for key, what, a, b in rows:
        lines.append(f"{key:<8}{what:<26}{a:>14}{b:>16}{_f(final['ratios'].get(key), '.3f'):>10}")
    return "\n".join(lines)
