"""Integration: every shared checkpoint scores its recorded top-1 on the test set.

The small models are evaluated on the full 10,000 images (within 0.1 point). The three large CIFAR-10
models are evaluated on a fixed random 2,500 of them (seed 0), within 1.5 points: the sampling error
of top-1 near 0.9 on 2,500 of 10,000 images is about 0.5 point (finite-population corrected), so the
check still fails for wrong weights, a wrong architecture or a broken data pipeline, in a quarter of
the time.
"""
import pytest
import torch
from torch.utils.data import Subset

from netslim import data as nsdata
from netslim import zoo
from netslim.train import evaluate

from conftest import SHARED_TOP1

SUBSET = {"vgg16": 2500, "resnet56": 2500, "mobilenetv2": 2500}


@pytest.mark.parametrize("name", sorted(SHARED_TOP1))
def test_shared_checkpoint_accuracy(shared, name):
    dataset, expected = SHARED_TOP1[name]
    model = zoo.get(name, weights="shared")
    test = nsdata.get(dataset, "test")
    count = SUBSET.get(name, len(test))
    if count < len(test):
        picked = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:count]
        test = Subset(test, sorted(picked.tolist()))
    result = evaluate(model, test, device="cpu", batch_size=500)
    assert result["n"] == count
    tolerance = 0.001 if name not in SUBSET else 0.015
    assert abs(result["top1"] - expected) <= tolerance, f"{name}: {result['top1']:.4f} vs {expected}"
