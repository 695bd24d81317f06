"""Lazy access to a recipe's train / test / calibration data."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch.utils.data import Dataset

from .. import data as nsdata


@dataclass
class DataBundle:
    name: str
    root: str | None = None
    calib_size: int = 512
    test_limit: int | None = None

    @cached_property
    def train(self) -> Dataset:
        return nsdata.get(self.name, "train", self.root, augment=True)

    @cached_property
    def train_plain(self) -> Dataset:
        return nsdata.get(self.name, "train", self.root, augment=False)

    @cached_property
    def test(self) -> Dataset:
        ds = nsdata.get(self.name, "test", self.root)
        if self.test_limit is not None and self.test_limit < len(ds):
            # a fixed random subset: test sets such as CIFAR-10's are stored sorted by class
            import torch
            from torch.utils.data import Subset

            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
            ds = Subset(ds, sorted(order[: self.test_limit].tolist()))
        return ds

    @cached_property
    def calib(self) -> Dataset:
        return nsdata.get(self.name, "calib", self.root, calib_size=self.calib_size)
