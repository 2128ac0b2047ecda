"""Image transforms for training and evaluation (torchvision.transforms.v2).

Randomness is drawn per sample from (seed, epoch, index) so augmentation is
the same whatever the number of loader workers, processes or resumes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..config import AugmentConfig


def train_transform(
    image_size: int, augment: AugmentConfig, mean: Sequence[float], std: Sequence[float]
) -> Callable[[np.ndarray], torch.Tensor]:
    """Random rescale (longer side ~ image_size x scale), flip, colour jitter,
    normalise, random crop to a square `image_size` (padding with the mean)."""
    lo, hi = augment.scale_range
    steps: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    steps.append(_RandomLongerSide(image_size, lo, hi))
    if augment.flip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 3, 0.5)))
    steps += [v2.Normalize(mean, std), v2.RandomCrop(image_size, pad_if_needed=True, fill=0.0)]
    return v2.Compose(steps)


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[np.ndarray], torch.Tensor]:
    """Longer side to image_size, normalise, centre-pad to a square."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            _RandomLongerSide(image_size, 1.0, 1.0),
            v2.Normalize(mean, std),
            _CenterPad(image_size),
        ]
    )


def joint_train_transform(
    crop_size: int, augment: AugmentConfig, mean: Sequence[float], std: Sequence[float], ignore_index: int = 255
) -> Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """(image HxWx3 uint8, label map HxW uint8) -> (normalised (3, c, c) float,
    (c, c) int64), with c = crop_size: the same random rescale of the image
    size by U(scale_range) (labels resized with nearest), flip and crop for
    both, colour jitter for the image only; padding is the mean colour in the
    image and `ignore_index` in the labels."""
    lo, hi = augment.scale_range
    steps: list = [_RandomRescale(lo, hi)]
    if augment.flip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 3, 0.5)))
    steps.append(v2.Normalize(mean, std))  # before the crop: padding 0 is the mean colour
    steps.append(v2.RandomCrop(crop_size, pad_if_needed=True,
                               fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index}))
    pipeline = v2.Compose(steps)

    def apply(image: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0))
        m = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(labels)).long())
        x, m = pipeline(x, m)
        return x.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)

    return apply


def to_normalized_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 -> normalised (3,H,W) float tensor at the original size."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


class _RandomLongerSide(torch.nn.Module):
    """Resize so the longer side is size x U(lo, hi), keeping the aspect ratio."""

    def __init__(self, size: int, lo: float, hi: float):
        super().__init__()
        self.size, self.lo, self.hi = size, lo, hi

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s = self.lo + (self.hi - self.lo) * float(torch.rand(())) if self.hi > self.lo else self.lo
        h, w = img.shape[-2:]
        k = self.size * s / max(h, w)
        return v2.functional.resize(img, [max(1, round(h * k)), max(1, round(w * k))], antialias=True)


class _RandomRescale(torch.nn.Module):
    """Scale the image size by U(lo, hi); v2 resizes masks with nearest."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, *inputs: Any) -> Any:
        s = self.lo + (self.hi - self.lo) * float(torch.rand(())) if self.hi > self.lo else self.lo
        h, w = v2.functional.get_size(inputs[0])
        size = [max(1, round(h * s)), max(1, round(w * s))]
        out = tuple(v2.functional.resize(t, size, antialias=True) for t in inputs)
        return out if len(out) > 1 else out[0]


class _CenterPad(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        ph, pw = max(0, self.size - h), max(0, self.size - w)
        pad = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]
        return v2.functional.pad(img, pad, fill=0.0)[..., : self.size, : self.size]


class _EpochSeeded(torch.utils.data.Dataset):
    """Items whose augmentation is seeded from (seed, epoch, index); the fit
    loop calls `set_epoch` each epoch."""

    def __init__(self, items: Any, transform: Callable, seed: int = 0):
        self.items = items
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)


class LabelledTensors(_EpochSeeded):
    """Wrap LabelledImages (images + image-level labels) as tensors for training.

    `columns` picks and orders the label columns the model predicts (so
    excluded classes are simply left out). Augmentation randomness is seeded
    from (seed, epoch, index); call `set_epoch` each epoch.
    """

    def __init__(self, images, transform: Callable, columns: Sequence[int] | None = None, seed: int = 0):
        super().__init__(images, transform, seed)
        self.columns = None if columns is None else list(columns)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, labels = self.items[i]
        with seeded(self.seed, self.epoch, i):
            x = self.transform(image)
        y = labels if self.columns is None else labels[self.columns]
        return x, torch.as_tensor(np.asarray(y), dtype=torch.float32), i


@contextlib.contextmanager
def seeded(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Torch's random state for one sample of one epoch (restored afterwards):
    augmentation independent of workers, processes and resumes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + epoch * 7919 + index) % (2**63))
        yield


class JointTensors(_EpochSeeded):
    """Images with per-pixel labels (pseudo masks, confident labels, real masks)
    as augmented training tensors: items `(x, labels, index)`.

    `pairs[i]` returns (image HxWx3 uint8, label map HxW uint8); randomness is
    seeded from (seed, epoch, index) like `LabelledTensors`. `target(labels)`
    may turn the augmented label map into other targets (a tuple)."""

    def __init__(self, pairs: Any, transform: Callable, seed: int = 0, target: Callable | None = None):
        super().__init__(pairs, transform, seed)
        self.target = target

    def __getitem__(self, i: int) -> tuple:
        image, labels = self.items[i]
        with seeded(self.seed, self.epoch, i):
            x, y = self.transform(image, labels)
        targets = (y,) if self.target is None else tuple(self.target(y))
        return (x, *targets, i)
