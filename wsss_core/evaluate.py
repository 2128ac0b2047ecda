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


# --------------------------------------------------------------------------- boundaries
def mask_edges(mask: np.ndarray, void: int = 255) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another class.

    Void pixels first take the class of the nearest labelled pixel: VOC and
    MSRC outline objects with a void band, and the class border lies inside it."""
    from scipy import ndimage

    m = np.asarray(mask)
    is_void = m == void
    if is_void.all():
        return np.zeros(m.shape, bool)
    if is_void.any():
        _, (iy, ix) = ndimage.distance_transform_edt(is_void, return_indices=True)
        m = m[iy, ix]
    edges = np.zeros(m.shape, bool)
    for a, b, at in ((m[:, :-1], m[:, 1:], (slice(None), slice(None, -1))),
                     (m[:-1, :], m[1:, :], (slice(None, -1), slice(None)))):
        edges[at] |= (a != b) & (a != void) & (b != void)
    return edges


def _to_cells(edges: np.ndarray, shape: tuple[int, int], stride: int = 4) -> np.ndarray:
    """Edge pixels -> stride-4 cells that contain one (the boundary map's grid)."""
    h, w = shape
    pad = np.zeros((h * stride, w * stride), bool)
    pad[: edges.shape[0], : edges.shape[1]] = edges[: h * stride, : w * stride]
    return pad.reshape(h, stride, w, stride).any(axis=(1, 3))


def _dilate(a: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation (one cell of tolerance)."""
    p = np.pad(a, 1)
    out = np.zeros_like(a)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy: dy + a.shape[0], dx: dx + a.shape[1]]
    return out


def boundary_scores(
    items: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Sequence[float]
) -> dict:
    """Precision / recall of boundary maps against the class edges of masks.

    `items` yields (boundary (h, w) in [0, 1] at stride 4, mask (H, W)). On the
    stride-4 grid, a cell is a true edge when it holds a mask edge pixel; a
    predicted edge (boundary > t) is correct within one cell of a true edge,
    and a true edge is found within one cell of a predicted one. Returns the
    curve over `thresholds` and the threshold of the best F-score.
    """
    stats = np.zeros((len(thresholds), 4), np.int64)  # pred ok, pred, gt found, gt
    n = 0
    for boundary, mask in items:
        n += 1
        b = np.asarray(boundary, np.float32)
        gt = _to_cells(mask_edges(mask), b.shape)
        gt_near = _dilate(gt)
        for k, t in enumerate(thresholds):
            pred = b > t
            stats[k] += [(pred & gt_near).sum(), pred.sum(), (gt & _dilate(pred)).sum(), gt.sum()]
    precision = [float(s[0] / s[1]) if s[1] else float("nan") for s in stats]
    recall = [float(s[2] / s[3]) if s[3] else float("nan") for s in stats]
    f = [2 * p * r / (p + r) if p + r > 0 else 0.0 for p, r in zip(precision, recall)]
    best = int(np.nanargmax(f)) if n else 0
    return {"images": n, "thresholds": [float(t) for t in thresholds], "precision": precision, "recall": recall,
            "f": f, "best_threshold": float(thresholds[best]), "best_f": float(f[best]),
            "best_precision": precision[best], "best_recall": recall[best]}
