"""LeNet-300-100 and LeNet-5 (Caffe variant), the MNIST models of Deep Compression (Han et al. 2016, Table 1)."""
from __future__ import annotations

import torch
from torch import nn

from .registry import register


class LeNet300(nn.Module):
    """LeNet-300-100: 784 -> 300 -> 100 -> classes, ReLU between (LeCun et al. 1998)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5: conv 20 k5, pool, conv 50 k5, pool, fc 500, ReLU, fc; no activation after convolutions."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@register("lenet300", input_size=(1, 1, 28, 28), dataset="mnist")
def lenet300(num_classes: int = 10) -> nn.Module:
    return LeNet300(num_classes)


@register("lenet5", input_size=(1, 1, 28, 28), dataset="mnist")
def lenet5(num_classes: int = 10) -> nn.Module:
    return LeNet5(num_classes)
