"""MobileNetV2 for 32x32 inputs (Sandler et al. 2018): torchvision's model with two strides set to 1."""
from __future__ import annotations

from torch import nn

from .registry import register


@register("mobilenetv2", input_size=(1, 3, 32, 32), dataset="cifar10")
def mobilenetv2(num_classes: int = 10) -> nn.Module:
    """torchvision's ``mobilenet_v2`` with the stem conv and the first stride-2 depthwise conv at stride 1."""
    from torchvision.models import mobilenet_v2  # imported here: torchvision costs a second at start-up

    model = mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0].stride = (1, 1)
    model.features[2].conv[1][0].stride = (1, 1)
    return model
