"""The format-independent dataset: what every reader (voc, lid, synthetic)
produces, and the two views handed out to the rest of the package.

- `LabelledImages` is the training view: images and image-level labels only.
  It holds image paths and a label matrix, nothing that leads to a mask.
- `MaskSet` is the evaluation view: images and their pixel masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .errors import DataError
from .images import VOID, read_image, read_mask

LABEL_SOURCES = ("csv", "json", "masks")


@dataclass
class SplitIndex:
    """What the index files say about one split (no image decoded yet).

    `labels` is None while label_source is "masks" and the masks have not
    been read; `mask_paths` is None when the split has no masks.
    """

    name: str
    ids: list[str]
    image_paths: list[Path]
    mask_paths: list[Path] | None
    label_source: str
    labels: np.ndarray | None
    trusted: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {self.label_source!r}")
        if len(self.image_paths) != len(self.ids):
            raise ValueError("one image path per id expected")
        if self.labels is None and self.mask_paths is None:
            raise ValueError("labels can only be left to derive when the split has masks")


class Dataset:
    """A dataset opened from its index files: classes, splits, ids, labels.

    Images and masks are read on demand through `labelled(split)` (training)
    and `masks(split)` (evaluation only).
    """

    def __init__(self, format: str, root: Path, classes: tuple[str, ...], splits: Mapping[str, SplitIndex],
                 index_files: Sequence[Path] = ()):
        self.format = format
        self.root = Path(root)
        self.classes = tuple(classes)
        self._splits = dict(splits)
        self.index_files = tuple(Path(p) for p in index_files)  # the list/label files it was read from

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(s.ids)}" for k, s in self._splits.items())
        return f"Dataset(format={self.format!r}, root='{self.root}', classes={self.num_classes}, {sizes})"

    @property
    def fg_classes(self) -> tuple[str, ...]:
        """The object classes (everything but background), in label-column order."""
        return self.classes[1:]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    def ids(self, split: str) -> list[str]:
        return list(self._split(split).ids)

    def labelled(self, split: str) -> LabelledImages:
        """Training view: images and image-level labels, no masks."""
        s = self._split(split)
        return LabelledImages(s.ids, s.image_paths, self._labels(s), self.classes)

    def has_masks(self, split: str) -> bool:
        return self._split(split).mask_paths is not None

    def masks(self, split: str) -> MaskSet:
        """Evaluation view: images with pixel masks. Never feed it to training."""
        s = self._split(split)
        if s.mask_paths is None:
            raise DataError(f"split {split!r} of {self.root}: has no masks")
        return MaskSet(s.ids, s.image_paths, s.mask_paths)

    def label_source(self, split: str) -> str:
        """"csv" | "json" (given labels) or "masks" (derived from the masks: flagged)."""
        return self._split(split).label_source

    def trusted_ids(self, split: str) -> frozenset[str] | None:
        """Ids whose image-level labels are known to be complete, if the dataset says."""
        return self._split(split).trusted

    def split_index(self, split: str) -> SplitIndex:
        """What the index files say about one split (paths, labels as read)."""
        return self._split(split)

    def derive_labels(self, split: str, labels: np.ndarray) -> None:
        """Set the labels of a split whose labels come from its masks (done by
        validation, which decodes the masks anyway)."""
        s = self._split(split)
        if s.label_source == "masks" and s.labels is None:
            s.labels = np.asarray(labels, np.float32)

    # ----------------------------------------------------------------- internals
    def _split(self, split: str) -> SplitIndex:
        try:
            return self._splits[split]
        except KeyError:
            raise DataError(
                f"split {split!r}: not in the dataset at {self.root} (splits: {', '.join(self._splits)})"
            ) from None

    def _labels(self, s: SplitIndex) -> np.ndarray:
        """The split's label matrix, derived from its masks on first use if needed."""
        if s.labels is None:
            assert s.mask_paths is not None
            s.labels = labels_from_masks(s.mask_paths, self.num_classes)
        return s.labels


def labels_from_masks(mask_paths: Sequence[Path], num_classes: int) -> np.ndarray:
    """Multi-hot (N, C-1) labels: class k is present if any mask pixel equals k."""
    labels = np.zeros((len(mask_paths), num_classes - 1), np.float32)
    for i, p in enumerate(mask_paths):
        labels[i] = presence_from_counts(np.bincount(read_mask(p).ravel(), minlength=256), num_classes)
    return labels


def presence_from_counts(counts: np.ndarray, num_classes: int) -> np.ndarray:
    """Foreground presence vector (C-1,) from per-value pixel counts."""
    return (counts[1:num_classes] > 0).astype(np.float32)


class LabelledImages(Sequence):
    """Images with image-level labels, for training. Holds no masks.

    `labels[i, k-1]` is 1 when image i is labelled with class k (`classes[k]`).
    """

    __slots__ = ("ids", "_paths", "labels", "classes", "_positions")

    def __init__(self, ids: Sequence[str], image_paths: Sequence[Path], labels: np.ndarray, classes: tuple[str, ...]):
        labels = np.array(labels, dtype=np.float32, copy=True)
        if labels.shape != (len(ids), len(classes) - 1) or len(image_paths) != len(ids):
            raise ValueError(f"labels must be ({len(ids)}, {len(classes) - 1}), got {labels.shape}")
        self.ids = list(ids)
        self._paths = [Path(p) for p in image_paths]
        self.labels = labels
        self.classes = tuple(classes)
        self._positions: dict[str, int] | None = None

    def position(self, image_id: str) -> int:
        """The index of image `image_id` (KeyError naming it if absent)."""
        if self._positions is None:
            self._positions = {i: n for n, i in enumerate(self.ids)}
        try:
            return self._positions[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in this split") from None

    def __repr__(self) -> str:
        return f"LabelledImages({len(self)} images, {len(self.classes) - 1} classes)"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        i = self._index(i)
        return read_image(self._paths[i]), self.labels[i].copy()

    @property
    def fg_classes(self) -> tuple[str, ...]:
        return self.classes[1:]

    def image(self, image_id: str) -> np.ndarray:
        """Image `image_id` as RGB uint8 HxWx3 (by id, as `MaskSet.image`; by position: `self[i]`)."""
        return read_image(self._paths[self.position(image_id)])

    def image_path(self, image_id: str) -> Path:
        return self._paths[self.position(image_id)]

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImages:
        """The images at `indices` (ints, or a boolean mask of length N), in that order."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean subset mask must have length {len(self)}, got {idx.shape}")
            idx = np.flatnonzero(idx)
        picked = [self._index(int(i)) for i in idx.reshape(-1)]
        return LabelledImages(
            [self.ids[i] for i in picked], [self._paths[i] for i in picked],
            self.labels[picked] if picked else self.labels[:0], self.classes,
        )

    def _index(self, i: int) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        n = len(self.ids)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return int(i) % n


class MaskSet:
    """Images with pixel masks of one split: evaluation only.

    Masks are HxW uint8 class indices (0 background, 255 void).
    """

    void = VOID

    def __init__(self, ids: Sequence[str], image_paths: Sequence[Path], mask_paths: Sequence[Path]):
        self.ids = list(ids)
        self._images = dict(zip(self.ids, map(Path, image_paths)))
        self._masks = dict(zip(self.ids, map(Path, mask_paths)))

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} images)"

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._masks

    def mask(self, image_id: str) -> np.ndarray:
        return read_mask(self._lookup(self._masks, image_id))

    def image(self, image_id: str) -> np.ndarray:
        return read_image(self._lookup(self._images, image_id))

    def mask_path(self, image_id: str) -> Path:
        return self._lookup(self._masks, image_id)

    def _lookup(self, table: dict[str, Path], image_id: str) -> Path:
        try:
            return table[image_id]
        except KeyError:
            raise DataError(f"image id {image_id!r}: not in this mask set ({len(self)} images)") from None
