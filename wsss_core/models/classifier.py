"""Backbone + global average pooling + linear multi-label head, optionally
with ReCAM's second head (Chen et al., CVPR 2022: "Class Re-Activation Maps")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClassifierConfig, ConfigError
from .backbone import Backbone
from .factory import build_backbone


class MultiLabelClassifier(nn.Module):
    """logits = head(mean_hw(backbone(x))); one logit per class (sigmoid outside).

    With `recam=True` it also holds ReCAM's `recam_head` (a bias-free linear map
    from pooled features to classes), trained by `recam_logits` with a softmax
    cross-entropy; ReCAM's CAMs weigh the features by its weights times `head`'s
    (`cam_model(head="recam")`)."""

    cam_layer_name = "backbone"  # module whose output is the CAM feature map A

    def __init__(self, backbone: Backbone, num_classes: int, recam: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Linear(backbone.out_channels, num_classes)
        self.recam_head = nn.Linear(backbone.out_channels, num_classes, bias=False) if recam else None

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

    def forward(self, x: torch.Tensor, recam: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The logits; with `recam`, (logits, `recam_logits`) from one backbone pass
        (an argument rather than a method so that DistributedDataParallel sees it)."""
        a = self.features(x)
        logits = self.logits_from_features(a)
        return (logits, self.recam_logits(a)) if recam else logits

    def recam_logits(self, a: torch.Tensor) -> torch.Tensor:
        """ReCAM's re-activation scores (B, N, N): row k is `recam_head` applied to
        the mean over h, w of A weighted by class k's CAM, ReLU(W_k . A) divided by
        its spatial max (+1e-5), W being `head`'s weights. Row k is meant to score
        class k highest (softmax cross-entropy over the image's labelled classes)."""
        if self.recam_head is None:
            raise ValueError("this classifier has no ReCAM head (build it with recam=True)")
        cams = F.relu(torch.einsum("kc,bchw->bkhw", self.head.weight, a))
        cams = cams / (cams.amax((2, 3), keepdim=True) + 1e-5)
        pooled = torch.einsum("bkhw,bchw->bkc", cams, a) / (a.shape[2] * a.shape[3])
        return self.recam_head(pooled)

    def cam_model(self, layer: str | None = None, head: str = "classifier") -> nn.Module:
        """What the CAMs read: this classifier at `layer` (`at_layer`), scored by its
        `head` ("classifier") or by ReCAM's (`head="recam"`, last layer only)."""
        check_cam_head(head, layer, self.recam_head is not None, self.backbone.layer_names[-1])
        return self.at_layer(layer) if head == "classifier" else _RecamView(self)

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
        self.train(model.training)  # a view is in the model's mode (a new Module would say training)

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.backbone.get_submodule(self.before[-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.backbone.run_layers(x, self.before)

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        return self.model.logits_from_features(self.model.backbone.run_layers(a, self.after))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def check_cam_head(head: str, layer: str | None, recam_trained: bool, last_layer: str | None) -> None:
    """A one-line ConfigError unless `head` can score CAMs at `layer`: "recam" needs
    a classifier trained with a ReCAM head and the last feature map."""
    if head not in ("classifier", "recam"):
        raise ConfigError(f"cams.head: unknown head {head!r}; choose classifier or recam")
    if head == "recam" and not recam_trained:
        raise ConfigError("cams.head: 'recam' needs a classifier trained with classifier.recam_weight > 0")
    if head == "recam" and layer not in (None, last_layer):
        raise ConfigError(f"cams.layer: {layer!r} with cams.head 'recam': ReCAM's head reads the last "
                          "feature map; set cams.layer to null")


class _RecamView(nn.Module):
    """A MultiLabelClassifier scored as ReCAM scores its CAMs: a GAP + linear CAM
    model whose class weights are the ReCAM head's times the classifier head's,
    element by element (ReCAM's code weighs the features by both), with no bias,
    taken when the view is made; Grad-CAM on it is ReCAM's CAM, ReLU((W_recam * W) . A) / (h w)."""

    def __init__(self, model: MultiLabelClassifier):
        super().__init__()
        self.model = model
        w = (model.recam_head.weight * model.head.weight).detach()  # the trained weights when the view is made
        self.head = nn.Linear(w.shape[1], w.shape[0], bias=False).to(device=w.device, dtype=w.dtype)
        self.head.weight.data.copy_(w)
        self.head.requires_grad_(False)
        self.train(model.training)  # a view is in the model's mode (a new Module would say training)

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
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
    return MultiLabelClassifier(build_backbone(cfg.backbone, cfg.weights, cfg.output_stride), num_classes,
                                recam=cfg.recam_weight > 0)
