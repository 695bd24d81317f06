"""VGG-16 for CIFAR (Simonyan & Zisserman 2015, with BatchNorm and a 512-512-classes head)."""
from __future__ import annotations

import torch
from torch import nn

from .registry import register

VGG16_PLAN: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                     512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    def __init__(self, plan: tuple[int | str, ...] = VGG16_PLAN, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(channels, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register("vgg16", input_size=(1, 3, 32, 32), dataset="cifar10")
def vgg16(num_classes: int = 10) -> nn.Module:
    return CifarVGG(VGG16_PLAN, num_classes)
