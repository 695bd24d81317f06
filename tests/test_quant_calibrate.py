"""Calibration of quantization ranges (netslim.quant.calibrate): every method on data whose answer is known."""
import math

import pytest
import torch

from netslim.errors import NetslimError
from netslim.quant.calibrate import (CALIBRATORS, WEIGHT_CALIBRATORS, RangeCollector, aciq_clip_ratio,
                                     kl_threshold_bin, weight_range)
from netslim.quant.qspec import QuantSpec, quantization_mse


def collect(method, *batches, **kwargs):
    collector = RangeCollector(method, **kwargs)
    for batch in batches:
        collector.update(batch)
    return collector


def laplace(n, scale=1.0, loc=0.0, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.Laplace(loc, scale).sample((n,))


def test_minmax_is_exact_over_all_batches():
    c = collect("minmax", torch.tensor([1.0, 2.0, -3.0]), torch.tensor([[5.0, 0.5]]), torch.tensor([4.0]))
    lo, hi = c.range()
    assert (lo.item(), hi.item(), c.batches) == (-3.0, 5.0, 3)
    assert lo.dim() == 0 and hi.dim() == 0


def test_moving_average_is_the_hand_computed_ema():
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.5, 4.0])]
    lo, hi = collect("moving_average", *batches, momentum=0.9).range()
    expected_lo = 0.9 * (0.9 * -1.0 + 0.1 * -3.0) + 0.1 * 0.5  # the first batch initializes
    expected_hi = 0.9 * (0.9 * 2.0 + 0.1 * 1.0) + 0.1 * 4.0
    assert lo.item() == pytest.approx(expected_lo) and hi.item() == pytest.approx(expected_hi)


def test_percentile_of_known_distributions():
    torch.manual_seed(0)
    lo, hi = collect("percentile", *torch.randn(4, 100_000), percentile=99.0).range()
    assert lo.item() == pytest.approx(-2.3263, abs=0.03) and hi.item() == pytest.approx(2.3263, abs=0.03)
    exponential = torch.distributions.Exponential(1.0).sample((200_000,))
    lo, hi = collect("percentile", exponential, percentile=99.9).range()
    assert lo.item() == 0.0 and hi.item() == pytest.approx(math.log(1000), rel=0.03)


@pytest.mark.parametrize("bits,gain", [(8, 0.95), (4, 0.5)])
def test_mse_range_beats_minmax_and_finds_the_grid_minimum(bits, gain):
    torch.manual_seed(bits)
    x = torch.randn(50_000)
    x[:20] = 40 * torch.randn(20)  # a few outliers
    spec = QuantSpec(bits, symmetric=False)
    lo, hi = collect("mse", x, spec=spec).range()
    assert x.min() <= lo <= 0 <= hi <= x.max()
    mse = quantization_mse(x, lo, hi, spec).item()
    assert mse < gain * quantization_mse(x, x.min(), x.max(), spec).item()
    grid = min(quantization_mse(x, a * x.min(), a * x.max(), spec).item() for a in torch.arange(1, 101) / 100)
    assert mse <= 1.001 * grid


def test_kl_clips_heavy_tails_and_keeps_uniform_data():
    x = torch.cat([laplace(200_000), torch.tensor([1000.0, 900.0, -800.0, 950.0, 1000.0])])
    for bits, at_most in [(8, 100.0), (4, 10.0)]:
        lo, hi = collect("kl", x, spec=QuantSpec(bits, symmetric=False)).range()
        assert hi < at_most and lo > -at_most
        assert ((x >= lo) & (x <= hi)).float().mean() > 0.99
    torch.manual_seed(1)
    lo, hi = collect("kl", torch.rand(500_000) * 2 - 1).range()
    assert lo < -0.97 and hi > 0.97
    lo, hi = collect("kl", torch.rand(500_000), spec=QuantSpec(8, symmetric=True)).range()
    assert lo == 0 and hi > 0.97


def _literal_kl(hist, i, levels):
    """Migacz 2017, slide by slide, for one threshold bin ``i``."""
    p = hist[:i].clone()
    p[-1] += hist[i:].sum()
    q, width = torch.zeros(i, dtype=hist.dtype), i // levels
    for j in range(levels):
        start, stop = j * width, i if j == levels - 1 else (j + 1) * width
        nonempty = hist[start:stop] > 0
        q[start:stop][nonempty] = hist[start:stop].sum() / max(int(nonempty.sum()), 1)
    p, q = p / p.sum(), q / q.sum()
    return float((torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(1e-12))).sum())


@pytest.mark.parametrize("levels", [8, 16])
def test_kl_threshold_matches_the_literal_algorithm(levels):
    torch.manual_seed(levels)
    hist = torch.bincount((laplace(5000, seed=levels).abs() * 20).long().clamp(max=255), minlength=256).double()
    hist[40:44] = 0  # empty bins, also as a candidate's last bin
    literal = [_literal_kl(hist, i, levels) for i in range(levels, 257)]
    assert kl_threshold_bin(hist, levels) == levels + min(range(len(literal)), key=literal.__getitem__)


@pytest.mark.parametrize("bits,ratio", [(2, 2.83), (3, 3.89), (4, 5.03), (8, 9.89)])
def test_aciq_laplace_optimum(bits, ratio):
    assert aciq_clip_ratio(bits) == pytest.approx(ratio, rel=0.02)
    r = torch.linspace(0.01, 30, 300_000, dtype=torch.float64)  # the analytic MSEs in units of b^2
    two_sided = 2 * torch.exp(-r) + r**2 / (3 * 4**bits)
    one_sided = torch.exp(-r) + r**2 / (12 * 4**bits)
    assert aciq_clip_ratio(bits) == pytest.approx(r[two_sided.argmin()].item(), abs=1e-3)
    assert aciq_clip_ratio(bits, one_sided=True) == pytest.approx(r[one_sided.argmin()].item(), abs=1e-3)


def test_aciq_fits_the_laplace_scale():
    spec = QuantSpec(4, symmetric=False)
    lo, hi = collect("aciq", laplace(400_000, scale=2.0, loc=0.5), spec=spec).range()
    alpha = aciq_clip_ratio(4) * 2.0
    assert lo.item() == pytest.approx(0.5 - alpha, rel=0.03) and hi.item() == pytest.approx(0.5 + alpha, rel=0.03)
    lo, hi = collect("aciq", laplace(400_000, scale=2.0).relu(), spec=spec).range()
    assert lo.item() == 0 and hi.item() == pytest.approx(aciq_clip_ratio(4, one_sided=True) * 2.0, rel=0.03)


def test_reservoir_memory_is_bounded_and_uniform_over_batches():
    c = RangeCollector("percentile", max_samples=2**20)
    for i in range(100):
        c.update(torch.full((100_000,), float(i)) + torch.rand(100_000))
    assert c.batches == 100 and c.num_samples <= c.max_samples
    assert c._samples.mean().item() == pytest.approx(50.0, abs=0.5)  # each batch equally represented


def test_unknown_method_lists_the_choices():
    with pytest.raises(NetslimError) as error:
        RangeCollector("entropy")
    assert all(name in str(error.value) for name in CALIBRATORS)
    with pytest.raises(NetslimError) as error:
        weight_range(torch.randn(4, 4), QuantSpec(8), method="kl")
    assert all(name in str(error.value) for name in WEIGHT_CALIBRATORS)
    with pytest.raises(NetslimError):
        RangeCollector("percentile", percentile=30.0)


def test_range_before_any_batch_raises():
    with pytest.raises(NetslimError, match="no calibration batches"):
        RangeCollector("kl").range()


def test_weight_range_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    w[::3, 0, 0, 0] = 4.0  # moderate outliers in some output channels
    assert weight_range(w, QuantSpec(8, per_channel=True, axis=1))[0].shape == (8,)
    lo, hi = weight_range(w, QuantSpec(8))
    assert lo.dim() == 0 and (lo.item(), hi.item()) == (w.min().item(), w.max().item())
    spec = QuantSpec(4, per_channel=True, axis=0)
    lo_max, hi_max = weight_range(w, spec)
    lo, hi = weight_range(w, spec, method="mse")
    assert lo.shape == hi.shape == (16,) and torch.equal(hi_max, w.flatten(1).amax(1))
    assert torch.all(lo_max <= lo) and torch.all(hi <= hi_max)
    per_tensor = QuantSpec(4)
    mse = torch.stack([quantization_mse(w[c], lo[c], hi[c], per_tensor) for c in range(16)])
    mse_max = torch.stack([quantization_mse(w[c], lo_max[c], hi_max[c], per_tensor) for c in range(16)])
    assert torch.all(mse <= mse_max) and mse.sum() < 0.9 * mse_max.sum()
