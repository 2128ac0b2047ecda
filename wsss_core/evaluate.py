"""Evaluation of every stage that yields masks, against the dataset's masks.

Only this module (and notebooks' pictures) read masks; training code never does.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .metrics import ConfusionMatrix, segmentation_scores


def labels_from_cams(high_res: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Label map from normalised CAMs: argmax over [background = threshold, cams],
    mapped to class ids (0 = background)."""
    from .crf import cam_label_indices

    h, w = high_res.shape[-2:]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    lut = np.concatenate([[0], np.asarray(keys)]).astype(np.uint8)
    return lut[cam_label_indices(high_res, bg_threshold)]


def cam_threshold_sweep(
    items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    thresholds: Sequence[float],
    classes: Sequence[str],
) -> dict:
    """mIoU of CAM label maps at each background threshold.

    `items` yields (high_res (K,H,W), keys (K,), gt mask (H,W)). Returns the
    curve, the best threshold and the per-class scores at it.
    """
    cms = [ConfusionMatrix(len(classes)) for _ in thresholds]
    n = 0
    for high_res, keys, gt in items:
        n += 1
        for cm, t in zip(cms, thresholds):
            cm.update(labels_from_cams(high_res, keys, t), gt)
    curve = [float(cm.miou()) for cm in cms]
    best = int(np.nanargmax(curve)) if n else 0
    return {
        "images": n,
        "thresholds": [float(t) for t in thresholds],
        "miou": curve,
        "best_threshold": float(thresholds[best]),
        "best": segmentation_scores(cms[best], classes),
    }
