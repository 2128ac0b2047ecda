"""Segmenting one image with a trained segmenter, with test-time augmentation
(the folder command `wsss predict` is `stages.predict.predict_folder`).

TTA (the reference: scales 0.5 / 1 / 2 with flips): the normalised image is
resized bilinearly to round(H s) x round(W s) for each scale, it and its
horizontal flip go through the network in one batch, the flipped logits are
flipped back, every logit map is resized bilinearly to (H, W) and they are
averaged; the argmax is the class id (0 = background).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cam import scaled_size
from .data.transforms import to_normalized_tensor



@torch.inference_mode()
def tta_logits(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Averaged logits (C, H, W) of one HxWx3 uint8 image over scales (and flips)."""
    mean, std = model.normalization
    x = to_normalized_tensor(image, mean, std)[None].to(device)
    h, w = image.shape[:2]
    total = None
    n = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=scaled_size(h, w, s), mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        out = model(batch).float()
        if flip:
            out = torch.cat([out[:1], out[1:].flip(-1)])
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        total = out.sum(0) if total is None else total + out.sum(0)
        n += out.shape[0]
    return total / n  # type: ignore[operator]


def segment(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Class ids (H, W) uint8 of one image, with test-time augmentation."""
    return tta_logits(model, image, scales, flip, device).argmax(0).to(torch.uint8).cpu().numpy()
