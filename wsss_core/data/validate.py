"""Up-front dataset validation: every file of every split is checked before
any training starts, cheaply (headers and file tails; masks are decoded since
their class ids must be checked). The first problem raises a DataError."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import Dataset, SplitIndex, presence_from_counts
from .errors import DataError
from .images import VOID, check_image_file, check_mask_file


@dataclass(frozen=True)
class SplitReport:
    """Statistics of one validated split."""

    images: int
    label_source: str
    class_counts: dict[str, int]  # images labelled with each foreground class
    images_without_labels: int
    masks: int  # images with a (checked) mask; 0 when the split has none
    void_fraction: float | None  # share of mask pixels that are void (255)
    trusted: int | None  # size of the trusted subset, None if the dataset has none

    @property
    def mask_coverage(self) -> float:
        """Share of the split's images that have a mask."""
        return self.masks / self.images if self.images else 0.0


@dataclass(frozen=True)
class ValidationReport:
    """What validation found: per-split counts, label sources and mask coverage."""

    format: str
    root: str
    classes: tuple[str, ...]
    splits: dict[str, SplitReport]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        for name, s in self.splits.items():
            d["splits"][name]["mask_coverage"] = s.mask_coverage
        return d

    def __str__(self) -> str:
        lines = [f"{self.format} dataset at {self.root}: {len(self.classes)} classes, valid "
                 f"(checked in {self.seconds:.2f} s)"]
        for name, s in self.splits.items():
            masks = "no masks" if not s.masks else (
                f"masks {s.masks}/{s.images} ({100 * (s.void_fraction or 0):.1f}% void pixels)")
            trusted = "" if s.trusted is None else f", trusted subset {s.trusted}"
            lines.append(f"  {name}: {s.images} images, labels from {s.label_source}"
                         f"{' (derived, check!)' if s.label_source == 'masks' else ''}, "
                         f"{s.images_without_labels} without labels, {masks}{trusted}")
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in s.class_counts.items()))
        return "\n".join(lines)


def validate_dataset(ds: Dataset, splits: Sequence[str] | None = None) -> ValidationReport:
    """Check the root, then every image and mask of each split, in order."""
    t0 = time.perf_counter()
    if not ds.root.is_dir():
        raise DataError(f"{ds.root}: dataset folder not found")
    names = list(ds.splits if splits is None else splits)
    reports = {name: _validate_split(ds, ds.split_index(name)) for name in names}
    return ValidationReport(ds.format, str(ds.root), ds.classes, reports, time.perf_counter() - t0)


def _validate_split(ds: Dataset, s: SplitIndex) -> SplitReport:
    sizes = [check_image_file(p) for p in s.image_paths]
    void_fraction = None
    if s.mask_paths is not None:
        counts = _check_masks(s, sizes, ds.num_classes)
        if s.labels is None:  # derive now: the masks are decoded anyway
            ds.derive_labels(s.name, np.stack([presence_from_counts(c, ds.num_classes) for c in counts]) if counts
                             else np.zeros((0, ds.num_classes - 1), np.float32))
        total = sum(int(c.sum()) for c in counts)
        void_fraction = sum(int(c[VOID]) for c in counts) / total if total else 0.0
    labels = ds.labelled(s.name).labels
    return SplitReport(
        images=len(s.ids),
        label_source=s.label_source,
        class_counts={name: int(n) for name, n in zip(ds.fg_classes, (labels > 0.5).sum(0))},
        images_without_labels=int((labels < 0.5).all(1).sum()) if len(labels) else 0,
        masks=0 if s.mask_paths is None else len(s.mask_paths),
        void_fraction=void_fraction,
        trusted=None if s.trusted is None else len(s.trusted),
    )


def _check_masks(s: SplitIndex, sizes: list[tuple[int, int]], num_classes: int) -> list[np.ndarray]:
    assert s.mask_paths is not None
    return [
        check_mask_file(Path(m), size, num_classes, img)
        for m, size, img in zip(s.mask_paths, sizes, s.image_paths)
    ]
