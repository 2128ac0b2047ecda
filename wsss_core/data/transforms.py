"""Image transforms for training and evaluation (torchvision.transforms.v2).

Randomness is drawn per sample from (seed, epoch, index) so augmentation is
the same whatever the number of loader workers, processes or resumes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
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


class _CenterPad(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        ph, pw = max(0, self.size - h), max(0, self.size - w)
        pad = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]
        return v2.functional.pad(img, pad, fill=0.0)[..., : self.size, : self.size]


class LabelledTensors(torch.utils.data.Dataset):
    """Wrap LabelledImages (images + image-level labels) as tensors for training.

    `columns` picks and orders the label columns the model predicts (so
    excluded classes are simply left out). Augmentation randomness is seeded
    from (seed, epoch, index); call `set_epoch` each epoch.
    """

    def __init__(self, images, transform: Callable, columns: Sequence[int] | None = None, seed: int = 0):
        self.images = images
        self.transform = transform
        self.columns = None if columns is None else list(columns)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, labels = self.images[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + i) % (2**63))
            x = self.transform(image)
        y = labels if self.columns is None else labels[self.columns]
        return x, torch.as_tensor(np.asarray(y), dtype=torch.float32), i
