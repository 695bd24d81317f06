"""Sparse execution of pruned layers with ``torch.sparse`` kernels (CSR on CPU, which calls MKL
where PyTorch was built with it; cuSPARSE on CUDA), and a measured sparse-vs-dense table.

Deep Compression (Han et al. 2016 §6) notes that pruning pays off in speed only with sparse
kernels, and then mostly for matrix-vector products (batch 1); the table says where it does.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..surgery import bake_parametrizations_


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W held as a CSR tensor."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.weight = nn.Parameter(linear.weight.detach().to_sparse_csr(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def _median_ms(fn, x: torch.Tensor, warmup: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class SparseTiming:
    layer: str
    shape: tuple[int, int]
    sparsity: float
    batch: int
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def sparse_vs_dense(model: nn.Module, batch_sizes: tuple[int, ...] = (1, 64), warmup: int = 20,
                    repeats: int = 200) -> list[SparseTiming]:
    """Time each linear layer dense (``F.linear``) and sparse (CSR ``torch.sparse.mm``), same inputs."""
    model = bake_parametrizations_(model)
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach()
        sparse = SparseLinear(m)
        for bs in batch_sizes:
            x = torch.randn(bs, m.in_features, device=w.device)
            dense_ms = _median_ms(lambda t: nn.functional.linear(t, w, m.bias), x, warmup, repeats)
            sparse_ms = _median_ms(sparse, x, warmup, repeats)
            rows.append(SparseTiming(name, tuple(w.shape), float((w == 0).float().mean()), bs, dense_ms, sparse_ms))
    return rows
