"""Device-resident image batches: the whole dataset kept as uint8 on the training device,
augmented a batch at a time there, with no per-sample Python work.

A CIFAR-10 training set is 150 MB as uint8: it fits any GPU, so the training loop need not
move images from the host or decode them one by one (the approach of Keller Jordan's
*airbench* and of DAWNBench's fastest CIFAR-10 entries, Page 2018). The random crop with
padding and the horizontal flip are one gather per batch: each sample's crop offset and flip
choose the rows and columns it reads from the padded batch.

:func:`resident_images` turns a :class:`~netslim.data.ImageTensorDataset` (or a ``Subset`` of
one) into :class:`ResidentImages`; anything else (an ImageFolder, a user's own dataset)
returns ``None`` and :func:`netslim.train.fit` keeps its ``DataLoader``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Subset

#: the share of the device's free memory the uint8 images may take before the loop falls back
DEVICE_MEMORY_SHARE = 0.5


class ResidentImages:
    """uint8 images (N, C, H, W), int64 labels and the normalization, all on ``device``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 augment: str, device: torch.device) -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.scale = (1.0 / (255.0 * std)).to(self.device, torch.float32).view(1, -1, 1, 1)
        self.shift = (-mean / std).to(self.device, torch.float32).view(1, -1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False, drop_last: bool = False, augment: bool = True,
                generator: torch.Generator | None = None, channels_last: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, labels)`` batches, normalized float32; augmented when ``augment`` and the
        dataset asks for it. ``generator`` (on this device) makes the order and the crops repeatable."""
        n = len(self)
        order = (torch.randperm(n, device=self.device, generator=generator) if shuffle
                 else torch.arange(n, device=self.device))
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            x = self.images[idx]
            if augment and self.augment in ("crop_flip", "shift"):
                pad = 4 if self.augment == "crop_flip" else 2
                x = crop_flip(x, pad, flip=self.augment == "crop_flip", generator=generator)
            x = x.float().mul_(self.scale).add_(self.shift)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)


def crop_flip(x: torch.Tensor, pad: int, flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crops of the zero-padded batch ``x`` (N, C, H, W), each sample flipped left-right
    with probability 1/2 when ``flip``: one gather for the whole batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, n), device=x.device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip:
        mirrored = torch.rand(n, device=x.device, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(-1), cols)
    cols = cols + offsets[1, :, None]
    picked = padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None],
                                        cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)


def _unwrap(data: Dataset) -> tuple[Dataset, torch.Tensor | None]:
    """The base dataset under nested ``Subset``\\ s and the indices into it (``None``: all)."""
    index = None
    while isinstance(data, Subset):
        sub = torch.as_tensor(list(data.indices), dtype=torch.long)
        index = sub if index is None else sub[index]
        data = data.dataset
    return data, index


def resident_images(data, device: torch.device | str, *, augment: bool = True) -> ResidentImages | None:
    """``data`` as :class:`ResidentImages` on ``device``, or ``None`` when it is not an in-memory
    image dataset or its images would take more than half of the device's free memory."""
    from . import ImageTensorDataset

    base, index = _unwrap(data) if isinstance(data, Dataset) else (data, None)
    if not isinstance(base, ImageTensorDataset):
        return None
    images, labels = base.images, base.labels
    if index is not None:
        images, labels = images[index], labels[index]
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() * images.element_size() > DEVICE_MEMORY_SHARE * free:
            return None
    return ResidentImages(images, labels, base.mean.flatten(), base.std.flatten(),
                          base.augment if augment else "none", device)


__all__ = ["ResidentImages", "resident_images", "crop_flip", "DEVICE_MEMORY_SHARE"]
