"""Realized speed: the runtimes side by side, channel counts rounded by measurement, factorizations kept only
where they are faster on the target."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import netslim
from netslim.errors import NetslimError
from netslim.lowrank import DecomposeConfig, decompose
from netslim.profile.runtimes import Setting, folded, time_runtimes
from netslim.prune.structured import structured
from netslim.prune.structured.rounding import RoundingTrial, choose_step, group_step
from netslim.prune.structured.select import LayerGroup

X = torch.randn(1, 3, 32, 32)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_folded_model_has_no_batchnorm_and_the_same_outputs():
    model = small_cnn()
    fused = folded(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_every_model_is_timed_in_every_runtime_setting(one_thread):
    dense = small_cnn()
    smaller = structured(dense, X, ratio=0.5)
    settings = [Setting("eager", 1, 1), Setting("eager", 8, 1), Setting("ort", 8, 1), Setting("compile", 2, 1)]
    timed = time_runtimes({"dense": dense, "pruned": smaller}, X, settings, rounds=2, repeats=3, warmup=1)
    assert set(timed) == {"dense", "pruned"}
    for name in timed:
        assert set(timed[name]) == {"eager/b1/t1", "eager/b8/t1", "ort/b8/t1", "compile/b2/t1"}
        for t in timed[name].values():
            assert t.ms > 0 and len(t.rounds_ms) == 2 and t.ms == min(t.rounds_ms)
            assert t.layout in ("contiguous", "channels_last")
    assert timed["dense"]["ort/b8/t1"].layout == "contiguous"


def test_bad_runtime_settings_are_one_clear_error():
    with pytest.raises(NetslimError, match="valid runtimes: compile, eager, ort"):
        Setting("tvm", 1, 1)
    with pytest.raises(NetslimError, match="batch must be an integer >= 1"):
        Setting("ort", 0, 1)
    with pytest.raises(NetslimError, match="one batched input tensor"):
        time_runtimes({"m": small_cnn()}, [X], [Setting("eager", 1, 1)])


def test_rounding_step_is_at_most_half_a_layer_and_the_choice_prefers_the_unrounded_model():
    assert group_step(LayerGroup(list(range(16)), 16, ["a"]), 16) == 8
    assert group_step(LayerGroup(list(range(64)), 64, ["a"]), 16) == 16
    assert group_step(LayerGroup(list(range(64)), 64, ["a"]), 4) == 4
    assert group_step(LayerGroup([0, 1], 2, ["a"]), 8) == 1
    close = [RoundingTrial(1, 0.4, 100, 10.0), RoundingTrial(8, 0.4, 98, 9.9)]
    assert choose_step(close).step == 1  # within 3 %: the unrounded model stays
    far = [RoundingTrial(1, 0.4, 100, 10.0), RoundingTrial(8, 0.4, 98, 7.0), RoundingTrial(16, 0.4, 97, 8.0)]
    assert choose_step(far).step == 8 and far[1].chosen and not far[0].chosen


def test_measured_rounding_tries_each_step_within_the_mac_target(shared, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("NETSLIM_CACHE", str(tmp_path))
    model = netslim.zoo.get("resnet20", weights="shared").eval()
    trials: list = []
    pruned = structured(model, X, criterion="l1", target="macs:2", round_to="measured", latency_device="ort-cpu",
                        rounding=trials)
    dense_macs = netslim.profile(model, X, latency=False).macs
    assert netslim.profile(pruned, X, latency=False).macs <= dense_macs / 2
    assert [t.step for t in trials] == [1, 4, 8, 16] and sum(t.chosen for t in trials) == 1
    assert all(t.macs <= dense_macs / 2 and t.ms > 0 for t in trials)
    chosen = next(t for t in trials if t.chosen)
    assert chosen.macs == netslim.profile(pruned, X, latency=False).macs
    with pytest.raises(NetslimError, match="round_to must be an integer >= 1 or 'measured'"):
        structured(model, X, ratio=0.5, round_to="fast")


def test_step_16_rounding_gives_channel_counts_on_the_step(shared, one_thread):
    from netslim.prune.structured.criteria import group_scores
    from netslim.prune.structured.graph import trace
    from netslim.prune.structured.rounding import rounded_removal
    from netslim.prune.structured.select import layer_groups, select
    from netslim.prune.structured.apply import remove_groups_
    from netslim.surgery import safe_deepcopy

    model = netslim.zoo.get("resnet20", weights="shared").eval()
    graph = trace(model, X)
    lgs = layer_groups(graph)
    scores = group_scores("l1", model, graph)
    plain = select(lgs, scores, 0.4)

    def macs_of(remove):
        return netslim.profile(remove_groups_(safe_deepcopy(model), graph, remove), X, latency=False).macs

    goal = macs_of(plain)
    remove = rounded_removal(lgs, scores, plain, 16, macs_of, goal)
    assert macs_of(remove) <= goal
    for lg in lgs:
        kept = sum(1 for r in lg.roots if r not in remove) * lg.unit
        assert kept % group_step(lg, 16) == 0, (lg.producers, kept)


def test_a_factorization_slower_on_the_target_is_left_dense(tmp_path, monkeypatch, one_thread):
    """The decision, on a latency table with a fixed cost per call (1 ms) plus 1 ms per million MACs: two factor
    calls cost more than a tiny layer saves, and much less than the wide layer costs."""
    from netslim.search.cost import LatencyTable

    def per_call_cost(self, module, input_shape, quantized=False):
        probe = torch.zeros(1, *input_shape[1:])
        macs = netslim.profile(module, probe, latency=False).macs
        return 1.0 + macs / 1e6

    monkeypatch.setenv("NETSLIM_CACHE", str(tmp_path))
    monkeypatch.setattr(LatencyTable, "unit_ms", per_call_cost)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 256, 1), nn.ReLU(),
                          nn.Conv2d(256, 256, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    cfg = DecomposeConfig(method="spatial", selector="fixed", rank=1, layers=["0", "4"], latency_device="torch-cpu",
                          latency_batch=1)
    result = decompose(model, x, cfg, device="cpu", progress=False)
    timings = result.details["on_target"]
    assert set(timings) == {"0", "4"}
    assert timings["4"]["factored_ms"] < timings["4"]["dense_ms"]
    assert timings["0"]["factored_ms"] >= timings["0"]["dense_ms"]
    assert result.details["slower_on_target"] == ["0"]
    assert isinstance(result.model[0], nn.Conv2d) and isinstance(result.model[4], nn.Sequential)
    with torch.no_grad():  # the kept factorization is the plain one: the dense layer is untouched
        assert torch.equal(result.model[0].weight, model[0].weight)
    with pytest.raises(NetslimError, match="valid devices"):
        DecomposeConfig(method="spatial", latency_device="npu")


def test_factor_timings_come_from_the_real_table_on_the_target(tmp_path, one_thread):
    from netslim.lowrank.measured import factor_timings
    from netslim.lowrank.apply import apply_plan_, plan_decomposition
    from netslim.search.cost import Device, LatencyTable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 256, 1), nn.Conv2d(256, 256, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    report = plan_decomposition(model, x, "spatial", "fixed", 2, layers=("1",))
    decomposed = apply_plan_(__import__("copy").deepcopy(model), report, iters=1)
    table = LatencyTable(Device("torch-cpu", 1, 1), tmp_path / "table.json")
    timings = factor_timings(model, decomposed, ["1"], x, table)
    assert timings["1"].faster and timings["1"].factored_ms < 0.5 * timings["1"].dense_ms  # rank 2 of 768
    assert (tmp_path / "table.json").is_file() and table.misses >= 3


def test_prune_channels_stage_takes_measured_rounding_and_refuses_it_where_it_cannot_resume():
    from netslim.prune.structured.stages import ChannelPruneConfig

    cfg = ChannelPruneConfig(target="macs:2", round_to="measured", latency_device="ort-cpu", latency_batch=64)
    device = cfg.device_for_rounding()
    assert (device.name, device.batch, device.threads) == ("ort-cpu", 64, 1)
    assert cfg.structured_options()["round_to"] == "measured"
    assert ChannelPruneConfig(round_to=8).device_for_rounding() is None
    with pytest.raises(NetslimError, match="round_to: measured needs method 'oneshot'"):
        ChannelPruneConfig(round_to="measured", method="iterative")
    with pytest.raises(NetslimError, match="valid devices"):
        ChannelPruneConfig(round_to="measured", latency_device="npu")
    with pytest.raises(NetslimError, match="round_to must be an integer >= 1 or 'measured'"):
        ChannelPruneConfig(round_to=0)
