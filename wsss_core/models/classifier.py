"""Backbone + global average pooling + linear multi-label head."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ClassifierConfig
from .backbone import Backbone
from .factory import build_backbone


class MultiLabelClassifier(nn.Module):
    """logits = head(mean_hw(backbone(x))); one logit per class (sigmoid outside)."""

    cam_layer_name = "backbone"  # module whose output is the CAM feature map A

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Linear(backbone.out_channels, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        """The layer whose output is `features(x)` (hook target for Grad-CAM)."""
        return self.backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map A (B, C, h, w) the head pools."""
        return self.backbone(x)

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        """head(mean over h, w of A) -> (B, num_classes)."""
        return self.head(a.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: 'backbone' (pretrained layers, lr * backbone_lr_mult),
    'backbone_new' (the backbone's new layers, lr) and 'head' (every other
    parameter of the model, lr). Frozen parameters and empty groups are left out."""
    pretrained, new = model.backbone.named_parameter_groups()
    in_backbone = {id(p) for p in model.backbone.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]
    groups = [("backbone", pretrained, lr * backbone_lr_mult), ("backbone_new", new, lr), ("head", rest, lr)]
    return [
        {"name": name, "params": params, "lr": group_lr, "weight_decay": weight_decay}
        for name, params, group_lr in groups
        if params
    ]


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> MultiLabelClassifier:
    """The classifier described by the `classifier` config section."""
    return MultiLabelClassifier(build_backbone(cfg.backbone, cfg.weights, cfg.output_stride), num_classes)
