import pytest
import torch

from netslim import NetslimError, zoo
from netslim.zoo import SHARED_CHECKPOINTS

EXPECTED_PARAMS = {"lenet300": 266_610, "lenet5": 431_080, "resnet20": 272_474, "resnet56": 855_770,
                   "mobilenetv2": 2_236_682, "vgg16": 14_986_698}


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_builds_and_runs(name):
    model = zoo.get(name).eval()
    x = torch.randn(*zoo.spec(name).input_size)
    assert model(x).shape == (1, 10)
    assert zoo.get(name, num_classes=7).eval()(x).shape == (1, 7)


@pytest.mark.parametrize("name", sorted(SHARED_CHECKPOINTS))
def test_shared_checkpoints_load_strictly(shared, name):
    model = zoo.get(name, weights=shared / "models" / SHARED_CHECKPOINTS[name])
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    keys = [line.split("\t")[0] for line in (shared / "models" / SHARED_CHECKPOINTS[name].replace(".pt", ".keys.txt"))
            .read_text().splitlines() if line]
    assert list(model.state_dict().keys()) == keys


def test_resnet_depths_have_6n_plus_2_layers():
    for depth in (20, 32, 44, 56, 110):
        model = zoo.get(f"resnet{depth}")
        convs = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "downsample" not in n]
        assert len(convs) + 1 == depth  # + the fc layer


def test_mobilenetv2_strides_for_32x32():
    model = zoo.get("mobilenetv2").eval()
    assert model.features[0][0].stride == (1, 1)
    assert model.features[2].conv[1][0].stride == (1, 1)
    feats = model.features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-1] == 4  # 32 / 8 with three remaining stride-2 stages


def test_torchvision_models_by_name():
    model = zoo.get("torchvision:mobilenet_v3_small", num_classes=5).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert zoo.spec("torchvision:resnet18").input_size == (1, 3, 224, 224)


@pytest.mark.parametrize("bad", ["resnet57", "torchvision:resnet19"])
def test_unknown_model_is_a_clear_error(bad):
    with pytest.raises(NetslimError, match="unknown"):
        zoo.get(bad)


def test_wrong_checkpoint_layout_is_a_clear_error(shared):
    with pytest.raises(NetslimError, match="do not fit"):
        zoo.get("resnet20", weights=shared / "models" / "cifar10_resnet56.pt")
