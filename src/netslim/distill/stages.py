"""The ``distill`` recipe stage: train the current model (or a new zoo student) from a teacher.

.. code-block:: yaml

    - distill:
        teacher: original            # the recipe's model before compression (default), or a zoo name
        teacher_weights: shared      # for a zoo teacher: a state_dict path or "shared"
        student: current             # the model so far (default), or a zoo name trained from scratch
        losses: {kd: 0.9, at: 1000}  # loss name -> weight ("ce": the labels' cross-entropy)
        layers: [layer1, layer2, layer3]   # or [[teacher_layer, student_layer], ...], or {at: [...], fitnet: [...]}
        temperature: 4
        epochs: 10                   # and every other field of netslim.train.TrainConfig
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import zoo
from ..errors import NetslimError
from ..pipeline.stages import StageContext, stage
from ..train import TrainConfig
from .distiller import as_layer_pair, distill, layer_pairs, validate_losses


@dataclass
class DistillConfig(TrainConfig):
    """``teacher``: ``original`` or a zoo name (with ``teacher_weights``); ``student``: ``current`` or a zoo
    name (built fresh, or from ``student_weights``); ``losses``: ``{name: weight}``; ``layers``: layer pairs
    for the layer losses; ``embedding``: ``[teacher_layer, student_layer]`` for rkd / pkt / crd (default:
    the classifiers' inputs); ``temperature``: KD's; ``crd_dim`` / ``crd_negatives``: CRD's head width and
    negatives; plus every :class:`~netslim.train.TrainConfig` field."""

    teacher: str = "original"
    teacher_weights: str | None = None
    student: str = "current"
    student_weights: str | None = None
    losses: dict[str, float] = field(default_factory=lambda: {"kd": 0.9})
    layers: Any = field(default_factory=list)
    embedding: list[str] | None = None
    temperature: float = 4.0
    crd_dim: int = 128
    crd_negatives: int = 16384

    def __post_init__(self) -> None:
        super().__post_init__()
        layer_pairs(validate_losses(self.losses), self.layers or None)
        if self.teacher != "original":
            zoo.spec(self.teacher)
            if self.teacher_weights is None:
                raise NetslimError(f"teacher {self.teacher!r} needs teacher_weights (a state_dict path or 'shared'); "
                                   "a randomly initialised teacher has nothing to teach")
        if self.student != "current":
            zoo.spec(self.student)
        if self.embedding is not None:
            as_layer_pair(self.embedding)
        if not self.temperature > 0:
            raise NetslimError(f"temperature must be > 0, got {self.temperature}")
        if self.crd_dim < 1 or self.crd_negatives < 1:
            raise NetslimError(f"crd_dim and crd_negatives must be >= 1, got {self.crd_dim} and {self.crd_negatives}")


def train_config(cfg: TrainConfig) -> TrainConfig:
    """The plain :class:`TrainConfig` part of a stage config."""
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)})


def _restore(model: nn.Module, cfg: DistillConfig, artifacts: dict | None = None) -> nn.Module:
    if cfg.student == "current":
        return model
    return zoo.get(cfg.student, num_classes=(artifacts or {}).get("num_classes"))


@stage("distill", DistillConfig, restore=_restore)
def distill_stage(ctx: StageContext, cfg: DistillConfig) -> nn.Module:
    """Knowledge distillation from the original model (or a zoo teacher) into the current model (or a zoo student)."""
    if cfg.teacher == "original":
        teacher, teacher_name = ctx.original, f"the original {ctx.model_name or 'model'}"
    else:
        teacher, teacher_name = zoo.get(cfg.teacher, cfg.teacher_weights, ctx.num_classes), cfg.teacher
    student = ctx.model
    if cfg.student != "current":
        student = zoo.get(cfg.student, cfg.student_weights, ctx.num_classes).to(ctx.device)
    result = distill(student, teacher, ctx.data.train, cfg.losses, cfg.layers or None, train_config(cfg),
                     temperature=cfg.temperature, embedding=cfg.embedding, crd_dim=cfg.crd_dim,
                     crd_negatives=cfg.crd_negatives, checkpoint_path=ctx.stage_dir / "train.ckpt",
                     device=ctx.device, progress=ctx.progress)
    last = result.history[-1] if result.history else {}
    terms = {k[len("distill_"):]: v for k, v in last.items() if k.startswith("distill_")}
    ctx.artifacts.update(student=cfg.student, num_classes=ctx.num_classes, distill_terms=terms)
    ctx.artifacts["notes"] = (f"distilled {'the current model' if cfg.student == 'current' else cfg.student} from "
                              f"{teacher_name} with {cfg.losses}; last epoch's terms: "
                              + (", ".join(f"{k} {v:.4g}" for k, v in terms.items()) or "(resumed, none run)"))
    return student
