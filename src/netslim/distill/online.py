"""Online distillation: models that learn from each other while they train, without a fixed teacher.

* :func:`mutual_learning` - deep mutual learning (Zhang, Xiang, Hospedales & Lu 2018): 2+ peers,
  each trained with its cross-entropy plus the mean ``KL(p_other || p_self)`` to the other peers'
  predictions on the same batch. The peers train together through :func:`netslim.train.fit`
  (one optimizer step updates all of them from the same batch's predictions, the common
  simultaneous form of the paper's Algorithm 1).
* :func:`codistill` - codistillation (Anil et al. 2018, §2) across ``torch.distributed`` workers:
  every worker trains its *own* model (no gradient averaging) on the same sequence of batches,
  and adds the KL to the mean of the other workers' predictions on that batch, gathered with
  ``all_gather`` every step (the paper exchanges stale checkpoints instead to save bandwidth;
  sending logits is the fresh-prediction limit of that scheme).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import NetslimError
from ..train import (TrainConfig, TrainHook, default_device, fit, is_distributed, lr_factor, make_optimizer,
                     seed_everything)
from .losses import kd_loss


# ------------------------------------------------------------------ deep mutual learning
class PeerCohort(nn.Module):
    """The peers as one module for :func:`fit`: ``forward`` runs every peer, keeps all their logits in
    ``last_logits`` and returns the first peer's (what fit's accuracy and ``eval_data`` report)."""

    def __init__(self, peers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)
        self.last_logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_logits = [peer(x) for peer in self.peers]
        return self.last_logits[0]


def mutual_kl(logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """``sum_k mean_{l != k} KL(p_l || p_k)``: each peer's distance to the others' (detached) predictions."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    for k, own in enumerate(logits):
        others = [other.detach() for j, other in enumerate(logits) if j != k]
        total = total + sum(kd_loss(own, other, temperature) for other in others) / len(others)
    return total


class MutualLearningHook(TrainHook):
    """Adds the other peers' cross-entropies and ``kl_weight * mutual_kl`` to fit's loss (peer 0's cross-entropy)."""

    def __init__(self, temperature: float = 1.0, kl_weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        self.temperature, self.kl_weight, self.label_smoothing = temperature, kl_weight, label_smoothing
        self._kl_sum, self._steps = 0.0, 0
        self.epoch_kl: dict[int, float] = {}

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        logits = model.last_logits
        for other in logits[1:]:
            loss = loss + F.cross_entropy(other.float(), targets, label_smoothing=self.label_smoothing)
        kl = mutual_kl(logits, self.temperature)
        self._kl_sum += float(kl.detach())
        self._steps += 1
        return loss + self.kl_weight * kl

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.epoch_kl[epoch + 1] = self._kl_sum / max(self._steps, 1)
        self._kl_sum, self._steps = 0.0, 0


def mutual_learning(peers: Sequence[nn.Module], train_data: Dataset | DataLoader, config: TrainConfig | None = None,
                    *, temperature: float = 1.0, kl_weight: float = 1.0, eval_data: Dataset | DataLoader | None = None,
                    checkpoint_path: str | Path | None = None, device: str | torch.device | None = None,
                    progress: bool = True) -> list[dict]:
    """Deep mutual learning (Zhang et al. 2018): train ``peers`` (2 or more, in place) together; return
    fit's per-epoch history with ``dml_kl`` (mean of :func:`mutual_kl`) for the epochs trained here.
    ``train_loss`` is the sum over peers; ``train_top1`` and ``eval_*`` are the first peer's."""
    peers = list(peers)
    if len(peers) < 2 or len({id(p) for p in peers}) != len(peers):
        raise NetslimError(f"mutual learning needs 2 or more distinct peer models, got {len(peers)}")
    cfg = config or TrainConfig()
    hook = MutualLearningHook(temperature, kl_weight, cfg.label_smoothing)
    history = fit(PeerCohort(peers), train_data, cfg, hooks=[hook], eval_data=eval_data,
                  checkpoint_path=checkpoint_path, device=device, progress=progress)
    for record in history:
        if record["epoch"] in hook.epoch_kl:
            record["dml_kl"] = hook.epoch_kl[record["epoch"]]
    return history


# ------------------------------------------------------------------ codistillation across DDP workers
def gather_peer_logits(logits: torch.Tensor) -> list[torch.Tensor]:
    """The other workers' logits on the same batch (``all_gather``; no gradient flows to them)."""
    gathered = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, logits.detach().contiguous())
    return [g for i, g in enumerate(gathered) if i != dist.get_rank()]


def codistill(model: nn.Module, train_data: Dataset, config: TrainConfig | None = None, *, weight: float = 1.0,
              temperature: float = 1.0, device: str | torch.device | None = None,
              progress: bool = True) -> list[dict]:
    """Codistillation (Anil et al. 2018) of this worker's ``model`` with the other workers' models.

    Run under ``torchrun --nproc_per_node=N`` (N >= 2) after :func:`netslim.train.init_distributed`,
    each worker with its own model (e.g. a different seed). Every worker sees the same batches
    (shuffled with ``config.seed``), and minimises ``CE + weight * mean_peers KL(p_peer || p_own) * T^2``.
    Gradients are *not* averaged, so the models stay different. fp32, no checkpointing; returns
    per-epoch ``train_loss``, ``train_ce``, ``peer_kl``, ``train_top1``.
    """
    if not is_distributed() or dist.get_world_size() < 2:
        raise NetslimError("codistill needs torch.distributed with 2 or more workers "
                           "(launch with torchrun --nproc_per_node=N and call netslim.train.init_distributed())")
    cfg = config or TrainConfig()
    device = torch.device(device) if device is not None else default_device()
    seed_everything(cfg.seed + dist.get_rank())
    model.to(device).train()
    order = torch.Generator().manual_seed(cfg.seed)  # the same batches on every worker
    loader = DataLoader(train_data, batch_size=cfg.batch_size, shuffle=True, generator=order,
                        drop_last=len(train_data) > cfg.batch_size, num_workers=cfg.workers)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    optimizer = make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    history = []
    for epoch in range(cfg.epochs):
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "correct": 0.0, "seen": 0}
        bar = tqdm(loader, total=steps_per_epoch, desc=f"codistill {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress or dist.get_rank() != 0)
        for i, (x, y) in enumerate(bar):
            if i >= steps_per_epoch:
                break
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(cfg, epoch * steps_per_epoch + i, total_steps, steps_per_epoch)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            peers = gather_peer_logits(logits)
            ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            kl = sum(kd_loss(logits, p, temperature) for p in peers) / len(peers)
            loss = ce + weight * kl
            if not torch.isfinite(loss):
                raise NetslimError(f"codistillation diverged: loss is {loss.item()} at epoch {epoch + 1}, step {i}; "
                                   "lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = y.numel()
            sums["loss"] += loss.item() * n
            sums["ce"] += ce.item() * n
            sums["kl"] += kl.item() * n
            sums["correct"] += (logits.detach().argmax(1) == y).sum().item()
            sums["seen"] += n
        seen = max(sums["seen"], 1)
        history.append({"epoch": epoch + 1, "train_loss": sums["loss"] / seen, "train_ce": sums["ce"] / seen,
                        "peer_kl": sums["kl"] / seen, "train_top1": sums["correct"] / seen,
                        "lr": optimizer.param_groups[0]["lr"]})
    return history


__all__ = ["mutual_learning", "codistill", "PeerCohort", "MutualLearningHook", "mutual_kl", "gather_peer_logits"]
