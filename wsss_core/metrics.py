"""Evaluation metrics (numpy only).

Segmentation: a streaming :class:`ConfusionMatrix` (rows = ground truth,
columns = prediction) with IoU / mIoU / pixel and class accuracy, and
:func:`segmentation_scores` for a JSON-able summary.

Multi-label classification: per-class average precision (non-interpolated,
ties grouped as in ``sklearn.metrics.average_precision_score``), mAP, F1 at a
threshold, and :func:`classification_scores` for a JSON-able summary.

Conventions: undefined values are NaN in arrays and ``None`` in the JSON-able
dicts; means skip undefined classes (NaN if every class is undefined).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ConfusionMatrix",
    "segmentation_scores",
    "ImageScores",
    "average_precision",
    "mean_average_precision",
    "f1_scores",
    "classification_scores",
]


# --------------------------------------------------------------------------- helpers
def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; NaN (without a RuntimeWarning) if there are none."""
    values = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Element-wise num / den, NaN where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _json_float(value: Any) -> float | None:
    """Plain Python float, or None for NaN / infinity."""
    value = float(value)
    return value if math.isfinite(value) else None


def _int_array(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label array, got dtype {arr.dtype}")
    return arr


def _check_names(classes: Sequence[str], n: int, what: str) -> list[str]:
    names = [str(c) for c in classes]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names given for {n} {what}")
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise ValueError(f"duplicate class names: {dup}")
    return names


# --------------------------------------------------------------------------- segmentation
class ConfusionMatrix:
    """Streaming confusion matrix for semantic segmentation.

    ``matrix[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``.
    Pixels whose GT equals ``ignore_index`` (void) are skipped entirely.

    A *prediction* equal to ``ignore_index`` on a valid GT pixel (e.g. a CRF
    map's 255 "unconfident") is a wrong prediction that belongs to no class: it
    is counted in ``missed[g]`` and acts as a false negative of the GT class
    ``g`` (it lowers that class's IoU and accuracy and the pixel accuracy, but
    is no false positive of any class). ``matrix`` itself stays K x K, so
    ``total == matrix.sum() + missed.sum()`` is the number of non-void pixels.
    To ignore such pixels instead, set the GT to ``ignore_index`` there.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ignore_index = int(ignore_index)
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)
        self.missed = np.zeros(num_classes, np.int64)

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"pixels={self.total})")

    # ---- accumulation
    def update(self, pred: Any, gt: Any) -> "ConfusionMatrix":
        """Add one prediction / GT pair (same shape, integer labels); returns self."""
        pred = _int_array(pred, "pred")
        gt = _int_array(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} does not match GT shape {gt.shape}")
        k = self.num_classes
        gt = gt.ravel()
        pred = pred.ravel()
        valid = gt != self.ignore_index
        gt = gt[valid].astype(np.int64)
        pred = pred[valid].astype(np.int64)
        bad = (gt < 0) | (gt >= k)
        if bad.any():
            raise ValueError(f"GT value {int(gt[bad][0])} is not a class id (0..{k - 1}) "
                             f"or the ignore index {self.ignore_index}")
        miss = pred == self.ignore_index
        if miss.any():
            self.missed += np.bincount(gt[miss], minlength=k)
            gt, pred = gt[~miss], pred[~miss]
        bad = (pred < 0) | (pred >= k)
        if bad.any():
            raise ValueError(f"prediction value {int(pred[bad][0])} is not a class id (0..{k - 1}) "
                             f"or the ignore index {self.ignore_index}")
        self.matrix += np.bincount(k * gt + pred, minlength=k * k).reshape(k, k)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts into this one (in place); returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge {type(other).__name__} into ConfusionMatrix")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a ConfusionMatrix with num_classes={other.num_classes}, "
                f"ignore_index={other.ignore_index} into one with num_classes={self.num_classes}, "
                f"ignore_index={self.ignore_index}")
        self.matrix += other.matrix
        self.missed += other.missed
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.copy().merge(other)

    def copy(self) -> "ConfusionMatrix":
        """Independent copy."""
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.matrix[...] = self.matrix
        out.missed[...] = self.missed
        return out

    def reset(self) -> None:
        """Zero all counts."""
        self.matrix[...] = 0
        self.missed[...] = 0

    # ---- counts
    @property
    def total(self) -> int:
        """Number of non-void pixels seen (including predictions equal to ignore_index)."""
        return int(self.matrix.sum() + self.missed.sum())

    def true_positives(self) -> np.ndarray:
        return np.diag(self.matrix).copy()

    def gt_counts(self) -> np.ndarray:
        """Pixels per GT class (including missed ones)."""
        return self.matrix.sum(1) + self.missed

    def pred_counts(self) -> np.ndarray:
        """Pixels predicted as each class."""
        return self.matrix.sum(0)

    # ---- scores
    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (GT + pred - TP); NaN for classes absent from both GT and prediction."""
        tp = self.true_positives()
        return _divide(tp, self.gt_counts() + self.pred_counts() - tp)

    def miou(self) -> float:
        """Mean IoU over classes present in GT or prediction (NaN if none)."""
        return _nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        """Share of non-void pixels predicted correctly (NaN if no pixels)."""
        total = self.total
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall TP / GT; NaN for classes absent from GT."""
        return _divide(self.true_positives(), self.gt_counts())

    def mean_class_accuracy(self) -> float:
        """Mean of class_accuracy over classes present in GT (NaN if none)."""
        return _nanmean(self.class_accuracy())


def segmentation_scores(cm: ConfusionMatrix, classes: Sequence[str]) -> dict[str, Any]:
    """JSON-able summary of a confusion matrix.

    Keys: miou, pixel_accuracy, mean_class_accuracy (floats or None), iou and
    class_accuracy (class name -> float, None where undefined), pixels (int).
    """
    names = _check_names(classes, cm.num_classes, "confusion-matrix classes")
    iou = cm.iou()
    acc = cm.class_accuracy()
    return {
        "miou": _json_float(cm.miou()),
        "pixel_accuracy": _json_float(cm.pixel_accuracy()),
        "mean_class_accuracy": _json_float(cm.mean_class_accuracy()),
        "iou": {n: _json_float(v) for n, v in zip(names, iou)},
        "class_accuracy": {n: _json_float(v) for n, v in zip(names, acc)},
        "pixels": cm.total,
    }


class ImageScores:
    """One evaluation kept per image: for each image and class, the true
    positives and the ground-truth and predicted pixel counts, plus the
    summed confusion matrix. Enough to recompute the dataset's IoU on any
    resample of its images (paired bootstrap intervals, `compare`), and to
    rank images by their own mIoU.

    `what` names the masks scored ("pseudo masks"), `split` the images,
    `note` how ("threshold 0.25", "unconfident pixels left out")."""

    def __init__(self, what: str, split: str, classes: Sequence[str], note: str = "") -> None:
        self.what, self.split, self.note = what, split, note
        self.classes = [str(c) for c in classes]
        self.ids: list[str] = []
        k = len(self.classes)
        self._rows: list[np.ndarray] = []
        self.confusion = ConfusionMatrix(k)
        self.tp = self.gt = self.pred = np.zeros((0, k), np.int64)

    def add(self, image_id: str, pred: Any, gt: Any) -> "ImageScores":
        """Score one image's prediction against its ground truth (void 255 skipped)."""
        one = ConfusionMatrix(len(self.classes)).update(pred, gt)
        self.confusion.merge(one)
        self.ids.append(str(image_id))
        self._rows.append(np.stack([one.true_positives(), one.gt_counts(), one.pred_counts()]))
        self.tp = self.gt = self.pred = None  # type: ignore[assignment]  (stacked on demand)
        return self

    def _stack(self) -> None:
        if self.tp is None:
            rows = np.stack(self._rows) if self._rows else np.zeros((0, 3, len(self.classes)), np.int64)
            self.tp, self.gt, self.pred = rows[:, 0], rows[:, 1], rows[:, 2]

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tp, gt, pred), each (images, classes) int64."""
        self._stack()
        return self.tp, self.gt, self.pred

    def iou(self, images: Any = None) -> np.ndarray:
        """Per-class IoU over the images at `images` (indices, repeats allowed; default all)."""
        tp, gt, pred = (a if images is None else a[images] for a in self.counts())
        t = tp.sum(0)
        return _divide(t, gt.sum(0) + pred.sum(0) - t)

    def miou(self, images: Any = None) -> float:
        """Mean IoU over classes present in ground truth or prediction of those images."""
        return _nanmean(self.iou(images))

    def per_image_miou(self) -> dict[str, float]:
        """Each image's own mIoU (NaN-free: images without any class are left out)."""
        tp, gt, pred = self.counts()
        per = _divide(tp, gt + pred - tp)
        out = {}
        for i, sid in enumerate(self.ids):
            ok = ~np.isnan(per[i])
            if ok.any():
                out[sid] = float(per[i][ok].mean())
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-able scores (as `segmentation_scores`) with what, split, note and the image count."""
        return {"what": self.what, "split": self.split, "note": self.note, "images": len(self.ids),
                **segmentation_scores(self.confusion, self.classes)}

    def arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no objects) for an .npz file; `from_arrays` reads them back."""
        tp, gt, pred = self.counts()
        return {"what": np.array(self.what), "split": np.array(self.split), "note": np.array(self.note),
                "classes": np.array(self.classes), "ids": np.array(self.ids, dtype=str), "tp": tp, "gt": gt,
                "pred": pred, "confusion": self.confusion.matrix, "missed": self.confusion.missed}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "ImageScores":
        out = cls(str(a["what"]), str(a["split"]), [str(c) for c in a["classes"]], str(a["note"]))
        out.ids = [str(i) for i in a["ids"]]
        out.tp, out.gt, out.pred = (np.asarray(a[k], np.int64) for k in ("tp", "gt", "pred"))
        out._rows = list(np.stack([out.tp, out.gt, out.pred], axis=1))
        out.confusion.matrix[...] = a["confusion"]
        out.confusion.missed[...] = a["missed"]
        return out


# --------------------------------------------------------------------------- classification
def _check_scores_targets(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.ndim == 1:
        s = s[:, None]
    if t.ndim == 1:
        t = t[:, None]
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores shape {np.shape(scores)} and targets shape {np.shape(targets)} "
                         f"must be equal (N, K)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if t.dtype != bool:
        if not np.isin(t, (0, 1)).all():
            bad = t[~np.isin(t, (0, 1))].ravel()[0]
            raise ValueError(f"targets must be 0/1, found {bad!r}")
    return s, t.astype(bool)


def average_precision(scores: Any, targets: Any) -> np.ndarray:
    """Per-class non-interpolated average precision, shape (K,).

    AP = sum over score thresholds of (recall increase) x precision; tied
    scores form one threshold, as in ``sklearn.metrics.average_precision_score``.
    NaN for classes without positives. 1-D inputs are treated as K = 1.
    """
    s, t = _check_scores_targets(scores, targets)
    n, k = s.shape
    out = np.full(k, np.nan)
    if n == 0:
        return out
    order = np.argsort(-s, axis=0, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=0)
    t_sorted = np.take_along_axis(t, order, axis=0)
    for c in range(k):
        pos = int(t_sorted[:, c].sum())
        if pos == 0:
            continue
        # last index of each block of tied scores
        ends = np.flatnonzero(np.append(np.diff(s_sorted[:, c]) != 0, True))
        tp = np.cumsum(t_sorted[:, c], dtype=np.int64)[ends]
        precision = tp / (ends + 1.0)
        gained = np.diff(tp, prepend=0)
        out[c] = float(np.sum(gained * precision) / pos)
    return out


def mean_average_precision(scores: Any, targets: Any) -> float:
    """Mean of average_precision over classes with positives (NaN if none)."""
    return _nanmean(average_precision(scores, targets))


def f1_scores(scores: Any, targets: Any, threshold: float = 0.5) -> dict[str, Any]:
    """F1 of the predictions ``scores >= threshold``.

    Returns a dict with ``per_class`` (K,) F1 (NaN for classes with neither
    positives nor predictions), ``precision`` / ``recall`` (K,) (NaN where the
    denominator is 0), ``macro`` (mean of per_class over defined classes) and
    ``micro`` (F1 of the pooled counts; NaN if no positives and no predictions).
    """
    s, t = _check_scores_targets(scores, targets)
    pred = s >= threshold
    tp = (pred & t).sum(0)
    fp = (pred & ~t).sum(0)
    fn = (~pred & t).sum(0)
    per_class = _divide(2 * tp, 2 * tp + fp + fn)
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "per_class": per_class,
        "precision": _divide(tp, tp + fp),
        "recall": _divide(tp, tp + fn),
        "macro": _nanmean(per_class),
        "micro": float(2 * tp.sum() / micro_den) if micro_den else float("nan"),
    }


def classification_scores(
    scores: Any, targets: Any, classes: Sequence[str], threshold: float = 0.5
) -> dict[str, Any]:
    """JSON-able multi-label summary.

    Keys: map, f1_macro, f1_micro (float or None), ap and f1 (class name ->
    float or None), positives (class name -> int), threshold, images.
    """
    s, t = _check_scores_targets(scores, targets)
    names = _check_names(classes, s.shape[1], "score columns")
    ap = average_precision(s, t)
    f1 = f1_scores(s, t, threshold)
    return {
        "map": _json_float(_nanmean(ap)),
        "ap": {n: _json_float(v) for n, v in zip(names, ap)},
        "f1_macro": _json_float(f1["macro"]),
        "f1_micro": _json_float(f1["micro"]),
        "f1": {n: _json_float(v) for n, v in zip(names, f1["per_class"])},
        "positives": {n: int(v) for n, v in zip(names, t.sum(0))},
        "threshold": float(threshold),
        "images": int(s.shape[0]),
    }
