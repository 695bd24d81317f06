"""Integration: every shared checkpoint scores its recorded top-1 (within 0.1 point) on the full test set."""
import pytest

from netslim import data as nsdata
from netslim import zoo
from netslim.train import evaluate

from conftest import SHARED_TOP1


@pytest.mark.parametrize("name", sorted(SHARED_TOP1))
def test_shared_checkpoint_accuracy(shared, name):
    dataset, expected = SHARED_TOP1[name]
    model = zoo.get(name, weights="shared")
    result = evaluate(model, nsdata.get(dataset, "test"), device="cpu", batch_size=500)
    assert result["n"] == 10_000
    assert abs(result["top1"] - expected) <= 0.001, f"{name}: {result['top1']:.4f} vs {expected}"
