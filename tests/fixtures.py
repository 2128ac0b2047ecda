"""Builders of tiny datasets on disk, shared by the tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from wsss_core.config import DataConfig, LidConfig

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


# --------------------------------------------------------------------------- LID layout
NAMES = {"1": "accordion", "2": "airplane", "3": "ant"}
TRAIN = [
    ["n02672831/n02672831_10026", [1]],
    ["n02691156/n02691156_1", [2, 3]],
    ["n02691156/n02691156_77", []],
    ["n02219486/n02219486_5", [3]],
]
VAL = [["ILSVRC2012_val_00000001", [1]], ["ILSVRC2012_val_00000002", [3, 2]]]
LID_H, LID_W = 18, 24


def make_lid(root: Path, lid: LidConfig = LidConfig(), train=TRAIN, val=VAL, names=NAMES) -> Path:
    """Write idx_to_name, the two lists, nested train images, val images and val masks."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / lid.idx_to_name).write_text(json.dumps(names))
    (root / lid.train_list).write_text(json.dumps(train))
    (root / lid.val_list).write_text(json.dumps(val))
    fmt = "JPEG" if lid.image_ext.lower() in (".jpeg", ".jpg") else None
    for folder, entries in ((lid.train_images, train), (lid.val_images, val)):
        for rel, _ in entries:
            p = root / folder / f"{rel}{lid.image_ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (LID_H, LID_W, 3), dtype=np.uint8)).save(p, format=fmt)
    (root / lid.val_masks).mkdir()
    for rel, ids in val:
        m = np.zeros((LID_H, LID_W), np.uint8)
        for j, k in enumerate(ids):
            m[2 + 5 * j: 6 + 5 * j, 3:20] = k
        m[-1] = 255
        Image.fromarray(m).save(root / lid.val_masks / f"{Path(rel).name}.png")
    return root


def snapshot(root: Path, mtimes: bool = True) -> dict[str, str]:
    """Every file under `root` with its bytes' digest (and mtime): equal before and after = untouched."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() + (
            f":{p.stat().st_mtime_ns}" if mtimes else "") for p in sorted(root.rglob("*")) if p.is_file()}
