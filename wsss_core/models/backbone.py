"""The `Backbone` module shared by every architecture, and loading weights into it.

A backbone is a plain container of the source network's own modules (timm's
or torchvision's names, so its state-dict keys are the source keys minus the
ImageNet head) plus a *stage plan*: the dotted module names run one after the
other, grouped into stages. `forward_stages` runs the plan and returns every
stage's output; `forward` returns the last one, the feature map used for CAMs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ..config import ConfigError
from ..store import FileError, read_torch

StateDict = dict[str, torch.Tensor]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ConfigError):
    """Backbone weights are unavailable or do not fit; the message names the file or source."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weights path that is not a file."""


@dataclass(frozen=True)
class BackboneInfo:
    """What a builder declares about the backbone it assembles."""

    name: str
    stage_plan: tuple[tuple[str, ...], ...]
    stage_channels: tuple[int, ...]
    stage_strides: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source_head_prefixes: tuple[str, ...] = ()  # pretrained-file keys that are dropped (ImageNet head)
    new_prefixes: tuple[str, ...] = ()  # backbone keys no pretrained file has (new layers)
    convert: Callable[[StateDict], StateDict] | None = None  # foreign key names -> ours
    # how the stride-2 stem is max-pooled onto the stride-4 grid, centred as the backbone's own stride-4
    # cells are: "centred" 3x3 pad 1 (ResNet's max pool), "same" 3x3 padded bottom / right (TF "same"
    # convolutions), "pair" 2x2 (VGG's pools)
    stem_pool: str = "centred"


class Backbone(nn.Module):
    """Feature extractor: `forward(x)` -> (B, out_channels, H/stride, W/stride)."""

    def __init__(self, info: BackboneInfo, modules: Mapping[str, nn.Module]):
        super().__init__()
        for key, module in modules.items():
            self.add_module(key, module)
        self.info = info
        self.name = info.name
        self.stage_channels = info.stage_channels
        self.stage_strides = info.stage_strides
        self.out_channels = info.stage_channels[-1]
        self.stride = info.stage_strides[-1]
        self.weights_source = "random"
        for stage in info.stage_plan:  # fail at build time on a wrong plan
            for key in stage:
                self.get_submodule(key)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the input normalisation this backbone's weights expect (0-1 RGB)."""
        return self.info.mean, self.info.std

    @property
    def cam_layer_name(self) -> str:
        """Dotted name (inside the backbone) of the module whose output is the CAM feature map."""
        return self.info.stage_plan[-1][-1]

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output equals `forward(x)` (hook target for CAMs)."""
        return self.get_submodule(self.cam_layer_name)

    @property
    def layer_names(self) -> list[str]:
        """Names of the backbone's modules in execution order (CAM layer choices)."""
        return [key for stage in self.info.stage_plan for key in stage]

    def run_layers(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Apply the named modules in order (a contiguous slice of `layer_names`)."""
        for key in names:
            x = self.get_submodule(key)(x)
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every stage, shallow to deep (strides `stage_strides`)."""
        outs = []
        for stage in self.info.stage_plan:
            for key in stage:
                x = self.get_submodule(key)(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map."""
        return self.forward_stages(x)[-1]

    def named_parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained, new) trainable parameters; new = layers no pretrained file has."""
        pretrained, new = [], []
        for key, p in self.named_parameters():
            if p.requires_grad:
                (new if key.startswith(self.info.new_prefixes) else pretrained).append(p)
        return pretrained, new

    def load_pretrained(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a source (timm/torchvision) or own state dict; strict apart from the
        dropped ImageNet head and the new layers. Raises WeightsError naming `source`."""
        state = _unwrap(state, source)
        if self.info.convert is not None:
            state = self.info.convert(state)
        state = {k: v for k, v in state.items() if not k.startswith(self.info.source_head_prefixes)}
        own = self.state_dict()
        _check_fit(state, own, self.info.new_prefixes, f"{source}: does not fit backbone {self.name!r}")
        full = {k: state.get(k, own[k]) for k in own}
        self.load_state_dict(full, strict=True)
        self.weights_source = source


def _unwrap(state: Mapping, source: str) -> StateDict:
    """Accept a bare state dict, {'state_dict': ...}, DDP 'module.' keys or a saved
    classifier's 'backbone.' keys."""
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{source}: not a state dict (a mapping of names to tensors)")
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return dict(state)


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@contextlib.contextmanager
def rebuilding(path: str | Path, what: str) -> Iterator[None]:
    """Rebuilding a model from a saved file: metadata that does not describe a
    model wsss can build (a hand-edited or foreign file) is one WeightsError
    naming the file, not a traceback."""
    try:
        yield
    except WeightsError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: cannot rebuild this {what} from it ({type(e).__name__}: {detail}); "
                           "rerun the stage that wrote it") from None


def read_model_file(path: str | Path, fmt: str, what: str) -> dict:
    """The saved dict of a `what` model file, after checking it exists and has format `fmt`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {what} file not found")
    try:
        blob = read_torch(path, what)  # tensors and plain values only: nothing in a run folder runs code
    except FileError as e:
        raise WeightsError(str(e)) from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise WeightsError(f"{path}: not a saved {what}")
    return blob


def _check_fit(state: StateDict, own: StateDict, optional: tuple[str, ...], what: str) -> None:
    """Raise WeightsError listing missing / unexpected / wrong-shape keys."""
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (file vs model): {_listing(shapes)}")
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))

