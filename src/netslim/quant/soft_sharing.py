"""Soft weight-sharing (Ullrich, Meeds & Welling, "Soft Weight-Sharing for Neural Network Compression",
ICLR 2017): pruning and weight sharing in one retraining.

A Gaussian mixture prior over every weight of the selected conv / linear layers is learned together
with the weights (empirical Bayes, §3-4 of the paper): component 0 has its mean fixed at exactly 0 and
its mixing proportion fixed at ``pi_zero``; the other components' means, log-precisions and mixing
proportions are trained, each with its own learning rate, under Gamma hyper-priors on the precisions
(a stronger one on the zero component). The loss is ``cross-entropy + tau / N * (-log p(w) - log p(lambda))``
with ``N`` the number of training examples (the authors' tutorial scales it so).

After training, components closer than ``merge_threshold`` in KL divergence are merged (weighted by their
mixing proportions), the means are rounded to float16 and each weight takes the mean of the component
with the largest responsibility for it; the zero component's weights become exactly 0. Each layer's
result is the weight-sharing parametrization :class:`~netslim.quant.kmeans.SharedWeight` with a codebook
of only the means that layer uses, so centroid fine-tuning, ``.nsz`` encoding and baking work unchanged.

Where the figures come from: the paper (17 components, ``pi_zero`` fixed, ``tau`` around 5e-3) and the
authors' tutorial (KarenUllrich/Tutorial-SoftWeightSharingForNNCompression: ``pi_zero`` 0.99, initial
standard deviation 0.25, Gamma(5000, 2) on the zero component's precision and Gamma(250, 0.1) on the
others', Adam with learning rates 5e-4 weights / 1e-4 means / 3e-3 log-precisions / 3e-3 mixing,
batch 256, merging below a KL divergence of 1e-10, argmax-responsibility quantization).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from ..errors import NetslimError
from ..surgery import bake_parametrizations_
from ..train import TrainConfig, TrainHook, fit
from .kmeans import SharedWeight, shareable_layers

LOG_2PI = math.log(2 * math.pi)
CHUNK = 1 << 18  # weights x components evaluated at once: bounds the memory, and stays in cache (2x faster)

# Gamma(alpha, rate beta) hyper-priors on the precisions (the tutorial's): the zero component's, the others'
PRECISION_PRIOR_ZERO = (5000.0, 2.0)
PRECISION_PRIOR = (250.0, 0.1)
# the tutorial's retraining: Adam, lr 5e-4 for the weights, no weight decay (the prior replaces it), batch 256,
# a constant learning rate
SOFT_SHARING_TRAIN = {"optimizer": "adam", "lr": 5e-4, "weight_decay": 0.0, "batch_size": 256,
                      "schedule": "constant", "epochs": 30}


# ------------------------------------------------------------------ the prior's negative log density
def _log_terms(w: Tensor, means: Tensor, log_precisions: Tensor, log_mix: Tensor) -> tuple[Tensor, Tensor]:
    """``a[j, i] = log pi_j + log N(w_i | mu_j, 1 / lambda_j)`` and ``d[j, i] = w_i - mu_j`` (components x
    weights: each row is contiguous over the weights, which vectorizes and reduces well)."""
    d = w[None, :] - means[:, None]
    a = d * d
    a.mul_((0.5 * log_precisions.exp())[:, None])
    return (log_mix + 0.5 * (log_precisions - LOG_2PI))[:, None] - a, d


class _MixtureNegLogProb(torch.autograd.Function):
    """``-sum_i log sum_j pi_j N(w_i | mu_j, 1/lambda_j)`` with the closed-form gradient (responsibilities
    ``r_ji``): d/dw_i = sum_j r_ji lambda_j (w_i - mu_j); d/dmu_j = -sum_i r_ji lambda_j (w_i - mu_j);
    d/dlog lambda_j = -sum_i r_ji (1 - lambda_j (w_i - mu_j)^2) / 2; d/dlog pi_j = -sum_i r_ji.

    The gradients are computed in the same pass as the value (in chunks of :data:`CHUNK` weights x
    components, so the table never exists whole) and only they are kept for the backward pass."""

    @staticmethod
    def forward(ctx, w: Tensor, means: Tensor, log_precisions: Tensor, log_mix: Tensor) -> Tensor:
        flat = w.detach().reshape(-1)
        means, log_precisions, log_mix = means.detach(), log_precisions.detach(), log_mix.detach()
        need = any(ctx.needs_input_grad)
        precisions = log_precisions.exp()
        grads = (torch.empty_like(flat), torch.zeros_like(means), torch.zeros_like(log_precisions),
                 torch.zeros_like(log_mix)) if need else None
        total = flat.new_zeros(())
        step = max(1, CHUNK // max(means.numel(), 1))
        for i in range(0, flat.numel(), step):
            a, d = _log_terms(flat[i:i + step], means, log_precisions, log_mix)
            peak = a.max(0).values
            r = a.sub_(peak).exp_()  # unnormalised responsibilities
            norm = r.sum(0)
            total -= (norm.log() + peak).sum()
            if grads is not None:
                r.div_(norm)
                r_mix = r.sum(1)
                rld = r.mul_(d).mul_(precisions[:, None])  # r * lambda * d, in r's memory
                grads[0][i:i + step] = rld.sum(0)
                grads[1].sub_(rld.sum(1))
                grads[2].sub_(0.5 * (r_mix - rld.mul_(d).sum(1)))
                grads[3].sub_(r_mix)
        if grads is not None:
            ctx.save_for_backward(*grads)
        ctx.shape = w.shape
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        grad_w, grad_mu, grad_s, grad_mix = ctx.saved_tensors
        return (grad * grad_w).view(ctx.shape), grad * grad_mu, grad * grad_s, grad * grad_mix


def mixture_neg_log_prob(w: Tensor, means: Tensor, log_precisions: Tensor, log_mix: Tensor) -> Tensor:
    """``-sum_i log sum_j exp(log_mix_j) N(w_i | means_j, exp(-log_precisions_j))`` over every element of
    ``w``, computed stably (log-sum-exp) with a closed-form backward for all four inputs."""
    return _MixtureNegLogProb.apply(w, means, log_precisions, log_mix)


def gamma_neg_log_prob(log_precisions: Tensor, alpha: float, beta: float) -> Tensor:
    """``-sum log Gamma(lambda | alpha, rate beta)`` of the precisions ``lambda = exp(log_precisions)``."""
    return (math.lgamma(alpha) - alpha * math.log(beta) + (1 - alpha) * log_precisions
            + beta * log_precisions.exp()).sum()


# ------------------------------------------------------------------ configuration
def _pair(name: str, value) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0)
                   for v in value)):
        raise NetslimError(f"{name} must be [alpha, beta], two positive numbers (a Gamma prior on the precision), "
                           f"got {value!r}")
    return [float(value[0]), float(value[1])]


@dataclass
class SoftSharingConfig:
    """Soft weight-sharing (Ullrich et al. 2017); the ``quantize`` stage's ``method: soft_sharing`` takes these
    fields as they are.

    ``components``: mixture components including the zero one (the paper: 17); ``pi_zero``: the zero
    component's fixed mixing proportion (tutorial 0.99); ``tau``: weight of the prior's negative log density
    (plus the hyper-prior's) divided by the number of training examples; ``init_std``: initial standard
    deviation of every component (tutorial 0.25; ``None``: the spacing of the initial means, which are
    spaced evenly over the weights' range); ``lr_means``, ``lr_log_precisions``, ``lr_mixing``: Adam
    learning rates of the mixture (tutorial 1e-4, 3e-3, 3e-3; they follow the weights' schedule);
    ``precision_prior_zero`` / ``precision_prior``: ``[alpha, beta]`` of the Gamma hyper-priors (rate
    ``beta``) on the zero component's precision and the others' (tutorial [5000, 2] and [250, 0.1]);
    ``merge_threshold``: components whose KL divergence (either way) is below it are merged after training;
    ``include_bias``: biases too (excluded by default); ``exclude``: layers left alone; ``train``:
    :class:`~netslim.train.TrainConfig` fields over :data:`SOFT_SHARING_TRAIN` (Adam, lr 5e-4 for the
    weights, no weight decay, batch 256, constant learning rate, 30 epochs: the tutorial's)."""

    components: int = 17
    pi_zero: float = 0.99
    tau: float = 0.005
    init_std: float | None = 0.25
    lr_means: float = 1e-4
    lr_log_precisions: float = 3e-3
    lr_mixing: float = 3e-3
    precision_prior_zero: list[float] = field(default_factory=lambda: list(PRECISION_PRIOR_ZERO))
    precision_prior: list[float] = field(default_factory=lambda: list(PRECISION_PRIOR))
    merge_threshold: float = 1e-10
    include_bias: bool = False
    exclude: list[str] = field(default_factory=list)
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = self.components
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 4096:
            raise NetslimError(f"components must be an integer in 2..4096 (the zero component included), "
                               f"got {self.components!r}")
        numbers = {"pi_zero": self.pi_zero, "tau": self.tau, "lr_means": self.lr_means,
                   "lr_log_precisions": self.lr_log_precisions, "lr_mixing": self.lr_mixing,
                   "merge_threshold": self.merge_threshold}
        if self.init_std is not None:
            numbers["init_std"] = self.init_std
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NetslimError(f"{name} must be a number, got {value!r}")
        if not 0 < self.pi_zero < 1:
            raise NetslimError(f"pi_zero must be in (0, 1), got {self.pi_zero}")
        if self.tau < 0 or self.merge_threshold < 0:
            raise NetslimError(f"tau and merge_threshold must be >= 0, got {self.tau} and {self.merge_threshold}")
        for name in ("init_std", "lr_means", "lr_log_precisions", "lr_mixing"):
            if name in numbers and numbers[name] <= 0:
                raise NetslimError(f"{name} must be > 0, got {numbers[name]}")
        self.precision_prior_zero = _pair("precision_prior_zero", self.precision_prior_zero)
        self.precision_prior = _pair("precision_prior", self.precision_prior)
        if not isinstance(self.include_bias, bool):
            raise NetslimError(f"include_bias must be true or false, got {self.include_bias!r}")
        if isinstance(self.exclude, str):
            raise NetslimError(f"exclude must be a list of layer names, got the string {self.exclude!r}; "
                               f"write [{self.exclude!r}]")
        if not isinstance(self.train, dict):
            raise NetslimError(f"train must be a mapping of TrainConfig fields, got {self.train!r}")
        self.train_config()

    def train_config(self) -> TrainConfig:
        """The retraining's :class:`~netslim.train.TrainConfig`: ``train`` over :data:`SOFT_SHARING_TRAIN`."""
        try:
            return TrainConfig(**{**SOFT_SHARING_TRAIN, **self.train})
        except TypeError as exc:
            raise NetslimError(f"train: {exc}") from None


# ------------------------------------------------------------------ the prior
class GaussianMixturePrior(nn.Module):
    """The mixture over weights: component 0 at mean 0 with mixing proportion ``pi_zero`` (both fixed); the
    other ``J - 1`` components' ``means``, ``log_precisions`` (all ``J``; the zero component's precision is
    learned too) and mixing ``logits`` (a softmax, scaled by ``1 - pi_zero``) are parameters."""

    def __init__(self, means: Tensor, log_precisions: Tensor, pi_zero: float,
                 precision_prior_zero: Sequence[float] = PRECISION_PRIOR_ZERO,
                 precision_prior: Sequence[float] = PRECISION_PRIOR) -> None:
        super().__init__()
        if log_precisions.numel() != means.numel() + 1:
            raise NetslimError("a mixture needs one log-precision per component, the zero component's first")
        self.means = nn.Parameter(means.detach().clone().float())
        self.log_precisions = nn.Parameter(log_precisions.detach().clone().float())
        self.logits = nn.Parameter(torch.zeros(means.numel()))
        self.pi_zero = float(pi_zero)
        self.precision_prior_zero = _pair("precision_prior_zero", precision_prior_zero)
        self.precision_prior = _pair("precision_prior", precision_prior)

    @classmethod
    def for_weights(cls, weights: Tensor, cfg: SoftSharingConfig) -> GaussianMixturePrior:
        """The paper's initialisation: the non-zero means spaced evenly over the weights' range, every
        component with standard deviation ``cfg.init_std`` (``None``: the spacing of the means), equal
        mixing proportions."""
        w = weights.detach().float()
        lo, hi = (float(w.min()), float(w.max())) if w.numel() else (-1.0, 1.0)
        if lo == hi:
            lo, hi = lo - 1.0, hi + 1.0
        means = torch.linspace(lo, hi, cfg.components - 1)
        std = cfg.init_std if cfg.init_std is not None else (hi - lo) / max(cfg.components - 2, 1)
        log_precisions = torch.full((cfg.components,), -2 * math.log(std))
        return cls(means, log_precisions, cfg.pi_zero, cfg.precision_prior_zero, cfg.precision_prior)

    @property
    def num_components(self) -> int:
        return self.log_precisions.numel()

    def mixture(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(means, log_precisions, log mixing proportions)``, one entry per component, the zero one first."""
        means = torch.cat([self.means.new_zeros(1), self.means])
        log_mix = torch.cat([self.logits.new_full((1,), math.log(self.pi_zero)),
                             math.log1p(-self.pi_zero) + torch.log_softmax(self.logits, 0)])
        return means, self.log_precisions, log_mix

    def neg_log_prob(self, weights: Tensor) -> Tensor:
        """``-log p(w)`` summed over ``weights`` (float32, whatever autocast says)."""
        means, log_precisions, log_mix = self.mixture()
        return mixture_neg_log_prob(weights.float(), means, log_precisions, log_mix)

    def neg_log_hyperprior(self) -> Tensor:
        """``-log p(lambda)``: the Gamma hyper-priors on the precisions."""
        return (gamma_neg_log_prob(self.log_precisions[:1], *self.precision_prior_zero)
                + gamma_neg_log_prob(self.log_precisions[1:], *self.precision_prior))

    @torch.no_grad()
    def assign(self, weights: Tensor, threshold: float | None = None) -> Tensor:
        """The component with the largest responsibility for each weight (0: the zero component), after
        merging at ``threshold`` when one is given (indices into :func:`merge_components`' output then)."""
        mixture = [t.detach() for t in self.mixture()]
        if threshold is not None:
            mixture = merge_components(*mixture, threshold)[:3]
        return assign_components(weights, *mixture)


def kl_divergence(means: Tensor, log_precisions: Tensor) -> Tensor:
    """``KL[i, j] = KL(N(mu_i, 1/lambda_i) || N(mu_j, 1/lambda_j))`` for every pair of components."""
    s, mu = log_precisions.double(), means.double()
    lam = s.exp()
    gap = mu[:, None] - mu[None, :]
    return 0.5 * (s[:, None] - s[None, :]) + 0.5 * lam[None, :] * (1 / lam[:, None] + gap * gap) - 0.5


@torch.no_grad()
def merge_components(means: Tensor, log_precisions: Tensor, log_mix: Tensor,
                     threshold: float) -> tuple[Tensor, Tensor, Tensor, list[list[int]]]:
    """Merge every pair of components whose KL divergence (either way) is below ``threshold``, transitively
    (the authors' post-processing): a group's mixing proportion is the sum of its members', its mean and
    precision their averages weighted by the mixing proportions. The group holding component 0 keeps mean
    exactly 0 and comes first. Returns ``(means, log_precisions, log_mix, groups)``."""
    kl = kl_divergence(means, log_precisions)
    close = (kl < threshold) | (kl.T < threshold)
    parent = list(range(means.numel()))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in close.nonzero().tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the zero component (0) stays the root of its group
    groups: dict[int, list[int]] = {}
    for i in range(means.numel()):
        groups.setdefault(root(i), []).append(i)
    ordered = [groups[r] for r in sorted(groups)]
    new_means, new_s, new_mix = [], [], []
    for members in ordered:
        idx = torch.tensor(members, device=means.device)
        p = torch.softmax(log_mix[idx].double(), 0)
        new_means.append(torch.zeros((), dtype=torch.float64, device=means.device) if 0 in members
                         else (p * means[idx].double()).sum())
        new_s.append((p * log_precisions[idx].double().exp()).sum().log())
        new_mix.append(torch.logsumexp(log_mix[idx].double(), 0))
    dtype = means.dtype
    return (torch.stack(new_means).to(dtype), torch.stack(new_s).to(dtype), torch.stack(new_mix).to(dtype), ordered)


@torch.no_grad()
def assign_components(weights: Tensor, means: Tensor, log_precisions: Tensor, log_mix: Tensor) -> Tensor:
    """Index of the component with the largest responsibility for each weight (shape of ``weights``)."""
    flat = weights.detach().reshape(-1).to(means.dtype)
    step = max(1, CHUNK // max(means.numel(), 1))
    out = torch.empty(flat.numel(), dtype=torch.long, device=flat.device)
    for i in range(0, flat.numel(), step):
        out[i:i + step] = _log_terms(flat[i:i + step], means, log_precisions, log_mix)[0].argmax(0)
    return out.view(weights.shape)


# ------------------------------------------------------------------ retraining under the prior
def prior_tensors(layers: dict[str, nn.Module], include_bias: bool = False) -> dict[str, Tensor]:
    """The tensors the prior covers, by name (``fc1.weight``, and ``fc1.bias`` with ``include_bias``)."""
    out = {}
    for name, module in layers.items():
        out[f"{name}.weight" if name else "weight"] = module.weight
        if include_bias and getattr(module, "bias", None) is not None:
            out[f"{name}.bias" if name else "bias"] = module.bias
    return out


class SoftSharingHook(TrainHook):
    """Adds ``tau / num_train * (-log p(w) - log p(lambda))`` to the loss of :func:`netslim.train.fit` and
    trains the prior: its means, log-precisions and mixing logits join the optimizer as three groups with
    their own learning rates (scaled by the weights' schedule). Its state is saved in fit's checkpoints."""

    def __init__(self, prior: GaussianMixturePrior, layers: dict[str, nn.Module], cfg: SoftSharingConfig,
                 num_train: int) -> None:
        if num_train < 1:
            raise NetslimError("soft weight-sharing needs a non-empty training set")
        self.prior, self.layers, self.cfg = prior, layers, cfg
        self.scale = cfg.tau / num_train
        self.optimizer: torch.optim.Optimizer | None = None
        self.groups: list[tuple[int, float]] = []
        self.base_lr = 1.0
        self._sum, self._steps = 0.0, 0
        self.epoch_means: dict[int, float] = {}

    def weights(self) -> Tensor:
        return torch.cat([t.reshape(-1) for t in prior_tensors(self.layers, self.cfg.include_bias).values()])

    def complexity(self) -> Tensor:
        """``-log p(w) - log p(lambda)`` of the current weights and prior."""
        return self.prior.neg_log_prob(self.weights()) + self.prior.neg_log_hyperprior()

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.prior.to(self.weights().device)
        self.optimizer = optimizer
        self.base_lr = optimizer.param_groups[0]["lr"]
        self.groups = []
        for param, lr in ((self.prior.means, self.cfg.lr_means),
                          (self.prior.log_precisions, self.cfg.lr_log_precisions),
                          (self.prior.logits, self.cfg.lr_mixing)):
            optimizer.add_param_group({"params": [param], "lr": lr, "weight_decay": 0.0})
            self.groups.append((len(optimizer.param_groups) - 1, lr))

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor, outputs: Tensor, loss: Tensor) -> Tensor:
        if self.optimizer is not None:  # fit schedules its own groups; ours follow the same factor
            factor = self.optimizer.param_groups[0]["lr"] / self.base_lr
            for index, lr in self.groups:
                self.optimizer.param_groups[index]["lr"] = lr * factor
        with torch.autocast(device_type=loss.device.type, enabled=False):
            complexity = self.complexity()
        self._sum = self._sum + complexity.detach()
        self._steps += 1
        return loss + self.scale * complexity

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.epoch_means[epoch + 1] = float(self._sum) / max(self._steps, 1)
        self._sum, self._steps = 0.0, 0

    def state_dict(self) -> dict:
        return {"prior": {k: v.detach().cpu().clone() for k, v in self.prior.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.prior.load_state_dict(state["prior"])  # in place: the optimizer keeps the same tensors

    def annotate(self, history: list[dict]) -> list[dict]:
        """Add ``complexity`` (the epoch's mean ``-log p(w) - log p(lambda)``) to the epochs trained in this call."""
        for record in history:
            if record["epoch"] in self.epoch_means:
                record["complexity"] = self.epoch_means[record["epoch"]]
        return history


# ------------------------------------------------------------------ quantization to the prior
@dataclass
class SharingReport:
    """What soft weight-sharing did: components before and after merging, the merged means as stored
    (float16 values, the zero component's 0 first) and, per quantized tensor, its elements, the fraction
    that is zero and its distinct non-zero values (its codebook); ``history``: the retraining's epochs."""

    components: int
    merged_components: int
    means: list[float]
    elements: dict[str, int] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)
    distinct: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @property
    def total_sparsity(self) -> float:
        """The fraction of every quantized element that is zero."""
        return sum(self.sparsity[n] * self.elements[n] for n in self.elements) / max(sum(self.elements.values()), 1)

    def table(self) -> str:
        lines = ["| tensor | elements | zeros | distinct non-zero values |", "|---|---|---|---|"]
        lines += [f"| {n} | {self.elements[n]:,} | {self.sparsity[n]:.2%} | {self.distinct[n]} |"
                  for n in self.elements]
        return "\n".join(lines)


def share_by_prior_(model: nn.Module, prior: GaussianMixturePrior, merge_threshold: float = 1e-10,
                    exclude: Sequence[str] = (), include_bias: bool = False) -> SharingReport:
    """Quantize the prior's tensors: merge components (``merge_threshold``), round the means to float16 and
    give every weight the mean of its most responsible component (exact zeros stay zero); each tensor
    becomes a :class:`SharedWeight` parametrization with the codebook of the means it uses."""
    layers = shareable_layers(model, tuple(exclude))
    for module in layers.values():
        bake_parametrizations_(module)
    means, log_precisions, log_mix = (t.detach().double() for t in prior.mixture())
    merged_means, merged_s, merged_mix, _ = merge_components(means, log_precisions, log_mix, merge_threshold)
    stored = merged_means.to(torch.float16).float()
    if not torch.isfinite(stored).all():
        raise NetslimError(f"a mixture mean is beyond float16's range: {merged_means.tolist()}")
    report = SharingReport(prior.num_components, merged_means.numel(), stored.tolist())
    for name, tensor in prior_tensors(layers, include_bias).items():
        w = tensor.detach()
        if not torch.isfinite(w).all():
            raise NetslimError(f"{name} contains NaN or infinity; cannot share it")
        comp = assign_components(w.double(), merged_means, merged_s, merged_mix)
        values = torch.where(w == 0, torch.zeros((), device=w.device), stored.to(w.device)[comp])
        codebook = values[values != 0].unique()  # sorted
        indices = torch.where(values == 0, torch.zeros_like(comp),
                              torch.searchsorted(codebook, values.contiguous()) + 1)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        getattr(module, attr).requires_grad_(False)
        parametrize.register_parametrization(module, attr, SharedWeight(codebook.cpu(), indices.cpu()), unsafe=True)
        module.to(w.device)
        report.elements[name] = w.numel()
        report.sparsity[name] = float((values == 0).float().mean())
        report.distinct[name] = int(codebook.numel())
    return report


def restore_soft_shared_(model: nn.Module, codebook_sizes: dict[str, int]) -> nn.Module:
    """Rebuild the parametrizations :func:`share_by_prior_` made (``codebook_sizes``: tensor name -> values),
    for a ``state_dict`` loaded afterwards."""
    for name, k in codebook_sizes.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        bake_parametrizations_(module)
        tensor = getattr(module, attr)
        tensor.requires_grad_(False)
        parametrize.register_parametrization(
            module, attr, SharedWeight(torch.zeros(int(k)), torch.zeros_like(tensor, dtype=torch.long)), unsafe=True)
    return model


def soft_weight_sharing_(model: nn.Module, train_data: Dataset | DataLoader, config: SoftSharingConfig | None = None,
                         *, device: str | torch.device | None = None, progress: bool = True,
                         checkpoint_path: str | Path | None = None,
                         hooks: Sequence[TrainHook] = ()) -> SharingReport:
    """Soft weight-sharing (Ullrich et al. 2017) of ``model`` in place: retrain under a learned Gaussian
    mixture prior (:class:`SoftSharingHook`, ``config.train``), then merge components and quantize every
    selected weight to its most responsible component's float16 mean (:func:`share_by_prior_`).

    With ``checkpoint_path`` the retraining writes a checkpoint per epoch (prior included) and a restarted
    call resumes it. Returns the :class:`SharingReport`; ``model`` holds :class:`SharedWeight`
    parametrizations afterwards (a ``finetune`` trains their codebooks, :func:`netslim.encode.save` stores them).
    """
    cfg = config or SoftSharingConfig()
    layers = shareable_layers(model, tuple(cfg.exclude))
    if not layers:
        raise NetslimError("soft weight-sharing found no conv or linear layer to share (all excluded?)")
    tensors = prior_tensors(layers, cfg.include_bias)
    prior = GaussianMixturePrior.for_weights(torch.cat([t.detach().reshape(-1) for t in tensors.values()]), cfg)
    num_train = len(train_data.dataset) if isinstance(train_data, DataLoader) else len(train_data)
    hook = SoftSharingHook(prior, layers, cfg, num_train)
    history = fit(model, train_data, cfg.train_config(), hooks=[hook, *hooks], device=device, progress=progress,
                  checkpoint_path=checkpoint_path)
    report = share_by_prior_(model, prior, cfg.merge_threshold, cfg.exclude, cfg.include_bias)
    report.history = hook.annotate(history)
    return report


__all__ = ["SoftSharingConfig", "SOFT_SHARING_TRAIN", "PRECISION_PRIOR_ZERO", "PRECISION_PRIOR", "GaussianMixturePrior",
           "SoftSharingHook", "SharingReport",
           "mixture_neg_log_prob", "gamma_neg_log_prob", "kl_divergence", "merge_components", "assign_components",
           "share_by_prior_", "restore_soft_shared_", "soft_weight_sharing_", "prior_tensors"]
