"""Parameter and MAC counts of a layer before and after each decomposition, so a layer is only
decomposed where it pays (the formulas of the low-rank factorization literature).

* SVD of an m x n fully connected layer with k middle units: m*n -> k*(m+n); pays while
  k < m*n / (m+n).
* Spatial split of a k x k convolution C -> N with D intermediate filters (Jaderberg 2014,
  Tai 2016): C*N*k^2 -> D*k*(C+N); pays while D < C*N*k / (C+N).
* CP rank R (Lebedev 2015): C*R + 2*R*k + R*N (1x1, k x 1 depthwise, 1 x k depthwise, 1x1).
* Tucker-2 ranks (R_in, R_out) (Kim 2016): C*R_in + R_in*R_out*k^2 + R_out*N.

Biases are unchanged by every decomposition and left out. MACs are the parameters times the
output positions of each factor (stride applied by the factor that carries it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


def linear_cost(m: int, n: int) -> Cost:
    return Cost(m * n, m * n)


def svd_cost(m: int, n: int, k: int) -> Cost:
    return Cost(k * (m + n), k * (m + n))


def conv_cost(c: int, n: int, kh: int, kw: int, out_hw: tuple[int, int]) -> Cost:
    params = c * n * kh * kw
    return Cost(params, params * out_hw[0] * out_hw[1])


def spatial_cost(c: int, n: int, kh: int, kw: int, d: int, mid_hw: tuple[int, int], out_hw: tuple[int, int]) -> Cost:
    """k x 1 conv C -> D (output ``mid_hw``: stride in height only), then 1 x k conv D -> N."""
    first, second = c * d * kh, d * n * kw
    return Cost(first + second, first * mid_hw[0] * mid_hw[1] + second * out_hw[0] * out_hw[1])


def spatial_break_even(c: int, n: int, k: int) -> float:
    return c * n * k / (c + n)


def cp_cost(c: int, n: int, kh: int, kw: int, r: int, in_hw: tuple[int, int], mid_hw: tuple[int, int],
            out_hw: tuple[int, int]) -> Cost:
    """1x1 C -> R at input resolution, k x 1 depthwise, 1 x k depthwise, 1x1 R -> N."""
    p1, p2, p3, p4 = c * r, r * kh, r * kw, r * n
    macs = p1 * in_hw[0] * in_hw[1] + p2 * mid_hw[0] * mid_hw[1] + (p3 + p4) * out_hw[0] * out_hw[1]
    return Cost(p1 + p2 + p3 + p4, macs)


def tucker2_cost(c: int, n: int, kh: int, kw: int, r_in: int, r_out: int, in_hw: tuple[int, int],
                 out_hw: tuple[int, int]) -> Cost:
    """1x1 C -> R_in at input resolution, k x k R_in -> R_out, 1x1 R_out -> N."""
    p1, p2, p3 = c * r_in, r_in * r_out * kh * kw, r_out * n
    return Cost(p1 + p2 + p3, p1 * in_hw[0] * in_hw[1] + (p2 + p3) * out_hw[0] * out_hw[1])
