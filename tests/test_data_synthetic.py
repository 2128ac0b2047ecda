"""The synthetic demo: determinism, cache, class imbalance, missing person labels."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

from wsss_core.config import DataConfig, SyntheticConfig
from wsss_core.data import (
    SYNTHETIC_CLASSES,
    DataError,
    generate_synthetic,
    open_dataset,
    read_image,
    read_mask,
    synthetic_dir,
    synthetic_hash,
)
from wsss_core.data import synthetic as synthetic_module

SMALL = SyntheticConfig(seed=3, n_train=24, n_val=8, image_size=48)
PERSON = SYNTHETIC_CLASSES.index("person")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, float]:
    """The default demo (240 + 60 images of 128 px) and its generation time."""
    t0 = time.perf_counter()
    root = generate_synthetic(SyntheticConfig(), tmp_path_factory.mktemp("demo") / "syn")
    return root, time.perf_counter() - t0


@pytest.fixture(scope="module")
def demo_masks(demo) -> dict[str, dict[str, np.ndarray]]:
    root = demo[0]
    out = {}
    for split in ("train", "val"):
        ids = (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        out[split] = {i: read_mask(root / "SegmentationClass" / f"{i}.png") for i in ids}
    return out


def _presence(masks: dict[str, np.ndarray]) -> np.ndarray:
    """(N, C) bool: class k visible in mask i."""
    return np.array([np.bincount(m.ravel(), minlength=256)[: len(SYNTHETIC_CLASSES)] > 0 for m in masks.values()])


def _csv_labels(path: Path) -> dict[str, set[str]]:
    rows = path.read_text().splitlines()
    assert rows[0] == "image_id,labels"
    return {r.split(",")[0]: set(r.split(",")[1].split()) for r in rows[1:]}


def test_generation_is_fast_and_reads_back(demo):
    root, _ = demo
    ds = open_dataset(DataConfig(format="voc", root=str(root)))
    assert ds.classes == SYNTHETIC_CLASSES and "person" in ds.classes
    assert len(ds.ids("train")) == 240 and len(ds.ids("val")) == 60
    img, _ = ds.labelled("train")[0]
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert (root / "JPEGImages/train_0000.jpg").read_bytes()[:2] == b"\xff\xd8"
    readme = (root / "README.txt").read_text()
    assert "person_label_drop: 0.4" in readme and "trusted_fraction: 0.3" in readme


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_synthetic(SMALL, tmp_path / "a")
    b = generate_synthetic(SMALL, tmp_path / "b")
    c = generate_synthetic(dataclasses.replace(SMALL, seed=4), tmp_path / "c")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * 32 + 8  # images, masks, 2 lists, 2 CSVs, trusted, classes, README, meta
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    masks = [rel for rel in files if rel.parts[0] == "SegmentationClass"]
    assert sum((a / r).read_bytes() != (c / r).read_bytes() for r in masks) > 28
    assert _csv_labels(a / "image_labels_train.csv") != _csv_labels(c / "image_labels_train.csv")


def test_class_imbalance_and_all_classes_present(demo_masks):
    train = _presence(demo_masks["train"])
    assert train.any(0).all() and _presence(demo_masks["val"]).any(0).all()
    counts = train[:, 1:].sum(0)
    assert counts.max() >= 2.5 * counts.min(), dict(zip(SYNTHETIC_CLASSES[1:], counts))
    assert counts.min() >= 10


def test_objects_per_image(demo, demo_masks):
    meta = json.loads((demo[0] / "meta.json").read_text())
    objects = np.array(list(meta["objects"].values()))
    assert len(objects) == 300 and objects.min() >= 1 and objects.max() <= 3
    assert set(objects.tolist()) == {1, 2, 3}
    for split in ("train", "val"):
        fg = _presence(demo_masks[split])[:, 1:].sum(1)
        assert fg.min() >= 1 and fg.max() <= 3
        ids = list(demo_masks[split])
        assert all(fg[i] <= meta["objects"][sid] for i, sid in enumerate(ids))


def test_images_are_textured_not_flat(demo, demo_masks):
    stds = []
    for sid, m in list(demo_masks["train"].items())[:60]:
        img = read_image(demo[0] / "JPEGImages" / f"{sid}.jpg").astype(np.float32)
        stds.append(img[m == 0].std(0).mean())
        for k in np.unique(m):
            if k and (m == k).sum() > 200:  # object textures vary too
                assert img[m == k].std(0).max() > 4.0, (sid, k)
    assert min(stds) > 6.0 and np.mean(stds) > 12.0


def test_person_label_dropped_outside_trusted_subset(demo, demo_masks):
    root = demo[0]
    meta = json.loads((root / "meta.json").read_text())
    labels = _csv_labels(root / "image_labels_train.csv")
    trusted = set((root / "trusted_train.txt").read_text().split())
    assert trusted == set(meta["trusted"]) and len(trusted) == 72
    ids = list(demo_masks["train"])
    present = dict(zip(ids, _presence(demo_masks["train"])))
    eligible = [i for i in ids if present[i][PERSON] and i not in trusted]
    dropped = {i for i in ids if present[i][PERSON] and "person" not in labels[i]}
    assert dropped == set(meta["person_dropped"])
    assert not dropped & trusted
    assert abs(len(dropped) / len(eligible) - 0.4) < 0.05
    for i in ids:  # every other label matches the mask exactly
        visible = {SYNTHETIC_CLASSES[k] for k in np.flatnonzero(present[i]) if k}
        assert labels[i] == visible - ({"person"} if i in dropped else set()), i
    val = _csv_labels(root / "image_labels_val.csv")
    for i, row in zip(demo_masks["val"], _presence(demo_masks["val"])):
        assert val[i] == {SYNTHETIC_CLASSES[k] for k in np.flatnonzero(row) if k}


def test_open_dataset_uses_the_cache(tmp_path):
    cfg = DataConfig(format="synthetic", limit=10, synthetic=dataclasses.replace(SMALL, cache_dir=str(tmp_path)))
    ds = open_dataset(cfg)
    assert ds.format == "synthetic"
    assert ds.root == tmp_path / "synthetic" / synthetic_hash(cfg.synthetic) == synthetic_dir(cfg.synthetic)
    assert len(ds.ids("train")) == 10 and ds.ids("val") == [f"val_{i:04d}" for i in range(8)]
    assert ds.trusted_ids("train") <= set(ds.ids("train"))
    assert ds.label_source("train") == "csv" and ds.has_masks("val")
    stamp = (ds.root / "meta.json").stat().st_mtime_ns
    again = open_dataset(cfg)
    assert again.root == ds.root and (ds.root / "meta.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [ds.root.name]  # no temp leftovers


def test_cache_key(tmp_path):
    assert synthetic_hash(SMALL) == synthetic_hash(dataclasses.replace(SMALL, cache_dir=str(tmp_path)))
    assert synthetic_hash(SMALL) != synthetic_hash(dataclasses.replace(SMALL, person_label_drop=0.5))


def test_concurrent_generation_keeps_the_winner(tmp_path, monkeypatch):
    """If another process renames its copy into place first, ours is discarded."""
    out = tmp_path / "syn"
    real = synthetic_module._write_dataset

    def racing(cfg, folder):
        real(cfg, folder)
        real(cfg, out)  # the "other process" finishes first

    monkeypatch.setattr(synthetic_module, "_write_dataset", racing)
    assert generate_synthetic(SMALL, out) == out
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]
    assert (out / "meta.json").is_file()


def test_incomplete_target_is_reported(tmp_path):
    out = tmp_path / "syn"
    (out / "junk").mkdir(parents=True)
    with pytest.raises(DataError, match="syn: exists but is not a complete synthetic dataset"):
        generate_synthetic(SMALL, out)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_single_object_and_negative_seed(tmp_path):
    cfg = SyntheticConfig(seed=-7, n_train=12, n_val=4, image_size=32, max_objects=1,
                          person_label_drop=1.0, trusted_fraction=0.0)
    root = generate_synthetic(cfg, tmp_path / "one")
    ds = open_dataset(DataConfig(format="voc", root=str(root)))
    masks = ds.masks("train")
    fg = [len(set(np.unique(masks.mask(i)).tolist()) - {0}) for i in masks.ids]
    assert fg == [1] * 12
    assert ds.trusted_ids("train") == frozenset()
    person_col = ds.labelled("train").labels[:, PERSON - 1]
    assert person_col.sum() == 0  # every person label dropped
