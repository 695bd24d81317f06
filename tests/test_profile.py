import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import netslim
from netslim import zoo
from netslim.profile import deployable_copy, stored_bytes
from netslim.prune import magnitude_prune_

# MACs from the issue (FlopCounterMode counts 2 FLOPs per MAC)
EXPECTED_MACS = {"vgg16": 313_463_808, "resnet56": 125_747_840, "resnet20": 40_813_184, "lenet5": 2_293_000}


def flop_counter_macs(model, x):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", zoo.names() + ["torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                                "torchvision:squeezenet1_1", "torchvision:shufflenet_v2_x0_5"])
def test_layer_macs_agree_with_flop_counter(name):
    model = zoo.get(name).eval()
    x = torch.randn(*zoo.spec(name).input_size)
    prof = netslim.profile(model, x, latency=False)
    assert prof.other_macs == 0  # every MAC is attributed to a layer by our hooks
    # random dense weights: at most a handful of exact zeros to skip
    assert prof.macs * 0.9999 < prof.effective_macs <= prof.macs
    assert sum(r.macs for r in prof.layers) == flop_counter_macs(model, x)


@pytest.mark.parametrize("name,macs", sorted(EXPECTED_MACS.items()))
def test_macs_match_the_published_counts(name, macs):
    prof = netslim.profile(zoo.get(name), torch.randn(*zoo.spec(name).input_size), latency=False)
    assert abs(prof.macs - macs) / macs < 1e-3


def test_resnet18_at_224_is_1_814_gmacs():
    prof = netslim.profile(zoo.get("torchvision:resnet18"), torch.randn(1, 3, 224, 224), latency=False)
    assert round(prof.macs / 1e9, 3) == 1.814


def test_matmul_outside_layers_is_counted_as_other_ops():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            q = self.proj(x)
            return q @ q.transpose(-1, -2)

    prof = netslim.profile(Attn(), torch.randn(1, 4, 8), latency=False)
    assert sum(r.macs for r in prof.layers) == 4 * 8 * 8
    assert prof.other_macs == 4 * 4 * 8


def test_pruning_lowers_effective_macs_and_nonzeros_not_dense_counts():
    model = zoo.get("lenet300")
    x = torch.randn(1, 1, 28, 28)
    dense = netslim.profile(model, x, latency=False)
    magnitude_prune_(model, 0.75, scope="layer")
    pruned = netslim.profile(model, x, latency=False)
    assert pruned.macs == dense.macs and pruned.params == dense.params
    assert abs(pruned.effective_macs / dense.effective_macs - 0.25) < 0.01
    assert pruned.nonzero_params < 0.27 * dense.nonzero_params
    assert pruned.stored_bytes == dense.stored_bytes == 266_610 * 4  # dense storage: masks not stored


def test_stored_bytes_follow_dtype():
    model = nn.Linear(10, 10)
    assert stored_bytes(model) == 110 * 4
    assert stored_bytes(model.half()) == 110 * 2


def test_deployable_copy_bakes_masks_in():
    model = zoo.get("lenet300")
    magnitude_prune_(model, 0.5)
    plain = deployable_copy(model)
    assert not any("parametrizations" in k for k in plain.state_dict())
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(plain(x), model(x))


def test_latency_is_measured_per_batch_size():
    prof = netslim.profile(zoo.get("lenet5"), torch.randn(1, 1, 28, 28), batch_sizes=(1, 16), repeats=5, warmup=2)
    assert set(prof.latency_ms) == {1, 16}
    assert all(v > 0 for v in prof.latency_ms.values())
    assert prof.latency_ms[16] > prof.latency_ms[1]


def test_energy_model_counts_dram_weights_and_macs():
    from netslim.profile.energy import DRAM_PJ_PER_32BIT, MAC_PJ, estimate_energy

    e = estimate_energy(effective_macs=1000, stored_bytes=400, activation_bytes=0)
    assert e.total_pj == pytest.approx(1000 * MAC_PJ[32] + 100 * DRAM_PJ_PER_32BIT)
    assert estimate_energy(1000, 400, 0, mac_bits=8).total_pj < e.total_pj
    with pytest.raises(ValueError):
        estimate_energy(1, 1, 1, mac_bits=3)


def test_compare_gives_the_six_ratios():
    torch.manual_seed(0)
    original = zoo.get("lenet300").eval()
    compressed = zoo.get("lenet300").eval()
    compressed.load_state_dict(original.state_dict())
    magnitude_prune_(compressed, 0.9)
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    cmp = netslim.compare(original, compressed, loader, repeats=3, compressed_stored_size=100_000,
                          compressed_index_size=20_000)
    r = cmp.ratios
    assert set(r) == {"r_A", "r_p", "r_T", "r_c", "r_E", "r_D"}
    assert r["r_c"] == pytest.approx(10, rel=0.02)
    assert r["r_p"] == pytest.approx(266_610 * 4 / 100_000)
    assert r["r_D"] == pytest.approx(0.2)
    assert r["r_E"] > 1 and r["r_T"] > 0
    assert 0 <= r["r_A"] and cmp.top1_original is not None
    assert "r_E" in cmp.table() and '"ratios"' in cmp.to_json()
