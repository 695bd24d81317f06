"""A run's data: train / test / calibration splits, from a named dataset or from the user's own datasets.

Stages see one interface, whatever the source: ``train`` (augmented when the source augments),
``train_plain`` (the same images without augmentation, for calibration, sensitivity and refits),
``test`` (what the run's metric is computed on) and ``calib`` (a fixed subset of the training images).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .. import data as nsdata
from ..errors import NetslimError


def _fixed_subset(ds: Dataset, count: int | None, seed: int) -> Dataset:
    """A fixed random subset (test sets such as CIFAR-10's are stored sorted by class)."""
    if count is None or count >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return Subset(ds, sorted(order[:count].tolist()))


@dataclass
class DataBundle:
    """A named dataset (``cifar10``, an ImageFolder path ...) loaded lazily through :mod:`netslim.data`;
    ``augment=False`` (the recipe's ``augment: false``) trains on the plain images."""

    name: str
    root: str | None = None
    calib_size: int = 512
    test_limit: int | None = None
    augment: bool = True

    @cached_property
    def train(self) -> Dataset:
        return nsdata.get(self.name, "train", self.root, augment=self.augment)

    @cached_property
    def train_plain(self) -> Dataset:
        return nsdata.get(self.name, "train", self.root, augment=False)

    @cached_property
    def test(self) -> Dataset:
        return _fixed_subset(nsdata.get(self.name, "test", self.root), self.test_limit, 0)

    @cached_property
    def calib(self) -> Dataset:
        return nsdata.get(self.name, "calib", self.root, calib_size=self.calib_size)


@dataclass
class DatasetBundle:
    """The user's own datasets. ``train_plain`` defaults to ``train``; ``calib`` to a fixed random subset of
    ``calib_size`` items of ``train_plain``; ``test`` is cut to ``test_limit`` items (a fixed random subset)."""

    train_data: Dataset | None
    eval_data: Dataset
    calib_data: Dataset | None = None
    train_plain_data: Dataset | None = None
    calib_size: int = 512
    test_limit: int | None = None

    def __post_init__(self) -> None:
        for key in ("train_data", "eval_data", "calib_data", "train_plain_data"):
            setattr(self, key, as_dataset(getattr(self, key), key))
        if self.eval_data is None:
            raise NetslimError("eval_data is required: the dataset the run's metric is measured on")

    def _need_train(self, what: str) -> Dataset:
        if self.train_data is None:
            raise NetslimError(f"this recipe needs training data ({what}); pass train_data=")
        return self.train_data

    @property
    def train(self) -> Dataset:
        return self._need_train("a stage trains or calibrates")

    @property
    def train_plain(self) -> Dataset:
        return self.train_plain_data if self.train_plain_data is not None else self._need_train("a stage samples images")

    @property
    def test(self) -> Dataset:
        return _fixed_subset(self.eval_data, self.test_limit, 0)

    @property
    def calib(self) -> Dataset:
        if self.calib_data is not None:
            return self.calib_data
        return _fixed_subset(self.train_plain, self.calib_size, 1)


def as_dataset(data: Any, key: str) -> Dataset | None:
    """A ``Dataset`` from a Dataset or a DataLoader (its dataset); anything else is a clear error."""
    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, DataLoader):
        return data.dataset
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return data  # a map-style sequence of (input, target) pairs
    raise NetslimError(f"{key} must be a torch Dataset or DataLoader of (input, target) pairs, "
                       f"got {type(data).__name__}")


def bundle_from_reference(reference: str, calib_size: int = 512, test_limit: int | None = None) -> DatasetBundle:
    """Call a ``file.py:factory`` data reference. The factory returns ``(train, test)`` or a mapping with
    keys ``train``, ``test`` and optionally ``calib`` and ``train_plain`` (Datasets or DataLoaders)."""
    from ..zoo.references import load_factory

    fn = load_factory(reference)
    try:
        made = fn()
    except NetslimError:
        raise
    except Exception as exc:
        raise NetslimError(f"data factory {reference} raised {type(exc).__name__}: {exc}") from None
    if isinstance(made, (tuple, list)) and len(made) == 2:
        made = {"train": made[0], "test": made[1]}
    if not isinstance(made, dict) or "test" not in made:
        raise NetslimError(f"data factory {reference} must return (train, test) or a dict with keys train, test "
                           f"[, calib, train_plain]; got {type(made).__name__}")
    unknown = set(made) - {"train", "test", "calib", "train_plain"}
    if unknown:
        raise NetslimError(f"data factory {reference} returned unknown key(s) {sorted(unknown)}; "
                           "valid keys: train, test, calib, train_plain")
    return DatasetBundle(made.get("train"), made["test"], made.get("calib"), made.get("train_plain"),
                         calib_size, test_limit)
