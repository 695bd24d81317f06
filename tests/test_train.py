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


# ------------------------------------------------------------------ the device-resident data path
def image_data(n=192, augment=True, seed=0):
    """A tiny in-memory colour dataset: the label is which of the three channels is brightest."""
    import numpy as np

    from netslim.data import DATASETS, ImageTensorDataset
    from netslim.data.sources import RawSplit

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 120, (n, 3, 8, 8)).astype(np.uint8)
    images[np.arange(n), labels] += 120
    return ImageTensorDataset(RawSplit(images, labels.astype(np.int64)), DATASETS["cifar10"], augment=augment)


def image_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def test_resident_batches_without_augmentation_equal_the_dataset_items():
    from torch.utils.data import Subset

    from netslim.data.resident import resident_images

    data = Subset(Subset(image_data(augment=False), list(range(10, 150))), list(range(5, 60)))
    batches = list(resident_images(data, "cpu").batches(16, augment=False))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert len(batches) == 4 and x.shape == (55, 3, 8, 8)
    for i in (0, 17, 54):
        xi, yi = data[i]
        torch.testing.assert_close(x[i], xi, atol=1e-5, rtol=0)
        assert int(y[i]) == int(yi)


def test_batched_crop_flip_gives_crops_and_flips_of_each_image():
    from netslim.data.resident import crop_flip

    x = torch.randint(0, 256, (64, 3, 6, 6), dtype=torch.uint8)
    out = crop_flip(x, pad=2, generator=torch.Generator().manual_seed(0))
    flipped = 0
    for i in range(64):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        crops = [padded[:, a:a + 6, b:b + 6] for a in range(5) for b in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirror = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or mirror, f"sample {i} is no crop of its image"
        flipped += mirror and not plain
    assert 15 < flipped < 49  # about half flipped


def test_fit_on_an_image_dataset_batches_on_the_device_not_per_sample(monkeypatch):
    from netslim.data import ImageTensorDataset

    data = image_data()
    model = image_model()

    def per_sample(self, i):
        raise AssertionError("the resident path must not read samples one by one")

    monkeypatch.setattr(ImageTensorDataset, "__getitem__", per_sample)
    history = fit(model, data, TrainConfig(epochs=6, lr=0.1, batch_size=32, resident_data=True), device="cpu",
                  progress=False)
    monkeypatch.undo()
    assert history[-1]["train_top1"] > 0.8 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert evaluate(model, image_data(augment=False), device="cpu")["top1"] > 0.8
    for cfg in (TrainConfig(epochs=1), TrainConfig(epochs=1, resident_data=False)):  # the CPU default: as it was
        with pytest.raises(AssertionError, match="one by one"):
            monkeypatch.setattr(ImageTensorDataset, "__getitem__", per_sample)
            fit(image_model(), data, cfg, device="cpu", progress=False)


def test_resident_path_resumes_to_the_same_weights(tmp_path):
    data = image_data()
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=32, channels_last=True, resident_data=True)
    straight = image_model()
    fit(straight, data, cfg, device="cpu", progress=False)

    class StopAfter(TrainHook):
        def on_epoch_end(self, model, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    ckpt = tmp_path / "train.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(image_model(), data, cfg, device="cpu", checkpoint_path=ckpt, hooks=[StopAfter()], progress=False)
    resumed = image_model(seed=7)
    fit(resumed, data, cfg, device="cpu", checkpoint_path=ckpt, progress=False)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_speed_knobs_are_checked():
    with pytest.raises(NetslimError, match="amp_dtype.*bfloat16"):
        TrainConfig(amp_dtype="fp8")
    with pytest.raises(NetslimError, match="channels_last must be true, false or null"):
        TrainConfig(channels_last="yes")
    with pytest.raises(NetslimError, match="resident_data must be true, false or null"):
        TrainConfig(resident_data=1)
