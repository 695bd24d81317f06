"""Wall-clock latency: median of repeated runs after warm-up, fixed thread count, CUDA synchronized."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def fixed_threads(threads: int | None):
    """Run with ``torch.set_num_threads(threads)`` and restore the previous count after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(model: nn.Module, example_input: torch.Tensor, batch_sizes: tuple[int, ...] = (1,),
                    warmup: int = 5, repeats: int = 20, threads: int | None = None) -> dict[int, float]:
    """Median milliseconds of one forward pass per batch size.

    The example input's first sample is repeated to each batch size; the model runs in
    ``inference_mode`` on the device of ``example_input``.
    """
    sample = example_input[:1]
    device = sample.device
    was_training = model.training
    model.eval()
    result: dict[int, float] = {}
    try:
        with fixed_threads(threads), torch.inference_mode():
            for bs in batch_sizes:
                x = sample.expand(bs, *sample.shape[1:]).contiguous()
                for _ in range(warmup):
                    model(x)
                times = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x)
                    _sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                result[bs] = statistics.median(times)
    finally:
        model.train(was_training)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
