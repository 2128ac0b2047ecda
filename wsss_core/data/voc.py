"""PASCAL VOC layout reader (also used for the synthetic demo):

    <root>/JPEGImages/<id>.jpg            (another image extension is accepted)
    <root>/SegmentationClass/<id>.png     palette or grayscale class indices, 255 void
    <root>/ImageSets/Segmentation/<split>.txt
    <root>/classes.txt                    optional; default: the 21 VOC classes
    <root>/image_labels_<split>.csv       optional `image_id,labels`; else labels from masks
    <root>/trusted_<split>.txt            optional ids whose labels are complete
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from .base import Dataset, SplitIndex
from .errors import DataError
from .ids import path_inside
from .lists import existing_root, read_classes, read_id_list, read_labels_csv, read_trusted

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
LIST_DIR = Path("ImageSets") / "Segmentation"
_EXT_PREFERENCE = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG")


def open_voc(root: str | Path, splits: Sequence[str], limit: int | None = None, format: str = "voc") -> Dataset:
    """Read the index files of a VOC-layout folder (no image is decoded)."""
    root = existing_root(root)
    classes_file = root / "classes.txt"
    classes = read_classes(classes_file) if classes_file.exists() else VOC_CLASSES
    images = _files_by_stem(root / IMAGE_DIR, "image folder")
    mask_dir = root / MASK_DIR
    masks = set(os.listdir(mask_dir)) if mask_dir.is_dir() else set()
    try:
        index = {s: _read_split(root, s, classes, images, masks, limit) for s in dict.fromkeys(splits)}
    except DataError as e:
        if classes_file.exists() or "unknown class name" not in str(e):
            raise
        raise DataError(f"{e}; note: {classes_file} is missing, so the 21 VOC class names were assumed: "
                        "add classes.txt (one name per line, background first, line k = pixel value k)") from None
    candidates = [classes_file] + [p for s in index for p in (
        root / LIST_DIR / f"{s}.txt", root / f"image_labels_{s}.csv", root / f"trusted_{s}.txt")]
    return Dataset(format, root, classes, index, index_files=[p for p in candidates if p.is_file()])


def _files_by_stem(folder: Path, what: str) -> dict[str, Path]:
    """Map file stem -> path for a folder, preferring .jpg when a stem has several files."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} not found")
    rank = {ext: i for i, ext in enumerate(_EXT_PREFERENCE)}
    best: dict[str, tuple[int, str]] = {}
    with os.scandir(folder) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            key = (rank.get(ext, len(rank)), entry.name)
            if stem not in best or key < best[stem]:
                best[stem] = key
    return {stem: folder / name for stem, (_, name) in best.items()}


def _read_split(
    root: Path, split: str, classes: tuple[str, ...], images: dict[str, Path], masks: set[str], limit: int | None
) -> SplitIndex:
    all_ids = read_id_list(root / LIST_DIR / f"{split}.txt")
    ids = all_ids[:limit] if limit else all_ids
    image_paths = [images.get(i) or path_inside(root / IMAGE_DIR, i, ".jpg") for i in ids]
    has_masks = any(f"{i}.png" in masks for i in ids)
    mask_paths = [path_inside(root / MASK_DIR, i, ".png") for i in ids] if has_masks else None
    csv_path = root / f"image_labels_{split}.csv"
    if csv_path.is_file():
        labels, source = read_labels_csv(csv_path, classes, ids), "csv"
    elif has_masks:
        labels, source = None, "masks"
        warnings.warn(f"{csv_path}: not found; image-level labels of split {split!r} are derived from the "
                      f"masks in {root / MASK_DIR} (label_source 'masks')", stacklevel=3)
    else:
        raise DataError(f"{csv_path}: not found, and split {split!r} has no masks in {root / MASK_DIR} "
                        "to derive image-level labels from")
    trusted = read_trusted(root / f"trusted_{split}.txt", all_ids, ids)
    return SplitIndex(split, ids, image_paths, mask_paths, source, labels, trusted)
