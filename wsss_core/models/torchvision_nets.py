"""ResNet-50 (IRNet strides) and the reference VGG16-BN GAP body, from torchvision.

Both keep torchvision's module names, so torchvision's ImageNet files (and a
backbone's own saved state dict) load directly; the ImageNet heads (`fc.*`,
`classifier.*`) are dropped.
"""

from __future__ import annotations

from torch import nn
from torchvision import models

from .backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneInfo
from .weights import WeightsSource, download_weights

# torchvision's VGG16 configuration: channels per conv, "M" = 2x2 max pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_POOL4, _VGG_CONV5 = 33, (34, 37, 40)  # indices inside `features` (conv, bn, relu per conv)


def resnet50_imagenet() -> WeightsSource:
    """torchvision's original ImageNet ResNet-50 weights (cache or download)."""
    return download_weights("resnet50", models.ResNet50_Weights.IMAGENET1K_V1.url)


def vgg16_imagenet() -> WeightsSource:
    """torchvision's ImageNet VGG16-BN weights (cache or download)."""
    return download_weights("vgg16_gap", models.VGG16_BN_Weights.IMAGENET1K_V1.url)


def build_resnet50(output_stride: int) -> Backbone:
    """ResNet-50, random init. OS 16: layer4 stride 1, no dilation (IRNet strides
    2, 2, 2, 1). OS 8: layer3 and layer4 dilated (torchvision's replace_stride_with_dilation)."""
    net = models.resnet50(weights=None, replace_stride_with_dilation=[False, output_stride == 8, output_stride == 8])
    if output_stride == 16:
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    keys = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    info = BackboneInfo(
        name="resnet50",
        stage_plan=(("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",)),
        stage_channels=(64, 256, 512, 1024, 2048),
        stage_strides=(2, 4, 8, output_stride, output_stride),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source_head_prefixes=("fc.",),
    )
    return Backbone(info, {k: getattr(net, k) for k in keys})


def _vgg16_bn_features() -> list[nn.Module]:
    """torchvision's vgg16_bn `features` layout without pool5, with its init."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        conv = nn.Conv2d(channels, v, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        channels = v
    return layers


def _extra_layers(n: int = 3, channels: int = 512) -> nn.Sequential:
    """The reference's new layers: n x [3x3 conv + ReLU]."""
    layers: list[nn.Module] = []
    for _ in range(n):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def build_vgg16_gap(output_stride: int) -> Backbone:
    """VGG16-BN body without pool5 + 3 new conv layers, random init. OS 8 (the
    reference): pool4 3x3 stride 1 and conv5 dilation 2; OS 16: pool4 as is."""
    layers = _vgg16_bn_features()
    if output_stride == 8:
        layers[_VGG_POOL4] = nn.MaxPool2d(3, stride=1, padding=1)
        for i in _VGG_CONV5:
            layers[i].dilation, layers[i].padding = (2, 2), (2, 2)
    n = len(layers)
    info = BackboneInfo(
        name="vgg16_gap",
        stage_plan=(
            tuple(f"features.{i}" for i in range(0, 7)),  # conv1 + pool1
            tuple(f"features.{i}" for i in range(7, 14)),  # conv2 + pool2
            tuple(f"features.{i}" for i in range(14, 24)),  # conv3 + pool3
            tuple(f"features.{i}" for i in range(24, 34)),  # conv4 + pool4
            tuple(f"features.{i}" for i in range(34, n)) + ("extra",),  # conv5 + new layers
        ),
        stage_channels=(64, 128, 256, 512, 512),
        stage_strides=(2, 4, 8, output_stride, output_stride),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source_head_prefixes=("classifier.",),
        new_prefixes=("extra.",),
        stem_pool="pair",
    )
    return Backbone(info, {"features": nn.Sequential(*layers), "extra": _extra_layers()})
