"""Backbone + global average pooling + linear multi-label head."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ClassifierConfig, ConfigError
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

    def at_layer(self, layer: str | None) -> nn.Module:
        """This classifier seen at an earlier backbone layer, for CAMs there:
        `features(x)` is that layer's output and `logits_from_features` runs the
        rest of the network. None (or the last layer) is the model itself."""
        names = self.backbone.layer_names
        if layer is None or layer == names[-1]:
            return self
        if layer not in names:
            raise ConfigError(f"cams.layer: {layer!r} is not a layer of {self.backbone.name}; "
                             f"choose one of: {', '.join(names)}")
        return _LayerView(self, names.index(layer) + 1)


class _LayerView(nn.Module):
    """A MultiLabelClassifier split after backbone layer `split` (same weights)."""

    def __init__(self, model: MultiLabelClassifier, split: int):
        super().__init__()
        self.model = model
        self.before = model.backbone.layer_names[:split]
        self.after = model.backbone.layer_names[split:]

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.backbone.get_submodule(self.before[-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.backbone.run_layers(x, self.before)

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        return self.model.logits_from_features(self.model.backbone.run_layers(a, self.after))

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
