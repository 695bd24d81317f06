"""When and how much to prune: one-shot, or gradual (AGP, Zhu & Gupta 2017) during fine-tuning."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..train import TrainHook
from .masks import apply_masks_


def agp_sparsity(step: int, total_steps: int, initial: float, final: float) -> float:
    """Zhu & Gupta's cubic schedule: s_t = s_f + (s_i - s_f) (1 - t / T)^3, reaching s_f at T."""
    progress = min(1.0, max(0.0, step / max(total_steps, 1)))
    return final + (initial - final) * (1.0 - progress) ** 3


class AGPHook(TrainHook):
    """Raise the sparsity along the AGP curve every ``frequency`` optimizer steps of training.

    ``make_masks(model, sparsity)`` returns the masks for a sparsity (magnitude of the current,
    masked weights, so pruned weights stay pruned); the last update lands on the final sparsity
    at ``end_fraction`` of training, leaving the rest to recover.
    """

    def __init__(self, make_masks: Callable[[nn.Module, float], dict[str, torch.Tensor]], initial: float,
                 final: float, total_steps: int, frequency: int = 50, end_fraction: float = 0.75) -> None:
        self.make_masks, self.initial, self.final = make_masks, initial, final
        self.ramp_steps = max(1, int(total_steps * end_fraction))
        self.frequency = max(1, frequency)
        self.step = 0
        self.current = initial

    def on_train_start(self, model: nn.Module, optimizer) -> None:
        apply_masks_(model, self.make_masks(model, self.initial))

    def state_dict(self) -> dict:
        return {"step": self.step, "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        """Resume the schedule: the masks themselves come back with the model's state_dict."""
        self.step, self.current = int(state.get("step", 0)), float(state.get("current", self.initial))

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        if self.step % self.frequency == 0 or self.step == self.ramp_steps:
            target = agp_sparsity(min(self.step, self.ramp_steps), self.ramp_steps, self.initial, self.final)
            if target > self.current + 1e-6:
                apply_masks_(model, self.make_masks(model, target))
                self.current = target
