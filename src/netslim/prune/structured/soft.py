"""Soft Filter Pruning (He et al., "Soft Filter Pruning for Accelerating Deep CNNs", IJCAI 2018).

After every epoch the lowest-norm channel groups are zeroed but stay in the model and keep
training, so a channel zeroed early can grow back; at the end the groups last chosen are removed.
We zero a group's BatchNorm scale and shift together with its filters, which makes the final
removal exact (the pruned model computes what the zeroed one did).
"""
from __future__ import annotations

import torch
from torch import nn

from ...train import TrainConfig, TrainHook, fit
from ...targets import check_scope, parse_target
from .api import TARGET_METRICS, ratio_for_target
from .apply import remove_groups_
from .criteria import group_scores
from .graph import DependencyGraph, trace
from .select import layer_groups, select


def zero_groups_(model: nn.Module, graph: DependencyGraph, groups: set[int]) -> nn.Module:
    """Zero the filters, biases and norm parameters of ``groups`` (consumers' input slices are left);
    returns ``model``."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for s in graph.slices:
            if s.role == "in" or s.param in ("running_mean", "running_var"):
                continue
            t = getattr(modules[s.module], s.param)
            idx = [pos for pos, r in enumerate(graph.roots(s.labels).tolist()) if r in groups]
            if idx:
                t.index_fill_(s.dim, torch.tensor(idx, device=t.device), 0.0)
    return model


class SoftFilterPruning(TrainHook):
    """The SFP training hook: zero the weakest ``ratio`` of channels at each epoch end."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ratio: float, criterion: str = "l2",
                 scope: str = "uniform", round_to: int = 1) -> None:
        self.graph = trace(model, example_input)
        self.lgs = layer_groups(self.graph)
        self.ratio, self.criterion, self.scope, self.round_to = ratio, criterion, scope, round_to
        self.chosen: set[int] = set()

    def choose(self, model: nn.Module) -> set[int]:
        scores = group_scores(self.criterion, model, self.graph)
        return select(self.lgs, scores, self.ratio, self.scope, self.round_to)

    def on_train_start(self, model, optimizer):
        self.chosen = self.choose(model)
        zero_groups_(model, self.graph, self.chosen)

    def on_epoch_end(self, model, epoch):
        self.chosen = self.choose(model)
        zero_groups_(model, self.graph, self.chosen)

    def state_dict(self) -> dict:
        return {"chosen": sorted(int(g) for g in self.chosen), "ratio": float(self.ratio)}

    def load_state_dict(self, state: dict) -> None:
        """After a resume, the groups chosen at the last finished epoch (not those of the untrained model)."""
        if "chosen" in state:
            self.chosen = {int(g) for g in state["chosen"]}
        if "ratio" in state:
            self.ratio = float(state["ratio"])

    def finalize(self, model: nn.Module) -> nn.Module:
        """Remove the groups chosen last (call after training)."""
        zero_groups_(model, self.graph, self.chosen)
        return remove_groups_(model, self.graph, self.chosen)


def soft_filter_prune(model: nn.Module, example_input: torch.Tensor, train_data, config: TrainConfig | None = None,
                      ratio: float = 0.5, target: str | dict | None = None, criterion: str = "l2",
                      scope: str = "uniform", round_to: int = 1, device=None, progress: bool = True,
                      checkpoint_path=None) -> nn.Module:
    """Train ``model`` with SFP for ``config.epochs`` and return it with the chosen channels removed.
    ``target`` (e.g. ``"macs:2"``) sets the ratio from the model as it is before training."""
    parsed = parse_target(target, TARGET_METRICS)
    scope = check_scope(scope)
    hook = SoftFilterPruning(model, example_input, ratio, criterion, scope, round_to)
    if parsed is not None:
        scores = group_scores(criterion, model, hook.graph)
        hook.ratio, _ = ratio_for_target(model, example_input, hook.graph, hook.lgs, scores, parsed,
                                         scope, round_to, 0.1)
    fit(model, train_data, config or TrainConfig(), hooks=[hook], device=device, progress=progress,
        checkpoint_path=checkpoint_path)
    return hook.finalize(model)
