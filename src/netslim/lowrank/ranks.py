"""Rank selection: fixed, energy kept, and one-shot VBMF (Nakajima et al. 2013, as used by Kim et al. 2016).

EVBMF: the global analytic solution of empirical variational Bayesian matrix factorization.
For an L x M matrix (L <= M, alpha = L/M) with singular values gamma_h, a component is kept
when gamma_h > sigma * sqrt(M (1 + tau)(1 + alpha/tau)), tau ≈ 2.5129 sqrt(alpha), and the
noise variance sigma^2 is the minimiser of the free energy (Nakajima et al. 2013, Thm. 2 and
Cor. 2), found here by bounded scalar minimisation.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import NetslimError


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the sum of squared singular values."""
    if not 0 < energy <= 1:
        raise NetslimError(f"energy must be in (0, 1], got {energy}")
    sq = singular_values.double() ** 2
    cumulative = torch.cumsum(sq, 0) / sq.sum()
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12).item()) + 1


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    alpha = L / M
    x = s ** 2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau1 = _tau(z1, alpha)
    value = np.sum(z2 - np.log(z2)) + np.sum(z1 - tau1) + np.sum(np.log((tau1 + 1) / z1))
    value += alpha * np.sum(np.log(tau1 / alpha + 1)) + residual / (M * sigma2) + (L - s.size) * math.log(sigma2)
    return float(value)


def _minimise_scalar(f, lo: float, hi: float, iters: int = 200) -> float:
    """Golden-section search on [lo, hi] (f is unimodal enough here; the ends are checked too)."""
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = f(d)
    candidates = [(f(lo), lo), (f(hi), hi), (min(fc, fd), c if fc < fd else d)]
    return min(candidates)[1]


def vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank estimated by EVBMF with unknown noise variance."""
    y = matrix.detach().double().cpu().numpy()
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    H = L
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0  # full SVD: nothing outside the H = L components
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = float(np.sum(s ** 2) + residual) / (L * M)
    lower = max(float(s[eh_ub + 1] ** 2) / (M * xubar), float(np.mean(s[eh_ub + 1:] ** 2)) / M) \
        if eh_ub + 1 < s.size else upper * 1e-6
    lower = min(lower, upper)
    if upper <= 0:
        return 1
    sigma2 = _minimise_scalar(lambda v: _free_energy(v, L, M, s, residual, xubar), lower, upper)
    threshold = math.sqrt(M * sigma2 * xubar)
    return max(1, int(np.sum(s > threshold)))
