"""Model layer: backbones by name, the multi-label classifier and its optimizer groups.

    build_backbone(name, weights="imagenet", output_stride=16) -> Backbone
    MultiLabelClassifier(backbone, num_classes); build_classifier(cfg, num_classes)
    param_groups(model, lr, backbone_lr_mult, weight_decay) -> list[dict]
    BoundaryNet(backbone, stem_input=False); boundary_with_flip(model, x); save_boundary / load_boundary
    build_segmenter(backbone, num_classes, output_stride, atrous_rates, weights) -> Segmenter
    save_segmenter / load_segmenter
"""

from .backbone import Backbone, BackboneInfo, WeightsError, WeightsNotFoundError
from .boundary import BoundaryNet, boundary_with_flip, load_boundary, save_boundary
from .classifier import MultiLabelClassifier, build_classifier, param_groups
from .efficientnet import imagenet_lite0, lite0_name_map
from .factory import BACKBONES, OUTPUT_STRIDES, build_backbone
from .segmenter import IGNORE_INDEX, Segmenter, build_segmenter, load_segmenter, pixel_loss, save_segmenter, segmentation_loss

__all__ = [
    "BACKBONES",
    "OUTPUT_STRIDES",
    "Backbone",
    "BackboneInfo",
    "BoundaryNet",
    "IGNORE_INDEX",
    "MultiLabelClassifier",
    "Segmenter",
    "WeightsError",
    "WeightsNotFoundError",
    "boundary_with_flip",
    "build_backbone",
    "build_classifier",
    "build_segmenter",
    "imagenet_lite0",
    "lite0_name_map",
    "load_boundary",
    "load_segmenter",
    "param_groups",
    "save_boundary",
    "save_segmenter",
    "pixel_loss",
    "segmentation_loss",
]
