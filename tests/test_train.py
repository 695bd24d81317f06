import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netslim import NetslimError
from netslim.train import TrainConfig, TrainHook, evaluate, fit


def toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_fit_learns_and_evaluate_reports():
    data = toy_data()
    model = toy_model()
    before = evaluate(model, data, device="cpu")
    history = fit(model, data, TrainConfig(epochs=5, lr=0.1, batch_size=32), device="cpu", progress=False)
    after = evaluate(model, data, device="cpu")
    assert len(history) == 5 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["top1"] > 0.9 and after["loss"] < before["loss"]
    assert after["n"] == 256 and after["top5"] == 1.0


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    data = toy_data()
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32)
    straight = toy_model()
    fit(straight, data, cfg, device="cpu", progress=False)

    class StopAfter(TrainHook):
        def on_epoch_end(self, model, epoch):
            if epoch == 1:
                raise KeyboardInterrupt  # killed after epoch 2 ... before its checkpoint

    ckpt = tmp_path / "train.ckpt"
    resumed = toy_model()
    with pytest.raises(KeyboardInterrupt):
        fit(resumed, data, cfg, device="cpu", checkpoint_path=ckpt, hooks=[StopAfter()], progress=False)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    fresh = toy_model(seed=123)  # a new process: different initial weights, restored from the checkpoint
    history = fit(fresh, data, cfg, device="cpu", checkpoint_path=ckpt, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for a, b in zip(straight.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b)


def test_hooks_are_called_and_can_change_the_loss():
    calls = {"start": 0, "loss": 0, "step": 0, "epoch": 0}

    class Counting(TrainHook):
        def on_train_start(self, model, optimizer):
            calls["start"] += 1

        def loss(self, model, inputs, targets, outputs, loss):
            calls["loss"] += 1
            return loss + 0.0 * sum(p.sum() for p in model.parameters())

        def after_step(self, model):
            calls["step"] += 1

        def on_epoch_end(self, model, epoch):
            calls["epoch"] += 1

    fit(toy_model(), toy_data(64), TrainConfig(epochs=2, batch_size=16), device="cpu", hooks=[Counting()],
        progress=False)
    assert calls == {"start": 1, "loss": 8, "step": 8, "epoch": 2}


def test_diverging_training_is_a_clear_error():
    class Explode(TrainHook):
        def loss(self, model, inputs, targets, outputs, loss):
            return loss * float("nan")

    with pytest.raises(NetslimError, match="diverged"):
        fit(toy_model(), toy_data(64), TrainConfig(epochs=1, batch_size=16), device="cpu", hooks=[Explode()],
            progress=False)


def test_bad_config_values_are_clear_errors():
    with pytest.raises(NetslimError, match="valid optimizers"):
        TrainConfig(optimizer="sgdd")
    with pytest.raises(NetslimError, match="lr"):
        TrainConfig(lr=-1)


def test_nan_weights_give_a_clear_error_not_nan_accuracy():
    model = toy_model()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    with pytest.raises(NetslimError, match="NaN"):
        evaluate(model, toy_data(32), device="cpu")


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from torch import nn
    from torch.utils.data import TensorDataset
    from netslim.train import TrainConfig, fit, evaluate, init_distributed
    assert init_distributed() and dist.get_backend() == "gloo"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g); y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    hist = fit(model, TensorDataset(x, y), TrainConfig(epochs=3, lr=0.1, batch_size=16), device="cpu",
               checkpoint_path=sys.argv[1], progress=False)
    res = evaluate(model, TensorDataset(x, y), device="cpu")
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    steps = len(hist)
    print(f"RANK{dist.get_rank()} top1={res['top1']:.3f} n={res['n']} epochs={steps}", flush=True)
    dist.destroy_process_group()
''')


def test_ddp_two_cpu_processes_on_gloo(tmp_path, torchrun):
    proc = torchrun(DDP_SCRIPT, str(tmp_path / "ddp.ckpt"))
    import re

    # the two processes share stdout, so their lines may interleave: parse the records, not lines
    records = re.findall(r"RANK(\d) top1=([0-9.]+) n=(\d+) epochs=(\d+)", proc.stdout)
    assert sorted(r[0] for r in records) == ["0", "1"], proc.stdout
    for _, top1, n, epochs in records:
        assert n == "256" and epochs == "3"  # evaluation summed over both shards
        assert float(top1) > 0.9
    assert (tmp_path / "ddp.ckpt").is_file()
