"""Quantization-aware training: fine-tune a fake-quantized model through the common training loop.

Rounding passes gradients straight through (STE, Bengio et al. 2013; Jacob et al. 2018). On request
the quantizers' steps learn too: ``lsq`` trains every weight and activation step with LSQ's scaled
gradient (Esser et al. 2020, "Learned Step Size Quantization"); ``pact`` trains the clipping level of
every non-negative activation (Choi et al. 2018, "PACT"), with its L2 penalty on the level.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import unknown_choice
from ..train import TrainConfig, TrainHook, fit
from .modules import ActQuant, WeightQuant
from .ptq import align_biases_, set_mode

LEARNERS = ("ste", "lsq", "pact")


def make_learnable_(model: nn.Module, learn: str = "ste") -> nn.Module:
    """Turn the quantizers' steps into trainable parameters as ``learn`` says; returns ``model``."""
    if learn not in LEARNERS:
        raise unknown_choice("QAT learner", learn, LEARNERS)
    for m in model.modules():
        if isinstance(m, ActQuant):
            nonnegative = not m.spec.symmetric and int(m.zero_point) == 0
            m.learn = learn if (learn == "lsq" or (learn == "pact" and nonnegative)) else None
            m.scale.requires_grad_(m.learn is not None)
        elif isinstance(m, WeightQuant):
            m.scale.requires_grad_(learn == "lsq")
    return model


class PactPenalty(TrainHook):
    """PACT's L2 regularizer on the clipping levels (the paper uses the weight decay's coefficient)."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.levels = [m for m in model.modules() if isinstance(m, ActQuant) and m.learn == "pact"]
        self.weight = weight

    def loss(self, model, inputs, targets, outputs, loss):
        if not self.levels or not self.weight:
            return loss
        penalty = sum((m.scale * (m.spec.levels - 1)).pow(2) for m in self.levels)
        return loss + self.weight * penalty


def quantization_aware_training(model: nn.Module, train_data, config: TrainConfig | None = None,
                                learn: str = "ste", hooks: Iterable[TrainHook] = (), device=None,
                                progress: bool = True, checkpoint_path=None) -> nn.Module:
    """Fine-tune a quantized ``model`` (from :func:`netslim.quant.quantize`, already calibrated) in place
    with fake quantization in the forward pass; returns it in ``quantize`` mode. ``learn``: ``ste`` (the
    default, as in the ``quantize`` stage: steps fixed), ``lsq`` or ``pact`` (see :data:`LEARNERS`).
    With ``checkpoint_path`` the training writes a per-epoch checkpoint there and a restarted call resumes
    it (the quantizers' steps and zero points are part of the model's state_dict)."""
    config = config or TrainConfig(epochs=1, lr=1e-3, amp=False)
    set_mode(model, "quantize")
    make_learnable_(model, learn)
    extra = [PactPenalty(model, config.weight_decay)] if learn == "pact" else []
    fit(model, train_data, config, hooks=[*extra, *hooks], device=device, progress=progress,
        checkpoint_path=checkpoint_path)
    for m in model.modules():
        if isinstance(m, (ActQuant, WeightQuant)):
            # a step trained through zero is the same grid mirrored: (q - z) s == (q' - z') |s| with
            # z' = qmin + qmax - z (on a narrow symmetric grid z' = z = 0, so |s| alone); clamping it to
            # ~0 instead would zero the tensor and overflow the int32 bias of the integer kernel
            negative = m.scale.data < 0
            if not m.spec.symmetric and bool(negative.any()):
                mirrored = m.spec.qmin + m.spec.qmax - m.zero_point
                m.zero_point = torch.where(negative.reshape(m.zero_point.shape), mirrored, m.zero_point)
            m.scale.data.abs_().clamp_(min=torch.finfo(torch.float32).tiny * 2 ** 20)
            m.scale.requires_grad_(False)
    align_biases_(model)
    return model.eval()
