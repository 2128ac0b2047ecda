"""Builders of tiny datasets on disk, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wsss_core.config import DataConfig

CLASSES = ("background", "cat", "dog")
W, H = 20, 14


# --------------------------------------------------------------------------- fixture builder
def _mask_for(k: int) -> np.ndarray:
    """A mask containing class `k` (if > 0), background and a void border."""
    m = np.zeros((H, W), np.uint8)
    if k:
        m[3:9, 4:12] = k
    m[0, :] = 255
    return m


def make_voc(root: Path, splits: dict[str, list[str]] | None = None, csv: bool = True, masks: bool = True,
             classes: tuple[str, ...] | None = CLASSES) -> Path:
    """A tiny VOC-layout dataset: image i of a split shows class (i % 3) (0 = nothing)."""
    splits = splits or {"train": ["a0", "a1", "a2", "a3"], "val": ["b0", "b1", "b2"]}
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for split, ids in splits.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        rows = ["image_id,labels"]
        for n, sid in enumerate(ids):
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{sid}.jpg")
            if masks:
                Image.fromarray(_mask_for(n % 3)).save(root / "SegmentationClass" / f"{sid}.png")
            rows.append(f"{sid},{CLASSES[n % 3] if n % 3 else ''}")
        if csv:
            (root / f"image_labels_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def voc_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="voc", root=str(root), **kw)
