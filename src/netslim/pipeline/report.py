"""``report.md`` of a run: one table row per stage, then the stages' own pictures and notes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import save_text
from .recipe import Recipe


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def stage_table(metrics: list[dict]) -> str:
    head = ("| # | stage | top-1 | r_A | r_p | r_T | r_c | r_E | r_D | non-zero params | eff. MACs "
            "| stored bytes | latency ms | wall s |")
    lines = [head, "|" + "---|" * 14]
    for row in metrics:
        r = row["ratios"]
        bs = min(row["latency_ms"], key=int) if row["latency_ms"] else None
        lines.append(
            f"| {row['index'] + 1} | {row['stage']} | {100 * row['top1']:.2f}% | {_f(r['r_A'], '.4f')} "
            f"| {_f(r['r_p'], '.2f')} | {_f(r['r_T'], '.2f')} | {_f(r['r_c'], '.2f')} | {_f(r['r_E'], '.2f')} "
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
        "latency measured in the same run as the baseline, batch "
        f"{min(recipe.latency_batch_sizes)}.",
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
    rows = [
        ("r_A", "top-1 accuracy", f"{100 * baseline['top1']:.2f}%", f"{100 * final['top1']:.2f}%"),
        ("r_p", "stored bytes", f"{baseline['stored_bytes']:,}", f"{final['stored_bytes']:,}"),
        ("r_T", f"latency ms (batch {bs})", _f(final["baseline_latency_ms"].get(bs), ".3f"),
         _f(final["latency_ms"].get(bs), ".3f")),
        ("r_c", "effective MACs", f"{baseline['effective_macs']:,}", f"{final['effective_macs']:,}"),
        ("r_E", "energy uJ (45 nm)", f"{baseline['energy_pj'] / 1e6:.3f}", f"{final['energy_pj'] / 1e6:.3f}"),
        ("r_D", "index bytes", f"{baseline['index_bytes']:,}", f"{final['index_bytes']:,}"),
    ]
    lines = [f"{'ratio':<6}{'measure':<26}{'original':>16}{'compressed':>16}{'ratio':>10}", "-" * 74]
    for key, what, a, b in rows:
        lines.append(f"{key:<6}{what:<26}{a:>16}{b:>16}{_f(final['ratios'][key], '.3f'):>10}")
    return "\n".join(lines)
