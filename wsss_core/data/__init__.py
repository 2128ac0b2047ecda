"""Datasets: readers for the VOC and LID layouts and the synthetic demo.

Training code sees images and image-level labels only (`Dataset.labelled`);
masks are reachable only through the evaluation API (`Dataset.masks`).
`open_dataset` validates every file up front and raises `DataError` naming
the offending file and the problem.

(`sampling` and `transforms` need torch and are imported on their own.)
"""

from .base import Dataset, LabelledImages, MaskSet, SplitIndex, labels_from_masks
from .errors import DataError
from .images import VOID, check_image_file, read_image, read_mask, to_rgb, voc_palette
from .lid import open_lid
from .loader import open_dataset
from .synthetic import (
    SYNTHETIC_CLASSES,
    ensure_synthetic,
    generate_synthetic,
    render_image,
    synthetic_dir,
    synthetic_hash,
)
from .validate import SplitReport, ValidationReport, validate_dataset
from .voc import VOC_CLASSES, open_voc

__all__ = [
    "DataError",
    "Dataset",
    "LabelledImages",
    "MaskSet",
    "SYNTHETIC_CLASSES",
    "SplitIndex",
    "SplitReport",
    "VOC_CLASSES",
    "VOID",
    "ValidationReport",
    "check_image_file",
    "ensure_synthetic",
    "generate_synthetic",
    "labels_from_masks",
    "open_dataset",
    "open_lid",
    "open_voc",
    "read_image",
    "read_mask",
    "render_image",
    "synthetic_dir",
    "synthetic_hash",
    "to_rgb",
    "validate_dataset",
    "voc_palette",
]
