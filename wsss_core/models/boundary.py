"""IRNet's boundary network: a frozen ImageNet backbone and a small trainable branch.

The branch reads the stages of the backbone (`Backbone.forward_stages`):

    per stage s:  [stride 2 only: max pool to the stride-4 grid (`pool_stem`)]
                  1x1 conv (C_s -> 32, no bias) -> GroupNorm(4, 32) -> ReLU
                  -> bilinear upsampling by stride_s / 4 to the stride-4 grid
    concatenate the stages -> 1x1 conv (32 * n_stages -> 1, with bias) = logit
    boundary = sigmoid(logit), shape (B, 1, ceil(H / 4), ceil(W / 4))

Every backbone's first stage is its stride-2 stem. IRNet reads it (its first
edge input is ResNet-50's stem after its 3x3 max pool, which is what the pool
above computes for ResNet-50; for EfficientNet-Lite0 it is the first block's
output): `stem_input=True`. The pool is centred on the cells of the backbone's
own stride-4 stage (TF "same" convolutions pad the bottom and right only, so
Lite0's pool does too). Without it (the default, and every model saved
before it existed) the branch reads the stages from stride 4 on.

Upsampling uses the scale factor (not a target size) so that the grids of all
stages stay aligned at the top-left corner, then each map is cropped (or, for a
backbone that rounds sizes down, padded by repeating its last row / column) to
exactly `stride4_size(H, W)`.

The backbone keeps its ImageNet weights: its parameters never require grad,
it always runs in eval mode (its BatchNorm statistics never change, whatever
`train()` is called with) and under `torch.no_grad`. Only the branch is
trained and saved; loading rebuilds the backbone from its weights spec and
checks a fingerprint of its tensors so that a branch is never paired with a
different backbone silently.

The displacement branch of IRNet (instance segmentation) is not built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cam_maps import stride4_size
from ..data.transforms import to_normalized_tensor
from .backbone import Backbone, WeightsError, _check_fit, read_model_file, rebuilding
from .factory import build_backbone

BRANCH_CHANNELS = 32
PAD_MULTIPLE = 32  # the backbones' largest stride: every stride-2 layer then sees an even size
GROUPS = 4
FORMAT = "wsss-boundary-1"


class BoundaryBranch(nn.Module):
    """Per-stage 1x1 conv + GN + ReLU, upsampled to stride 4, fused by a 1x1 conv to one logit."""

    def __init__(self, stage_channels: tuple[int, ...], stage_strides: tuple[int, ...], stem_pool: str = "centred"):
        super().__init__()
        self.stem_pool = stem_pool
        if len(stage_channels) != len(stage_strides):
            raise ValueError("stage_channels and stage_strides differ in length")
        for s in stage_strides:
            if s % 4 and s != 2:
                raise ValueError(f"stage strides must be 2 or multiples of 4, got {tuple(stage_strides)}")
        self.stage_strides = tuple(stage_strides)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, BRANCH_CHANNELS, 1, bias=False),
                nn.GroupNorm(GROUPS, BRANCH_CHANNELS),
                nn.ReLU(inplace=True),
            )
            for c in stage_channels
        )
        self.fuse = nn.Conv2d(BRANCH_CHANNELS * len(stage_channels), 1, 1, bias=True)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Stage features -> logits (B, 1, *size), size = the stride-4 size of the input."""
        if len(features) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} stage outputs, got {len(features)}")
        maps = [
            _to_grid(layer(pool_stem(f, self.stem_pool) if stride == 2 else f), max(stride // 4, 1), size)
            for layer, f, stride in zip(self.stages, features, self.stage_strides)
        ]
        return self.fuse(torch.cat(maps, dim=1))


def pool_stem(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Max-pool a stride-2 map to stride 4, each output cell centred where the backbone's own
    stride-4 cell is: 'centred' 3x3 pad 1 (ResNet), 'same' 3x3 padded at the bottom / right
    (TF "same"), 'pair' 2x2 (VGG)."""
    if kind == "centred":
        return F.max_pool2d(x, 3, 2, 1)
    if kind == "same":
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    if kind == "pair":
        return F.max_pool2d(x, 2, 2, ceil_mode=True)
    raise ValueError(f"unknown stem pool {kind!r}")


def _to_grid(x: torch.Tensor, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """Upsample by an integer factor, then crop / replicate-pad bottom-right to `size`."""
    if factor > 1:
        x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    h, w = size
    x = x[..., :h, :w]
    pad_h, pad_w = h - x.shape[-2], w - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x


class BoundaryNet(nn.Module):
    """Frozen backbone + trainable boundary branch; `forward(x)` -> boundary in [0, 1],
    (B, 1, ceil(H / 4), ceil(W / 4)). Inputs normalised with `normalization`."""

    def __init__(self, backbone: Backbone, stem_input: bool = False):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.stem_input = stem_input
        if backbone.stage_strides[0] != 2:
            raise ValueError(f"backbone {backbone.name!r}: its first stage must be the stride-2 stem")
        self.first_stage = 0 if stem_input else 1  # stage 0: the stride-2 stem
        self.branch = BoundaryBranch(backbone.stage_channels[self.first_stage:],
                                     backbone.stage_strides[self.first_stage:], backbone.info.stem_pool)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the backbone's weights expect (RGB in [0, 1])."""
        return self.backbone.normalization

    def train(self, mode: bool = True) -> "BoundaryNet":
        """Train / eval the branch; the backbone stays in eval mode always."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary logits (B, 1, ceil(H / 4), ceil(W / 4)); the backbone runs without grad.

        The input is padded at the bottom and right (reflected) to a multiple of
        PAD_MULTIPLE and the logits cropped back: TensorFlow-style "same"
        padding pads the top and left of an odd-sized input too, which the
        network, trained on even crops, never saw, and which lit a bright band
        along the top (odd height) or left (odd width) edge of every map."""
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        with torch.no_grad():
            features = self.backbone.forward_stages(x)[self.first_stage:]
        h4, w4 = stride4_size(h, w)
        return self.branch(features, stride4_size(x.shape[-2], x.shape[-1]))[..., :h4, :w4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(x).float())  # float32: fp16 saturates at 1 (zero gradient)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The branch's parameters (the only ones that require grad)."""
        return [p for p in self.branch.parameters() if p.requires_grad]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """One optimizer group 'head' with the branch's parameters (the frozen backbone has none)."""
        return [{"name": "head", "params": self.trainable_parameters(), "lr": lr, "weight_decay": weight_decay}]


@torch.no_grad()
def boundary_with_flip(model: BoundaryNet, x: torch.Tensor) -> torch.Tensor:
    """IRNet inference: the image and its horizontal flip in one batch; the flipped
    logits are flipped back and averaged with the others before the sigmoid.
    x (B, 3, H, W) -> (B, 1, ceil(H / 4), ceil(W / 4)) in [0, 1]."""
    n = x.shape[0]
    logits = model.forward_logits(torch.cat([x, x.flip(-1)], dim=0))
    return torch.sigmoid(logits[:n] / 2 + logits[n:].flip(-1) / 2)


def boundary_map(model: BoundaryNet, image: np.ndarray, device: torch.device, flip: bool = True) -> np.ndarray:
    """The boundary map (ceil(H/4), ceil(W/4)) in [0, 1] of one image (H, W, 3) at its own size."""
    mean, std = model.normalization
    x = to_normalized_tensor(image, mean, std)[None].to(device)
    with torch.inference_mode():
        b = boundary_with_flip(model, x) if flip else model(x)
    return b[0, 0].float().cpu().numpy()


def backbone_fingerprint(backbone: nn.Module) -> str:
    """sha256 over the backbone's state dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for key, t in backbone.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_boundary(path: str | Path, model: BoundaryNet, backbone_name: str, output_stride: int,
                  backbone_weights: str = "imagenet") -> Path:
    """Store the branch's state dict, whether it reads the stem, and what rebuilds the
    frozen backbone: its name, output stride, weights spec ('imagenet' or a state-dict
    path, not stored itself), normalisation and a fingerprint of its tensors."""
    from ..store import save_torch

    if backbone_name != model.backbone.name or output_stride != model.backbone.stride:
        raise ValueError(
            f"save_boundary: backbone {backbone_name!r} at output stride {output_stride} does not describe the "
            f"model's backbone ({model.backbone.name!r} at output stride {model.backbone.stride})"
        )
    if backbone_weights == "random":
        raise ValueError("save_boundary: a random backbone cannot be rebuilt; use 'imagenet' or a weights file")
    return save_torch(path, {
        "format": FORMAT,
        "branch": {k: v.detach().cpu() for k, v in model.branch.state_dict().items()},
        "backbone": backbone_name,
        "output_stride": output_stride,
        "backbone_weights": str(backbone_weights),  # a path is stored as text: the file loads with weights_only
        "normalization": [list(v) for v in model.normalization],
        "backbone_fingerprint": backbone_fingerprint(model.backbone),
        "stem_input": model.stem_input,
    })


def load_boundary(path: str | Path, device: torch.device | str = "cpu") -> BoundaryNet:
    """Rebuild a saved boundary net: the backbone from its weights spec (ImageNet by
    default), the branch loaded strictly; in eval mode on `device`. Raises
    WeightsError if the file does not fit or the rebuilt backbone differs."""
    blob = read_model_file(path, FORMAT, "boundary model")
    with rebuilding(path, "boundary model"):
        backbone = build_backbone(blob["backbone"], blob["backbone_weights"], blob["output_stride"])
        if backbone_fingerprint(backbone) != blob["backbone_fingerprint"]:
            raise WeightsError(
                f"{path}: the backbone rebuilt from {blob['backbone_weights']!r} differs from the one the "
                f"boundary branch was trained on"
            )
        model = BoundaryNet(backbone, stem_input=blob.get("stem_input", False))  # absent: saved before it existed
        _check_fit(blob["branch"], model.branch.state_dict(), (), f"{path}: does not fit the boundary branch")
        model.branch.load_state_dict(blob["branch"], strict=True)
    return model.to(device).eval()
