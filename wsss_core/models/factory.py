"""`build_backbone` by name, with weights resolved before any network is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .backbone import Backbone
from .efficientnet import build_efficientnet_lite0, shipped_weights
from .torchvision_nets import build_resnet50, build_vgg16_gap, resnet50_imagenet, vgg16_imagenet
from .weights import WeightsSource, local_weights

OUTPUT_STRIDES = (8, 16)


@dataclass(frozen=True)
class BackboneEntry:
    build: Callable[[int], Backbone]  # output_stride -> random-init backbone
    imagenet: Callable[[], WeightsSource]  # where its ImageNet weights come from


BACKBONES: dict[str, BackboneEntry] = {
    "efficientnet_lite0": BackboneEntry(build_efficientnet_lite0, shipped_weights),
    "resnet50": BackboneEntry(build_resnet50, resnet50_imagenet),
    "vgg16_gap": BackboneEntry(build_vgg16_gap, vgg16_imagenet),
}


def resolve_weights(name: str, weights: str) -> WeightsSource:
    """'imagenet' | 'random' | path -> a source; fails now if unavailable."""
    if weights == "random":
        return WeightsSource("random")
    if weights == "imagenet":
        return BACKBONES[name].imagenet()
    return local_weights(weights)


def build_backbone(name: str, weights: str = "imagenet", output_stride: int = 16) -> Backbone:
    """A backbone by name (see BACKBONES) at output stride 8 or 16, with weights
    'imagenet', 'random' or the path of a state-dict file (the source network's
    own keys or a saved backbone / classifier)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
    source = resolve_weights(name, weights)
    backbone = BACKBONES[name].build(output_stride)
    if source.kind != "random":
        backbone.load_pretrained(source.load(), source.describe())
    return backbone
