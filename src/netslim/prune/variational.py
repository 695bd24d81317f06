"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, "Variational Dropout Sparsifies Deep Neural
Networks", ICML 2017) as a pruning method.

Every weight ``w`` gets a Gaussian posterior ``N(theta, sigma^2)`` with its own dropout rate
``alpha = sigma^2 / theta^2`` (the additive reparameterization, §4.3: ``theta`` and ``log sigma^2``
are the trained parameters). Training maximises the variational lower bound: the data term is the
expected cross-entropy under the posterior, sampled with the local reparameterization trick (each
layer's pre-activation is Gaussian, with mean ``x * theta`` and variance ``x^2 * sigma^2``, §3.3), and
the regulariser is the KL divergence from the log-uniform prior, approximated by eq. 14::

    -KL ~ k1 * sigmoid(k2 + k3 * log alpha) - 0.5 * log(1 + 1 / alpha) - k1,
    k1 = 0.63576, k2 = 1.87320, k3 = 1.48695.

A weight whose ``log alpha`` exceeds a threshold (3, i.e. dropout rate above 95 %, §4.3) carries only
noise and is removed. Nothing patches ``forward``: the noise is added by forward hooks while a layer
is in training mode, ``log sigma^2`` lives in the hook object (saved with the training checkpoint),
and the result is ordinary 0/1 masks (:mod:`netslim.prune.masks`) on the trained means.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetslimError
from ..layers import select_layers
from ..train import TrainConfig, TrainHook, fit
from .masks import apply_masks_

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_RANGE = (-10.0, 10.0)
VARIATIONAL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the paper's optimiser (Adam, lr 1e-3) with a budget that fits 2 CPU cores; fields given by the user override these
TRAIN_DEFAULTS = {"epochs": 20, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0, "schedule": "cosine"}


def neg_kl_approximation(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al. 2017, eq. 14: the approximate -KL(q(w | theta, alpha) || log-uniform prior) per weight."""
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1


def log_alpha_of(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``log alpha = log sigma^2 - log theta^2``, clipped to :data:`LOG_ALPHA_RANGE` as the paper's code does."""
    return torch.clamp(log_sigma2 - torch.log(theta * theta + 1e-8), *LOG_ALPHA_RANGE)


def _variance_of_output(module: nn.Module, x: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """The pre-activation variance ``x^2 (*) sigma^2`` of the local reparameterization trick."""
    if isinstance(module, nn.Linear):
        return F.linear(x * x, sigma2)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[sigma2.dim() - 2]
    if module.padding_mode != "zeros":
        raise NetslimError(f"variational dropout supports zero padding only, not {module.padding_mode!r}")
    return conv(x * x, sigma2, None, module.stride, module.padding, module.dilation, module.groups)


@dataclass
class VariationalDropoutConfig:
    """``threshold``: log alpha above which a weight is removed (3 in the paper); ``init_log_sigma2``: the
    starting log variance (-10, paper's code); ``kl_weight``: the KL term's final weight in the bound (1 is the
    exact ELBO; larger trades accuracy for sparsity sooner on a short budget) reached linearly over
    ``kl_warmup_epochs``; ``train``: :class:`~netslim.train.TrainConfig` fields (the paper uses Adam, lr 1e-3);
    ``exclude``: layers left dense."""

    threshold: float = 3.0
    init_log_sigma2: float = -10.0
    kl_weight: float = 1.0
    kl_warmup_epochs: float = 5.0
    train: dict = field(default_factory=lambda: dict(TRAIN_DEFAULTS))
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or not -10 < self.threshold < 10:
            raise NetslimError(f"threshold must be a log alpha in (-10, 10), got {self.threshold!r}")
        if not isinstance(self.kl_weight, (int, float)) or not 0 <= self.kl_weight <= 1e4:
            raise NetslimError(f"kl_weight must be a number in [0, 10000], got {self.kl_weight!r}")
        if not isinstance(self.kl_warmup_epochs, (int, float)) or self.kl_warmup_epochs < 0:
            raise NetslimError(f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs!r}")
        if not isinstance(self.init_log_sigma2, (int, float)) or not -30 <= self.init_log_sigma2 <= 0:
            raise NetslimError(f"init_log_sigma2 must be in [-30, 0], got {self.init_log_sigma2!r}")
        self.train_config = TrainConfig(**{**TRAIN_DEFAULTS, **self.train})


class VariationalDropout(TrainHook):
    """A :class:`~netslim.train.TrainHook` that trains ``layers`` with sparse variational dropout.

    ``dataset_size`` scales the KL term to one training example (the bound divided by N).
    """

    def __init__(self, layers: dict[str, nn.Module], dataset_size: int, cfg: VariationalDropoutConfig,
                 steps_per_epoch: int) -> None:
        if not layers:
            raise NetslimError("variational dropout: no Linear or Conv layer to train")
        self.layers = layers
        self.cfg = cfg
        self.dataset_size = dataset_size
        self.warmup_steps = max(1, int(cfg.kl_warmup_epochs * steps_per_epoch))
        self.step = 0
        self.log_sigma2 = {n: nn.Parameter(torch.full_like(m.weight, cfg.init_log_sigma2, requires_grad=True))
                           for n, m in layers.items()}
        self._handles: list = []

    # -- the training loop's extension points
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p in self.log_sigma2.values():
            p.data = p.data.to(next(iter(self.layers.values())).weight.device)
        group = dict(optimizer.param_groups[0])
        group.update(params=list(self.log_sigma2.values()), weight_decay=0.0)
        optimizer.add_param_group(group)
        self.attach()

    def loss(self, model, inputs, targets, outputs, loss):
        weight = self.cfg.kl_weight * min(1.0, self.step / self.warmup_steps)
        return loss + weight * self.kl() / self.dataset_size

    def after_step(self, model: nn.Module) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "log_sigma2": {n: p.detach().cpu() for n, p in self.log_sigma2.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for n, t in state["log_sigma2"].items():
            self.log_sigma2[n].data.copy_(t)

    # -- the method
    def attach(self) -> None:
        """Add the posterior's noise to each layer's output while it trains (idempotent)."""
        self.detach()
        for n, m in self.layers.items():
            self._handles.append(m.register_forward_hook(self._noise_hook(n)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _noise_hook(self, name: str):
        def hook(module: nn.Module, inputs, output):
            if not module.training:
                return output
            sigma2 = torch.exp(self.log_sigma2[name])
            var = _variance_of_output(module, inputs[0], sigma2)
            return output + torch.sqrt(var + 1e-8) * torch.randn_like(output)
        return hook

    def log_alpha(self, name: str) -> torch.Tensor:
        return log_alpha_of(self.layers[name].weight, self.log_sigma2[name])

    def kl(self) -> torch.Tensor:
        """The approximate KL of every trained weight, summed (the regulariser of the bound)."""
        return -sum(neg_kl_approximation(self.log_alpha(n)).sum() for n in self.layers)

    def masks(self, threshold: float | None = None) -> dict[str, torch.Tensor]:
        """1 where ``log alpha < threshold`` (the weight is kept), 0 where it is dropped."""
        t = self.cfg.threshold if threshold is None else threshold
        with torch.no_grad():
            return {n: (self.log_alpha(n) < t).float() for n in self.layers}


@dataclass
class VariationalReport:
    """Per-layer kept fraction and the mean log alpha, after training."""

    kept: dict[str, float]
    weights: dict[str, int]
    history: list[dict]

    @property
    def sparsity(self) -> float:
        total = sum(self.weights.values())
        return 1.0 - sum(self.kept[n] * self.weights[n] for n in self.kept) / max(total, 1)

    def markdown(self) -> str:
        rows = ["| layer | weights | kept |", "|---|---|---|"]
        rows += [f"| {n} | {self.weights[n]:,} | {self.kept[n]:.2%} |" for n in self.kept]
        return "\n".join(rows)


def variational_prune_(model: nn.Module, train_data, config: VariationalDropoutConfig | None = None, *,
                       device: str | torch.device | None = None, progress: bool = True,
                       checkpoint_path=None) -> VariationalReport:
    """Train ``model`` in place with sparse variational dropout and mask the weights whose log alpha exceeds
    ``config.threshold`` (Molchanov et al. 2017). The masks stay through later fine-tuning; the trained
    means are the kept weights' values."""
    cfg = config or VariationalDropoutConfig()
    layers = select_layers(model, VARIATIONAL_LAYERS, exclude=tuple(cfg.exclude))
    tc = cfg.train_config
    batches = max(1, len(train_data) // tc.batch_size)
    steps_per_epoch = batches if tc.max_steps_per_epoch is None else min(batches, tc.max_steps_per_epoch)
    hook = VariationalDropout(layers, len(train_data), cfg, steps_per_epoch)
    try:
        history = fit(model, train_data, tc, hooks=[hook], device=device, progress=progress,
                      checkpoint_path=checkpoint_path)
    finally:
        hook.detach()
    masks = hook.masks()
    apply_masks_(model, masks)
    kept = {n: float(m.mean()) for n, m in masks.items()}
    return VariationalReport(kept, {n: m.weight.numel() for n, m in layers.items()}, history)

