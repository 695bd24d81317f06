"""Wall-clock latency: median of repeated runs after warm-up, fixed thread count, CUDA synchronized."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from ..outputs import as_args, batch_size, flatten_outputs


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


def measure_latency(model: nn.Module, example_input, batch_sizes: tuple[int, ...] = (1,),
                    warmup: int = 5, repeats: int = 20, threads: int | None = None) -> dict[int, float]:
    """Median milliseconds of one forward pass per batch size.

    The example input's first sample is repeated to each batch size (every positional input of a tuple);
    the model runs in ``inference_mode`` on the device of ``example_input``. A model taking a list of
    images (torchvision's detection models) is timed on the example as given, keyed by its number of images.
    """
    args = as_args(example_input)
    tensors = flatten_outputs(args)
    device = tensors[0].device if tensors else torch.device("cpu")
    if batch_size(example_input) is not None:
        runs = {bs: tuple(a[:1].expand(bs, *a.shape[1:]).contiguous() for a in args) for bs in batch_sizes}
    else:
        runs = {len(tensors): args}
    was_training = model.training
    model.eval()
    result: dict[int, float] = {}
    try:
        with fixed_threads(threads), torch.inference_mode():
            for bs, x in runs.items():
                for _ in range(warmup):
                    model(*x)
                times = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(*x)
                    _sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                result[bs] = statistics.median(times)
    finally:
        model.train(was_training)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
