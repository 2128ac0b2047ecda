"""Segmenting one image with a trained segmenter, with test-time augmentation
(the folder command `wsss predict` is `predict_folder.predict_folder`).

TTA (the reference: scales 0.5 / 1 / 2 with flips): the normalised image is
resized bilinearly to round(H s) x round(W s) for each scale, it and its
horizontal flip go through the network in one batch, the flipped logits are
flipped back, every logit map is resized bilinearly to (H, W) and they are
averaged; the argmax is the class id (0 = background). A dense CRF may then
refine it (`predict.crf_gt_prob`).

An image whose long side exceeds `max_side` (a phone photo) is segmented at
that long side and its logits are resized back to full size strip by strip:
the network sees objects near the scale it was trained at, and memory stays
bounded by the working size, not by the photo's. With a CRF, the labels are
refined at the working size and resized back (nearest), for the same reason.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cam import scaled_size
from .config import CrfConfig
from .crf import refined_prediction
from .data.transforms import to_normalized_tensor



@torch.inference_mode()
def tta_logits(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
               device: torch.device | str = "cpu", precision: str = "float32") -> torch.Tensor:
    """Averaged logits (C, H, W, float32) of one HxWx3 uint8 image over scales (and
    flips); `precision` "bfloat16": the network runs under bfloat16 autocast."""
    mean, std = model.normalization
    x = to_normalized_tensor(image, mean, std)[None].to(device)
    device_type = x.device.type
    h, w = image.shape[:2]
    total = None
    n = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=scaled_size(h, w, s), mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            out = model(batch).float()
        if flip:
            out = torch.cat([out[:1], out[1:].flip(-1)])
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        total = out.sum(0) if total is None else total + out.sum(0)
        n += out.shape[0]
    return total / n  # type: ignore[operator]


def segment(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
            device: torch.device | str = "cpu", max_side: int | None = None,
            crf: CrfConfig | None = None, precision: str = "float32") -> np.ndarray:
    """Class ids (H, W) uint8 of one image, with test-time augmentation; segmented
    at a long side of at most `max_side` pixels (None: at full size); with `crf`,
    refined by a dense CRF over the classes found (`crf.refined_prediction`), at
    the working size, so a large photo's memory stays bounded by that size."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        labels = tta_logits(model, image, scales, flip, device, precision).argmax(0).to(torch.uint8).cpu().numpy()
        return refined_prediction(image, labels, crf)
    small = working_image(image, max_side)
    logits = tta_logits(model, small, scales, flip, device, precision)
    if crf is None:
        return upsampled_argmax(logits, (h, w))
    labels = refined_prediction(small, logits.argmax(0).to(torch.uint8).cpu().numpy(), crf)
    return np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))


def working_image(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image resized (antialiased bilinear) so that its long side is `max_side`."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


_STRIP_VALUES = 16 * 1024 * 1024  # logit values of one strip (64 MB in float32)


def _bilinear_axis(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weight of each output position, as `F.interpolate(bilinear,
    align_corners=False)` computes them for a given output size."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).float()


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int], rows: int = 256) -> np.ndarray:
    """argmax over classes of `logits` (C, h, w) resized bilinearly to `size`, computed
    `rows` output rows at a time: the full-size (C, H, W) logits never exist."""
    c, h, w = logits.shape
    rows = max(1, min(rows, _STRIP_VALUES // max(1, c * size[1])))  # 200 classes x 4000 columns: fewer rows
    y0, y1, ay = _bilinear_axis(size[0], h)
    x0, x1, ax = _bilinear_axis(size[1], w)
    out = np.empty(size, np.uint8)
    for r in range(0, size[0], rows):
        sl = slice(r, r + rows)
        a = ay[sl].to(logits.device)[None, :, None]
        band = logits[:, y0[sl]] * (1 - a) + logits[:, y1[sl]] * a  # (C, rows, w)
        b = ax.to(logits.device)[None, None, :]
        band = band[:, :, x0] * (1 - b) + band[:, :, x1] * b  # (C, rows, W)
        out[sl] = band.argmax(0).to(torch.uint8).cpu().numpy()
    return out
