import json
import math
import re
import textwrap
from collections import OrderedDict

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from netslim import NetslimError, zoo
from netslim.distill import (ATLoss, CRDLoss, FeatureTap, FitNetLoss, FSPLoss, KDLoss, NSTLoss, PKTLoss, RKDLoss,
                             SPLoss, agreement, codistill, distill, get_layer, kd_loss, mutual_learning)
from netslim.distill.online import mutual_kl
from netslim.pipeline import build_config, parse_recipe, restore_stage_model, run_recipe
from netslim.train import TrainConfig, TrainHook, evaluate, fit


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # these models are tiny: one thread is fastest, also on a busy machine
    yield


def conv_net(width: int, stride: int = 2, seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, stride=stride, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def toy_images(n: int = 512, seed: int = 0) -> TensorDataset:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, x.mean((2, 3)).argmax(1))  # the class: the channel with the largest mean


@pytest.fixture(scope="module")
def teacher_and_data():
    torch.set_num_threads(1)
    data = toy_images()
    teacher = conv_net(16, stride=1, seed=0)
    fit(teacher, data, TrainConfig(epochs=15, lr=0.1, batch_size=64), device="cpu", progress=False)
    assert evaluate(teacher, data, device="cpu")["top1"] > 0.9
    return teacher.eval(), data


# ------------------------------------------------------------------ losses
def _fsp(s, t):
    return FSPLoss()(s, s.tanh(), t, t.tanh())


LOSS_FUNCTIONS = {
    "kd": lambda s, t: kd_loss(s.flatten(1), t.flatten(1), 4.0),
    "at": ATLoss(), "sp": SPLoss(), "nst": NSTLoss(), "rkd": RKDLoss(), "pkt": PKTLoss(), "fsp": _fsp,
}


@pytest.mark.parametrize("name", sorted(LOSS_FUNCTIONS))
def test_loss_is_zero_for_identical_features_positive_otherwise_with_gradients(name):
    loss_of = LOSS_FUNCTIONS[name]
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 6, 5, 5, generator=g)
    student = torch.randn(8, 6, 5, 5, generator=g, requires_grad=True)
    assert float(loss_of(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-5)
    value = loss_of(student, teacher)
    assert value.dim() == 0 and value.item() > 1e-4
    value.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["at", "sp", "nst", "rkd", "pkt"])
def test_losses_compare_features_of_different_widths_and_sizes(name):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(8, 4, 10, 10, generator=g, requires_grad=True)
    teacher = torch.randn(8, 6, 5, 5, generator=g)
    value = LOSS_FUNCTIONS[name](student, teacher)
    assert math.isfinite(value.item()) and value.item() > 0
    value.backward()
    assert float(student.grad.abs().sum()) > 0


def test_attention_transfer_ignores_the_scale_of_the_activations():
    t = torch.randn(4, 6, 5, 5)
    assert float(ATLoss()(3 * t, t)) == pytest.approx(0.0, abs=1e-7)
    assert float(ATLoss()(t.roll(1, dims=2), t)) > 1e-4


def test_kd_matches_a_hand_computed_value():
    s, t, temp = [1.0, 2.0, 0.0], [0.0, 3.0, 1.0], 2.0

    def softmax(v):
        e = [math.exp(a / temp) for a in v]
        return [a / sum(e) for a in e]

    p_s, p_t = softmax(s), softmax(t)
    expected = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s)) * temp ** 2
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), temp)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Hinton's alpha: alpha * KD + (1 - alpha) * CE with the label
    ce = -math.log(math.exp(s[1]) / sum(math.exp(a) for a in s))
    combined = KDLoss(temperature=temp, alpha=0.7)(torch.tensor([s]), torch.tensor([t]), torch.tensor([1]))
    assert float(combined) == pytest.approx(0.7 * expected + 0.3 * ce, rel=1e-5)


def test_fitnet_regressor_maps_student_width_to_teacher_and_learns():
    loss = FitNetLoss(4, 6)
    assert isinstance(loss.regressor[0], nn.Conv2d) and loss.regressor[0].out_channels == 6
    student = torch.randn(8, 4, 10, 10, requires_grad=True)
    teacher = torch.randn(8, 6, 5, 5)
    value = loss(student, teacher)
    value.backward()
    assert value.item() > 0 and float(student.grad.abs().sum()) > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in loss.regressor.parameters())


def test_crd_memory_bank_is_indexed_by_sample_and_heads_get_gradients():
    torch.manual_seed(0)
    crd = CRDLoss(student_dim=5, teacher_dim=7, feat_dim=8, num_negatives=16, num_samples=40)
    before = crd.memory_student.clone()
    student = torch.randn(4, 5, requires_grad=True)
    value = crd(student, torch.randn(4, 7), index=torch.tensor([3, 10, 11, 30]))
    value.backward()
    assert value.item() > 0 and float(student.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in crd.parameters())
    changed = (crd.memory_student != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 10, 11, 30]  # only the batch's samples are updated
    with pytest.raises(NetslimError, match="indices"):
        crd(student, torch.randn(4, 7))


def test_crd_queue_variant_learns_to_match_teacher_embeddings():
    torch.manual_seed(0)
    teacher_map = torch.randn(6, 10)
    crd = CRDLoss(student_dim=6, teacher_dim=10, feat_dim=8, num_negatives=64)
    student = nn.Linear(6, 6)
    opt = torch.optim.Adam([*crd.parameters(), *student.parameters()], lr=0.01)
    losses = []
    for step in range(150):
        x = torch.randn(32, 6)
        loss = crd(student(x), x @ teacher_map)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert int(crd.queue_pointer) == (150 * 32) % 64
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20


# ------------------------------------------------------------------ layers, adapters, errors
def test_unknown_layer_is_a_clear_error_listing_the_valid_layers(teacher_and_data):
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), relu=nn.ReLU(), head=nn.Linear(4, 2)))
    with pytest.raises(NetslimError) as err:
        FeatureTap(model, ["conv", "layer9"], role="student")
    msg = str(err.value)
    assert "unknown layer 'layer9' in the student (Sequential)" in msg and "valid layers: conv, relu, head" in msg
    assert "\n" not in msg
    teacher, data = teacher_and_data
    with pytest.raises(NetslimError, match=r"unknown layer 'nope' in the teacher .*valid layers: 0, 1, 2, 3"):
        distill(conv_net(8), teacher, data, {"at": 1.0}, [("nope", "3")], progress=False, device="cpu")
    huge = nn.Sequential(*[nn.Linear(2, 2) for _ in range(300)])
    msg = str(pytest.raises(NetslimError, get_layer, huge, "x").value)
    assert "valid layers: 0, 1, 2," in msg and "more)" in msg


class Snapshot(TrainHook):
    """Record the optimizer's parameters (and their values) when training starts."""

    def on_train_start(self, model, optimizer):
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.initial = {id(p): p.detach().clone() for p in self.params}


def test_adapters_are_made_for_mismatched_widths_and_sizes_and_trained_with_the_student(teacher_and_data):
    teacher, data = teacher_and_data  # 16 channels, 8x8 maps after layer "3"
    student = conv_net(8, stride=2, seed=1)  # 8 channels, 4x4 maps after layer "3"
    snap = Snapshot()
    result = distill(student, teacher, data, {"fitnet": 1.0, "fsp": 1.0, "ce": 1.0}, ["0", "3"],
                     TrainConfig(epochs=1, lr=0.05, batch_size=64), device="cpu", progress=False, hooks=[snap])
    adapters = result.criterion.adapters()
    assert len(adapters) == 4  # a FitNet regressor per pair, an FSP adapter per mismatched layer
    for adapter in adapters:
        conv, bn = adapter
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 16, (1, 1))
        assert isinstance(bn, nn.BatchNorm2d)
        for p in adapter.parameters():
            assert any(p is q for q in snap.params), "adapter parameter missing from the optimizer"
            assert not torch.equal(p.detach(), snap.initial[id(p)]), "adapter parameter was not updated"
    assert result.history[-1]["distill_fitnet"] > 0 and result.history[-1]["distill_fsp"] > 0


def test_bad_losses_and_layers_are_clear_errors(teacher_and_data):
    teacher, data = teacher_and_data
    with pytest.raises(NetslimError, match="unknown loss name 'kdd'; valid loss names: at, ce, crd, fitnet"):
        distill(conv_net(8), teacher, data, {"kdd": 1.0}, device="cpu", progress=False)
    with pytest.raises(NetslimError, match="loss 'at' compares intermediate features"):
        distill(conv_net(8), teacher, data, {"at": 1.0}, device="cpu", progress=False)
    with pytest.raises(NetslimError, match="needs feature maps"):
        distill(conv_net(8), teacher, data, {"at": 1.0}, ["7"], device="cpu", progress=False)
    with pytest.raises(NetslimError, match="weight of loss 'kd'"):
        distill(conv_net(8), teacher, data, {"kd": float("nan")}, device="cpu", progress=False)


# ------------------------------------------------------------------ training
def test_distill_raises_the_students_agreement_with_the_teacher(teacher_and_data):
    teacher, data = teacher_and_data
    student = conv_net(8, seed=1)
    before = agreement(student, teacher, data, device="cpu")
    result = distill(student, teacher, data, {"kd": 0.9}, config=TrainConfig(epochs=10, lr=0.05, batch_size=64),
                     device="cpu", progress=False)
    after = agreement(student, teacher, data, device="cpu")
    assert after > 0.85 and after > before + 0.3, (before, after)
    kd = [h["distill_kd"] for h in result.history]
    assert kd[-1] < kd[0]
    assert not teacher.training


@pytest.mark.parametrize("losses,layers", [({"at": 100.0, "ce": 1.0}, ["3"]), ({"crd": 0.5, "ce": 1.0}, None),
                                           ({"rkd": 1.0, "pkt": 10.0, "sp": 100.0, "nst": 10.0}, ["3"])])
def test_feature_and_relational_losses_train_a_student(teacher_and_data, losses, layers):
    teacher, data = teacher_and_data
    student = conv_net(8, seed=1)
    result = distill(student, teacher, data, losses, layers, TrainConfig(epochs=3, lr=0.05, batch_size=64),
                     device="cpu", progress=False, crd_negatives=256)
    for name in losses:
        if name != "ce":
            assert result.history[-1][f"distill_{name}"] > 0
    assert evaluate(student, data, device="cpu")["top1"] > 0.45  # chance: 0.33
    if "crd" in losses:  # a Dataset gives the sample indices: the paper's memory bank, one row per sample
        assert result.criterion.terms["crd"].loss.memory_student.shape[0] == len(data)


def test_resumed_distillation_equals_an_uninterrupted_one(teacher_and_data, tmp_path):
    teacher, data = teacher_and_data
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=128)
    args = dict(losses={"fitnet": 1.0, "kd": 0.5}, layers=["3"], config=cfg, device="cpu", progress=False)
    straight = conv_net(8, seed=1)
    expected = distill(straight, teacher, data, **args)

    class StopAfterSecondEpoch(TrainHook):
        def on_epoch_end(self, model, epoch):
            if epoch == 1:
                raise KeyboardInterrupt  # after distillation saved epoch 2's state, before fit's checkpoint

    ckpt = tmp_path / "train.ckpt"
    with pytest.raises(KeyboardInterrupt):
        distill(conv_net(8, seed=1), teacher, data, checkpoint_path=ckpt, hooks=[StopAfterSecondEpoch()], **args)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = conv_net(8, seed=5)
    got = distill(resumed, teacher, data, checkpoint_path=ckpt, **args)
    assert [h["epoch"] for h in got.history] == [1, 2, 3]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(expected.criterion.parameters(), got.criterion.parameters()):
        torch.testing.assert_close(a, b)
    assert sorted(p.name for p in tmp_path.glob("train.ckpt.distill-*.pt")) == ["train.ckpt.distill-2.pt",
                                                                                "train.ckpt.distill-3.pt"]


def _peer_kl(peers, data):
    with torch.no_grad():
        for p in peers:
            p.eval()
        return float(mutual_kl([p(data.tensors[0]) for p in peers]))


def test_deep_mutual_learning_of_two_peers():
    data = toy_images()
    cfg = TrainConfig(epochs=15, lr=0.05, batch_size=64)
    alone = [conv_net(8, seed=1), conv_net(8, seed=2)]
    for peer in alone:
        fit(peer, data, cfg, device="cpu", progress=False)
    peers = [conv_net(8, seed=1), conv_net(8, seed=2)]
    history = mutual_learning(peers, data, cfg, device="cpu", progress=False)
    assert len(history) == 15 and all(h["dml_kl"] > 0 for h in history)
    for peer in peers:
        assert evaluate(peer, data, device="cpu")["top1"] > 0.8
    assert not all(torch.equal(a, b) for a, b in zip(peers[0].parameters(), peers[1].parameters()))
    # the KL terms pull the peers' predictions together, compared with the same peers trained alone
    assert _peer_kl(peers, data) < 0.5 * _peer_kl(alone, data)
    with pytest.raises(NetslimError, match="2 or more distinct"):
        mutual_learning([peers[0], peers[0]], data, device="cpu", progress=False)


def test_codistill_outside_torch_distributed_is_a_clear_error():
    with pytest.raises(NetslimError, match="torchrun"):
        codistill(conv_net(8), toy_images(64), device="cpu")


CODISTILL_SCRIPT = textwrap.dedent('''
    import torch, torch.distributed as dist
    from torch import nn
    from torch.utils.data import TensorDataset
    from netslim.train import TrainConfig, init_distributed
    from netslim.distill import codistill, distill
    assert init_distributed() and dist.get_world_size() == 2
    torch.set_num_threads(1)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g); y = (x[:, 0] + x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    def gather(t):
        out = [torch.zeros_like(t) for _ in range(2)]; dist.all_gather(out, t.contiguous()); return out
    torch.manual_seed(100 + rank)  # each worker its own model
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        agree_before = (lambda p: (p[0] == p[1]).float().mean().item())(gather(model(x).argmax(1)))
    hist = codistill(model, data, TrainConfig(epochs=4, lr=0.1, batch_size=32), weight=1.0, device="cpu",
                     progress=False)
    params = gather(torch.cat([p.detach().flatten() for p in model.parameters()]))
    with torch.no_grad():
        pred = model(x).argmax(1)
    preds = gather(pred)
    # distill() under DDP: the adapters train on every worker and stay identical
    torch.manual_seed(0); teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    torch.manual_seed(1); student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    res = distill(student, teacher, data, {"kd": 0.5, "fitnet": 1.0}, [("1", "1")],
                  TrainConfig(epochs=1, lr=0.05, batch_size=32), device="cpu", progress=False)
    adapters = gather(torch.cat([p.detach().flatten() for p in res.criterion.parameters()]))
    students = gather(torch.cat([p.detach().flatten() for p in student.parameters()]))
    print(f"RANK{rank} first_kl={hist[0]['peer_kl']:.6f} last_kl={hist[-1]['peer_kl']:.6f} "
          f"gap={hist[-1]['train_loss'] - hist[-1]['train_ce']:.6f} differ={int(not torch.equal(*params))} "
          f"acc={(pred == y).float().mean().item():.3f} agree_before={agree_before:.3f} "
          f"agree_after={(preds[0] == preds[1]).float().mean().item():.3f} "
          f"adapters_equal={int(torch.equal(*adapters))} students_equal={int(torch.equal(*students))}", flush=True)
    dist.destroy_process_group()
''')


def test_codistillation_across_two_ddp_workers(torchrun):
    proc = torchrun(CODISTILL_SCRIPT)
    pattern = (r"RANK(\d) first_kl=([0-9.]+) last_kl=([0-9.]+) gap=([0-9.-]+) differ=(\d) acc=([0-9.]+) "
               r"agree_before=([0-9.]+) agree_after=([0-9.]+) adapters_equal=(\d) students_equal=(\d)")
    records = re.findall(pattern, proc.stdout)  # the two processes share stdout: parse records, not lines
    assert sorted(r[0] for r in records) == ["0", "1"], proc.stdout
    for _, first_kl, last_kl, gap, differ, acc, before, after, adapters_equal, students_equal in records:
        assert float(first_kl) > 0 and float(gap) > 0  # the loss holds the peer term
        assert float(last_kl) < float(first_kl)        # the workers' predictions move together
        assert differ == "1"                           # ... but their models stay their own
        assert float(acc) > 0.9 and float(after) > max(float(before), 0.9)
        assert adapters_equal == "1" and students_equal == "1"


# ------------------------------------------------------------------ recipe stage and finetune
def test_distill_stage_config_errors_are_clear():
    with pytest.raises(NetslimError, match="stage 'distill': unknown loss name 'kdd'; valid loss names: at, ce"):
        build_config("distill", {"losses": {"kdd": 1.0}})
    with pytest.raises(NetslimError, match="unknown key 'loss' in stage 'distill'; valid keys: .*losses"):
        build_config("distill", {"loss": {"kd": 1.0}})
    with pytest.raises(NetslimError, match="unknown model 'resnet57'"):
        build_config("distill", {"teacher": "resnet57", "teacher_weights": "shared"})
    with pytest.raises(NetslimError, match="needs teacher_weights"):
        build_config("distill", {"teacher": "resnet56"})
    with pytest.raises(NetslimError, match="unknown layer-loss name 'att'"):
        build_config("distill", {"losses": {"at": 1.0}, "layers": {"att": ["layer1"]}})
    with pytest.raises(NetslimError, match="stage 'finetune': unknown loss name 'kx'"):
        build_config("finetune", {"distill": {"kx": 1.0}})
    with pytest.raises(NetslimError, match="distill_layers"):
        build_config("finetune", {"distill": {"at": 1.0}})
    assert build_config("finetune", {}).distill == {}  # plain fine-tuning stays the default
    cfg = build_config("distill", {"losses": {"kd": 0.9, "at": 1000}, "layers": [["layer1", "layer1"], "layer2"]})
    assert cfg.teacher == "original" and cfg.student == "current"


def test_distill_stage_and_finetune_with_kd_run_in_a_recipe(shared, tmp_path):
    doc = {"model": "lenet300", "weights": "shared", "data": "mnist", "test_limit": 500, "stages": [
        {"distill": {"student": "lenet5", "losses": {"kd": 0.9}, "temperature": 4, "epochs": 1, "lr": 0.01,
                     "max_steps_per_epoch": 40}},
        {"finetune": {"distill": {"kd": 1.0}, "temperature": 4, "epochs": 1, "lr": 0.01, "max_steps_per_epoch": 15}},
    ]}
    recipe = parse_recipe(doc)
    run = tmp_path / "run"
    metrics = run_recipe(recipe, run, progress=False)
    assert [m["stage"] for m in metrics] == ["baseline", "distill", "finetune"]
    lenet5_params = sum(p.numel() for p in zoo.get("lenet5").parameters())
    assert metrics[1]["params"] == lenet5_params != metrics[0]["params"]  # the stage returned the new student
    assert metrics[1]["top1"] > 0.6  # 40 steps from scratch with KD (chance: 0.1)
    assert metrics[2]["top1"] > metrics[1]["top1"] - 0.03
    state = json.loads((run / "state.json").read_text())
    assert state["artifacts"][0]["distill_terms"]["kd"] > 0 and state["artifacts"][1]["distill_terms"]["kd"] > 0
    assert (run / "stages/00-distill/train.ckpt").is_file()
    assert (run / "stages/00-distill/train.ckpt.distill-1.pt").is_file()
    restored = restore_stage_model(zoo.get("lenet300"), recipe, run, 0)  # replays "student: lenet5"
    saved = torch.load(run / "stages/00-distill.pt", weights_only=True)
    assert type(restored).__name__ == "LeNet5"
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert yaml.safe_load((run / "recipe.yaml").read_text())["stages"][1]["finetune"]["distill"] == {"kd": 1.0}
