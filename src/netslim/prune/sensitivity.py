"""Layer sensitivity to pruning (Han et al. 2015 Fig. 5; Distiller's sensitivity analysis) and the
per-layer sparsity plan derived from it.

For each prunable layer alone, prune it to each sparsity of a grid (magnitude, the rest of
the model untouched) and measure accuracy; then choose per-layer sparsities that reach a
target total sparsity with the least predicted loss (greedy on accuracy lost per weight removed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..deprecation import renamed_argument
from ..errors import NetslimError
from ..io import atomic_write
from ..train import evaluate
from .magnitude import prunable_layers

DEFAULT_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


@dataclass
class SensitivityTable:
    grid: tuple[float, ...]
    accuracy: dict[str, list[float]]  # layer -> top-1 at each grid sparsity
    sizes: dict[str, int]             # layer -> weight count

    def markdown(self, plan: dict[str, float] | None = None) -> str:
        head = "| layer | weights | " + " | ".join(f"{s:.0%}" for s in self.grid) + (" | plan |" if plan else " |")
        lines = [head, "|" + "---|" * (len(self.grid) + 2 + (1 if plan else 0))]
        for name, accs in self.accuracy.items():
            row = f"| {name} | {self.sizes[name]:,} | " + " | ".join(f"{100 * a:.2f}" for a in accs)
            lines.append(row + (f" | {plan[name]:.1%} |" if plan else " |"))
        return "\n".join(lines)


def sensitivity_analysis(model: nn.Module, eval_data: Dataset | None = None, grid: tuple[float, ...] = DEFAULT_GRID,
                         exclude: tuple[str, ...] = (), device: str | torch.device | None = None,
                         progress: bool = True, *, data: Dataset | None = None) -> SensitivityTable:
    """Accuracy of ``model`` on ``eval_data`` (held-out labelled data) with each layer alone pruned to each
    sparsity of ``grid``; ``device`` defaults to :func:`netslim.train.default_device` (``data=``: the
    deprecated name of ``eval_data``)."""
    data = renamed_argument(eval_data, data, "data", "eval_data", "sensitivity_analysis")
    if data is None:
        raise NetslimError("sensitivity_analysis needs eval_data: held-out labelled data")
    layers = prunable_layers(model, exclude)
    accuracy: dict[str, list[float]] = {}
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    bar = tqdm(total=len(layers) * len(grid), desc="sensitivity", disable=not progress, leave=False)
    for name, module in layers.items():
        original = module.weight.detach().clone()
        magnitudes = original.abs().flatten().sort().values
        accs = []
        for s in grid:
            k = int(s * original.numel())
            with torch.no_grad():
                if k > 0:
                    module.weight.copy_(torch.where(original.abs() > magnitudes[k - 1], original, 0.0))
                accs.append(evaluate(model, data, device=device)["top1"])
                module.weight.copy_(original)
            bar.update()
        accuracy[name] = accs
    bar.close()
    return SensitivityTable(tuple(grid), accuracy, sizes)


def plan_sparsity(table: SensitivityTable, target: float) -> dict[str, float]:
    """Per-layer sparsities with total (weight-weighted) sparsity >= ``target`` and least predicted loss.

    Greedy: repeatedly advance, by one grid step, the layer whose next step loses the least
    accuracy per weight removed (losses never credited as gains: accuracy is made monotone).
    """
    grid = table.grid
    total = sum(table.sizes.values())
    monotone = {n: [min(accs[: i + 1]) for i in range(len(accs))] for n, accs in table.accuracy.items()}
    step = {n: 0 for n in table.sizes}
    removed = 0.0
    while removed < target * total - 1e-9:
        best, best_cost = None, None
        for n, i in step.items():
            if i + 1 >= len(grid):
                continue
            gained = (grid[i + 1] - grid[i]) * table.sizes[n]
            cost = (monotone[n][i] - monotone[n][i + 1]) / gained
            if best_cost is None or cost < best_cost - 1e-15 or (abs(cost - best_cost) <= 1e-15 and
                                                                 table.sizes[n] > table.sizes[best]):
                best, best_cost = n, cost
        if best is None:
            break
        removed += (grid[step[best] + 1] - grid[step[best]]) * table.sizes[best]
        step[best] += 1
    return {n: grid[i] for n, i in step.items()}


def plot_sensitivity(table: SensitivityTable, path: str | Path, plan: dict[str, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, accs in table.accuracy.items():
        line, = ax.plot([100 * s for s in table.grid], [100 * a for a in accs], marker="o", ms=3, label=name)
        if plan:
            ax.axvline(100 * plan[name], color=line.get_color(), ls=":", alpha=0.6)
    ax.set_xlabel("sparsity of the layer alone (%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("pruning sensitivity per layer (dotted: chosen plan)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
