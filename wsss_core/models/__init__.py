"""Model layer: backbones by name, the multi-label classifier and its optimizer groups.

    build_backbone(name, weights="imagenet", output_stride=16) -> Backbone
    MultiLabelClassifier(backbone, num_classes); build_classifier(cfg, num_classes)
    param_groups(model, lr, backbone_lr_mult, weight_decay) -> list[dict]
"""

from .backbone import Backbone, BackboneInfo, WeightsError, WeightsNotFoundError
from .classifier import MultiLabelClassifier, build_classifier, param_groups
from .efficientnet import imagenet_lite0, lite0_name_map
from .factory import BACKBONES, OUTPUT_STRIDES, build_backbone

__all__ = [
    "BACKBONES",
    "OUTPUT_STRIDES",
    "Backbone",
    "BackboneInfo",
    "MultiLabelClassifier",
    "WeightsError",
    "WeightsNotFoundError",
    "build_backbone",
    "build_classifier",
    "imagenet_lite0",
    "lite0_name_map",
    "param_groups",
]
