"""Datasets: MNIST, Fashion-MNIST, CIFAR-10/100 and ImageFolder trees, with the checkpoints' normalization.

``netslim.data.get("cifar10", split="test")`` returns a ``torch.utils.data.Dataset`` of
normalized float tensors; :func:`loaders` gives train / test / calibration ``DataLoader``\\ s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import NetslimError, unknown_choice
from .sources import CIFAR10_CLASSES, RawSplit, load_raw, search_roots


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # "shift" (random crop, pad 2) or "crop_flip" (random crop, pad 4, horizontal flip)


# normalization the shared checkpoints expect (../shared/README.md)
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), "shift"),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), "shift"),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip"),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip"),
}
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "test", "calib")


def canonical_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise unknown_choice("dataset", name, list(DATASETS) + ["<folder with train/ and val/ or test/>"])
    return key


class ImageTensorDataset(Dataset):
    """In-memory uint8 images, normalized on access; optional random crop (pad 4) and horizontal flip."""

    def __init__(self, raw: RawSplit, info: DatasetInfo, augment: bool = False) -> None:
        self.images = torch.from_numpy(_writable(raw.images))
        self.labels = torch.from_numpy(_writable(raw.labels))
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)
        self.augment = info.augment if augment else "none"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255)
        if self.augment == "crop_flip":
            x = _random_crop_flip(x, pad=4)
        elif self.augment == "shift":
            x = _random_crop_flip(x, pad=2, flip=False)
        return (x - self.mean) / self.std, self.labels[i]


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, copy=True, order="C")


def _random_crop_flip(x: torch.Tensor, pad: int, flip: bool = True) -> torch.Tensor:
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    x = padded[:, top:top + h, left:left + w]
    if flip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


def _folder_dataset(root: Path, split: str, augment: bool) -> Dataset:
    """An ImageFolder tree (ImageNet layout: ``train/<class>/*``, ``val/<class>/*``)."""
    from torchvision import datasets, transforms

    sub = {"train": ["train"], "calib": ["train"], "test": ["val", "test"]}[split]
    for s in sub:
        if (root / s).is_dir():
            path = root / s
            break
    else:
        raise NetslimError(f"{root} has no {' or '.join(sub)}/ folder of class subfolders")
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment and split == "train":
        tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), norm])
    else:
        tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), norm])
    try:
        return datasets.ImageFolder(str(path), transform=tf, loader=_checked_image_loader)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or no image files in them
        raise NetslimError(f"{path} is not an ImageFolder of class subfolders with images: "
                           f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


def _checked_image_loader(path: str):
    """PIL's loader, with a file that is not a readable image reported as one :class:`NetslimError`."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as exc:  # UnidentifiedImageError, truncated file, decompression bomb, ...
        raise NetslimError(f"{path} is not a readable image ({type(exc).__name__})") from None


def is_folder_dataset(name: str) -> bool:
    p = Path(name)
    return p.is_dir() and any((p / s).is_dir() for s in ("train", "val", "test"))


def get(name: str, split: str = "test", root: str | Path | None = None, augment: bool = False,
        calib_size: int = 512, seed: int = 0) -> Dataset:
    """Dataset ``name`` (or an ImageFolder path), split ``train``, ``test`` or ``calib``.

    ``calib`` is a fixed random subset of ``calib_size`` training images without augmentation.
    """
    if split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    if is_folder_dataset(name):
        ds = _folder_dataset(Path(name), split, augment)
    else:
        key = canonical_name(name)
        raw = load_raw(key, root)["test" if split == "test" else "train"]
        ds = ImageTensorDataset(raw, DATASETS[key], augment=augment and split == "train")
    if split == "calib":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ds), generator=g)[:calib_size].tolist()
        ds = Subset(ds, idx)
    return ds


def info(name: str) -> DatasetInfo:
    if is_folder_dataset(name):
        from torchvision import datasets

        classes = datasets.folder.find_classes(str(Path(name) / "train"))[0] if (Path(name) / "train").is_dir() else []
        return DatasetInfo(str(name), len(classes), (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    return DATASETS[canonical_name(name)]


def loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False, workers: int = 0,
           sampler=None, drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=drop_last, persistent_workers=workers > 0)


def image_batch(data, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` input images as one tensor, from what a ``calib_data`` argument may be: a tensor (its
    first ``count``), a Dataset of ``(input, target)`` (``count`` drawn with a permutation seeded by
    ``seed``) or an iterable of batches such as a DataLoader (its first ``count`` images)."""
    if isinstance(data, torch.Tensor):
        return data[:count]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        items = [data[i] for i in picked]
        return torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])
    got, seen = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        got.append(x[: count - seen])
        seen += len(got[-1])
        if seen >= count:
            break
    if not got:
        raise NetslimError("the calibration data gave no images")
    return torch.cat(got)


__all__ = ["get", "info", "loader", "image_batch", "DATASETS", "DatasetInfo", "ImageTensorDataset", "CIFAR10_CLASSES",
           "search_roots", "load_raw", "canonical_name"]
