"""Calibration: the clipping range ``[lo, hi]`` of each tensor for post-training quantization.

Activations are observed on a few hundred calibration images through :class:`RangeCollector`
(one per tensor, ``update`` once per batch); weights are static, see :func:`weight_range`.

* ``minmax``: the extremes seen (Jacob et al. 2018).
* ``moving_average``: exponential moving average of each batch's min and max (the idea of
  ``torch.ao.quantization.MovingAverageMinMaxObserver``).
* ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles, and ``mse``: the shrunk
  ``[a * min, a * max]`` with the least quantization MSE (both evaluated by Wu et al. 2020, "Integer
  Quantization for Deep Learning Inference: Principles and Empirical Evaluation").
* ``kl``: TensorRT's entropy calibration (Migacz 2017, "8-bit Inference with TensorRT").
* ``aciq``: analytical clipping for a Laplace prior (Banner, Nahshan & Soudry 2019, "Post training
  4-bit quantization of convolutional networks for rapid-deployment").

The last four need the distribution of values: a uniform random subsample of at most
``max_samples`` values (reservoir sampling, Vitter 1985, Algorithm R) keeps memory bounded
whatever the number of batches.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..errors import NetslimError, unknown_choice
from .qspec import QuantSpec, qparams

CALIBRATORS = ("minmax", "moving_average", "percentile", "mse", "kl", "aciq")
WEIGHT_CALIBRATORS = ("minmax", "mse")
_SAMPLED = ("percentile", "mse", "kl", "aciq")
_KL_BINS = 2048


class RangeCollector:
    """Accumulates the statistics of one activation tensor over calibration batches and turns them
    into a clipping range [lo, hi] for a QuantSpec."""

    def __init__(self, method: str = "minmax", spec: QuantSpec = QuantSpec(8, symmetric=False),
                 percentile: float = 99.99, momentum: float = 0.9, max_samples: int = 2**20, seed: int = 0) -> None:
        if method not in CALIBRATORS:
            raise unknown_choice("calibrator", method, CALIBRATORS)
        if not 50.0 < percentile <= 100.0:
            raise NetslimError(f"percentile must be in (50, 100], got {percentile!r}")
        if not 0.0 <= momentum < 1.0:
            raise NetslimError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 1 <= max_samples <= 2**24:  # torch.quantile's input limit
            raise NetslimError(f"max_samples must be in 1..2**24, got {max_samples!r}")
        self.method, self.spec, self.percentile, self.momentum = method, spec, percentile, momentum
        self.max_samples, self.seed = max_samples, seed
        self._batches = self._seen = 0
        self._min = self._max = self._avg_min = self._avg_max = None
        self._samples: Tensor | None = None
        self._generator: torch.Generator | None = None

    @property
    def batches(self) -> int:
        return self._batches

    @property
    def num_samples(self) -> int:
        """How many values the reservoir holds now (at most ``max_samples``)."""
        return 0 if self._samples is None else self._samples.numel()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add one batch of the tensor (any shape); empty batches are ignored."""
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        lo, hi = x.min(), x.max()
        if self._batches == 0:
            self._min, self._max, self._avg_min, self._avg_max = lo, hi, lo, hi
        else:
            m = self.momentum
            self._min, self._max = torch.minimum(self._min, lo), torch.maximum(self._max, hi)
            self._avg_min = m * self._avg_min + (1 - m) * lo
            self._avg_max = m * self._avg_max + (1 - m) * hi
        if self.method in _SAMPLED:
            self._add_to_reservoir(x)
        self._batches += 1

    def _add_to_reservoir(self, x: Tensor) -> None:
        """Algorithm R, vectorized: value number ``t`` (1-based, over all batches) past the first
        ``max_samples`` replaces a uniformly chosen slot with probability ``max_samples / t``."""
        if self._generator is None:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
            self._samples = x.new_empty(0)
        room = self.max_samples - self._samples.numel()
        if room > 0:
            self._samples = torch.cat([self._samples, x[:room]])
            self._seen += min(room, x.numel())
            x = x[room:]
        if x.numel() == 0:
            return
        t = self._seen + 1 + torch.arange(x.numel(), device=x.device, dtype=torch.float64)
        self._seen += x.numel()
        u = torch.rand(x.numel(), generator=self._generator, device=x.device, dtype=torch.float64)
        accepted = (u < self.max_samples / t).nonzero().squeeze(1)
        slots = torch.randint(self.max_samples, (accepted.numel(),), generator=self._generator, device=x.device)
        slots, order = torch.sort(slots, stable=True)  # equal slots keep stream order: the last one wins
        last = torch.ones_like(slots, dtype=torch.bool)
        last[:-1] = slots[1:] != slots[:-1]
        self._samples[slots[last]] = x[accepted[order[last]]]

    @torch.no_grad()
    def range(self) -> tuple[Tensor, Tensor]:
        """The clipping range as two 0-d float tensors, never wider than the values seen (and 0)."""
        if self._batches == 0:
            raise NetslimError(f"no calibration batches seen by this {self.method!r} collector: call update() first")
        if self.method == "minmax":
            return self._min.clone(), self._max.clone()
        if self.method == "moving_average":
            return self._avg_min.clone(), self._avg_max.clone()
        lo, hi = getattr(self, f"_{self.method}_range")()
        zero = torch.zeros_like(self._min)  # [min, max] widened to 0: lo = 0 stays for nonnegative data
        return torch.maximum(lo.to(zero), self._min.minimum(zero)), torch.minimum(hi.to(zero), self._max.maximum(zero))

    def _nonnegative(self) -> bool:
        return bool(self._min >= 0)

    def _percentile_range(self) -> tuple[Tensor, Tensor]:
        p = self.percentile / 100.0
        lo, hi = torch.quantile(self._samples, torch.tensor([1.0 - p, p], device=self._samples.device))
        return (torch.zeros_like(lo) if self._nonnegative() else lo), hi

    def _mse_range(self) -> tuple[Tensor, Tensor]:
        lo, hi = _shrink_to_min_mse(self._samples[None], self._min[None], self._max[None], self.spec)
        return lo[0], hi[0]

    def _kl_range(self) -> tuple[Tensor, Tensor]:
        """Threshold ``t`` from a 2048-bin histogram of ``|x|`` on ``[0, max |x|]``: ``[-t, t]``, or
        ``[0, t]`` for nonnegative data. Exact zeros (ReLU) are left out: any grid represents them
        exactly, and their spike in bin 0 would otherwise decide the merging."""
        nonneg = self._nonnegative()
        amax = self._max if nonneg else torch.maximum(-self._min, self._max)
        values = self._samples[self._samples != 0].abs()  # zeros are exact on every grid (qparams)
        hist = torch.histc(values, bins=_KL_BINS, min=0.0, max=float(amax)).cpu().double()
        t = kl_threshold_bin(hist, _grid_points_above_zero(self.spec, nonneg)) * amax / _KL_BINS
        return (torch.zeros_like(t) if nonneg else -t), t

    def _aciq_range(self) -> tuple[Tensor, Tensor]:
        """Laplace fit: ``mu`` = median, ``b`` = mean ``|x - mu|`` (maximum likelihood), range
        ``mu -+ alpha``; nonnegative data: ``[0, alpha]`` (see :func:`aciq_clip_ratio`)."""
        x = self._samples
        if self._nonnegative():  # ReLU(Laplace(0, b)): b is the mean of the positive values
            positive = x[x > 0]
            b = positive.mean() if positive.numel() else x.new_zeros(())
            return torch.zeros_like(b), aciq_clip_ratio(self.spec.bits, one_sided=True) * b
        mu = x.median()
        alpha = aciq_clip_ratio(self.spec.bits) * (x - mu).abs().mean()
        return mu - alpha, mu + alpha


def weight_range(w: Tensor, spec: QuantSpec, method: str = "minmax") -> tuple[Tensor, Tensor]:
    """Per-tensor (0-d) or per-channel (1-d along spec.axis) range of a weight: 'minmax' or 'mse'
    (per channel, the clipping that minimizes the quantization MSE of that channel)."""
    if method not in WEIGHT_CALIBRATORS:
        raise unknown_choice("weight calibrator", method, WEIGHT_CALIBRATORS)
    w = w.detach().float()
    rows = w.movedim(spec.axis, 0).reshape(w.shape[spec.axis], -1) if spec.per_channel else w.reshape(1, -1)
    lo, hi = rows.amin(1), rows.amax(1)
    if method == "mse":
        with torch.no_grad():
            lo, hi = _shrink_to_min_mse(rows, lo, hi, spec)
    return (lo, hi) if spec.per_channel else (lo[0], hi[0])


def _row_mse(rows: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Tensor:
    """Quantization MSE of each row of ``rows`` on the grid of its own ``[lo, hi]``: the same values
    as ``quantization_mse`` row by row, computed in place (several times faster)."""
    scale, zero_point = qparams(lo, hi, spec)
    s, z = scale[:, None], zero_point[:, None].to(rows.dtype)
    q = torch.div(rows, s).round_().add_(z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s)
    return q.sub_(rows).pow_(2).mean(1)


def _shrink_to_min_mse(rows: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per row, the ``[a * lo, a * hi]`` (``a`` in (0, 1]) with the least quantization MSE: 20 factors
    ``k / 20``, then 21 around each row's best one step 0.005 (41 evaluations, a 0.005 resolution).
    ``a = 1`` is a candidate, so the result is never worse than min/max."""
    spec = replace(spec, per_channel=True, axis=0)

    def best_factor(factors: Tensor) -> Tensor:  # factors: (K, rows) -> (rows,)
        errors = torch.stack([_row_mse(rows, a * lo, a * hi, spec) for a in factors])
        return factors.gather(0, errors.argmin(0, keepdim=True))[0]

    coarse = torch.arange(1, 21, device=rows.device, dtype=rows.dtype)[:, None] / 20
    a = best_factor(coarse.expand(-1, rows.shape[0]))
    fine = (a[None] + torch.linspace(-0.05, 0.05, 21, device=rows.device)[:, None]).clamp(0.0025, 1.0)
    a = best_factor(fine)
    return a * lo, a * hi


def _grid_points_above_zero(spec: QuantSpec, nonneg: bool) -> int:
    """Quantization levels available to ``[0, t]``: the whole grid for nonnegative data on an
    unsigned grid, else its positive half."""
    if spec.symmetric:
        return spec.qmax + 1
    return spec.levels if nonneg else spec.levels // 2


def kl_threshold_bin(hist: Tensor, levels: int) -> int:
    """TensorRT entropy calibration (Migacz 2017): the number of histogram bins ``i`` to keep.

    For every ``i`` from ``levels`` to ``len(hist)``: reference ``P = hist[:i]`` with the outliers
    ``sum(hist[i:])`` added to its last bin; candidate ``Q`` = ``hist[:i]`` merged into ``levels``
    bins (the last one takes the remainder) and spread back evenly over the non-empty bins of
    each merged bin. Returns the ``i`` minimizing ``KL(P || Q)`` (threshold ``i * bin_width``).
    """
    n = hist.numel()
    if levels >= n or not hist.sum() > 0:
        return n
    candidates = torch.arange(levels, n + 1)
    return int(candidates[_kl_divergences(hist.double(), candidates, levels).argmin()])


def _kl_divergences(hist: Tensor, keep: Tensor, levels: int) -> Tensor:
    """``KL(P || Q)`` of :func:`kl_threshold_bin` for every candidate in ``keep``, from prefix sums.

    With ``S = sum(hist)``, ``h'`` = the bins of P before normalization, ``M_j, c_j`` the mass and
    the non-empty bin count of merged bin ``j`` and ``K = sum(hist[:i])``:
    ``KL = (sum h' log h' - sum_j M_j log(M_j / (c_j K)) - tail log q_last) / S - log S``, where the
    outliers ``tail`` meet ``q_last`` (the normalized Q of bin ``i - 1``, 1e-12 when that bin is
    empty). Cost: (candidates x levels) instead of (candidates x bins).
    """
    zero = hist.new_zeros(1)
    mass_cum = torch.cat([zero, hist.cumsum(0)])  # mass_cum[k] = sum(hist[:k])
    count_cum = torch.cat([zero, (hist > 0).to(hist.dtype).cumsum(0)])
    hlogh_cum = torch.cat([zero, torch.xlogy(hist, hist).cumsum(0)])
    total, kept = mass_cum[-1], mass_cum[keep]
    tail, last = total - kept, hist[keep - 1]
    edges = torch.arange(levels + 1) * (keep // levels)[:, None]
    edges[:, -1] = keep  # the last merged bin takes the remainder
    mass, count = mass_cum[edges].diff(dim=1), count_cum[edges].diff(dim=1)
    p_log_p = hlogh_cum[keep - 1] + torch.xlogy(last + tail, last + tail)
    q_last = torch.where(last > 0, mass[:, -1] / (count[:, -1].clamp_min(1) * kept), 1e-12)
    p_log_q = torch.xlogy(mass, mass / (count.clamp_min(1) * kept[:, None])).sum(1) + torch.xlogy(tail, q_last)
    divergence = (p_log_p - p_log_q) / total - total.log()
    return torch.where(kept > 0, divergence, math.inf)


def aciq_clip_ratio(bits: int, one_sided: bool = False) -> float:
    """ACIQ's optimal clipping ``alpha / b`` for a Laplace(mu, b) tensor on a ``bits``-bit grid.

    Two-sided (Banner et al. 2019, range ``[mu - alpha, mu + alpha]``): clipping each tail costs
    ``int_alpha^inf (x - alpha)^2 e^(-x/b) / 2b dx = b^2 e^(-alpha/b)`` and rounding on the step
    ``2 alpha / 2^bits`` costs ``step^2 / 12``, so ``MSE = 2 b^2 e^(-alpha/b) + alpha^2 / (3 * 4^bits)``.
    One-sided (post-ReLU values ``max(0, Laplace(0, b))``, range ``[0, alpha]``): one tail,
    ``b^2 e^(-alpha/b)``, and the step ``alpha / 2^bits``, so ``MSE = b^2 e^(-alpha/b) + alpha^2 /
    (12 * 4^bits)`` (rounding noise counted on all values as in the two-sided form; the exact zeros
    would halve it). Setting the derivative to zero, ``r = alpha / b`` solves ``r e^r = c 4^bits``
    with ``c = 3`` (two-sided) or ``6`` (one-sided): Newton on ``r + ln r = ln(c 4^bits)`` (the
    MSE is convex in ``alpha``, so this is its unique minimum). Two-sided: 2.83, 3.89, 5.03 at
    2, 3, 4 bits, 9.89 at 8 bits.
    """
    log_z = math.log(6.0 if one_sided else 3.0) + bits * math.log(4.0)
    r = log_z - math.log(log_z)
    for _ in range(100):
        step = (r + math.log(r) - log_z) / (1.0 + 1.0 / r)
        r -= step
        if abs(step) < 1e-12:
            break
    return r
