"""LID 2020 (ILSVRC DET) layout: a small fixture in exactly that layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_core.config import DataConfig, LidConfig
from wsss_core.data import DataError, open_dataset, validate_dataset

from fixtures import LID_H as H, LID_W as W, TRAIN, make_lid

def lid_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="lid", root=str(root), **kw)


def test_lid_round_trip(tmp_path):
    root = make_lid(tmp_path / "lid")
    ds = open_dataset(lid_cfg(root))
    assert ds.format == "lid"
    assert ds.classes == ("background", "accordion", "airplane", "ant")
    assert ds.ids("train") == ["n02672831_10026", "n02691156_1", "n02691156_77", "n02219486_5"]
    assert ds.ids("val") == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002"]
    train = ds.labelled("train")
    np.testing.assert_array_equal(train.labels, [[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1]])
    assert train.image_path(train.ids[0]) == root / "train" / "n02672831" / "n02672831_10026.JPEG"
    img, _ = train[1]
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert ds.label_source("train") == ds.label_source("val") == "json"
    assert not ds.has_masks("train") and ds.has_masks("val")
    assert ds.trusted_ids("train") is None
    m = ds.masks("val").mask("ILSVRC2012_val_00000002")
    assert set(np.unique(m).tolist()) == {0, 2, 3, 255}
    np.testing.assert_array_equal(ds.labelled("val").labels, [[1, 0, 0], [0, 1, 1]])
    report = validate_dataset(ds)
    assert report.splits["train"].masks == 0 and report.splits["val"].masks == 2
    assert report.splits["train"].class_counts == {"accordion": 1, "airplane": 1, "ant": 2}
    assert report.splits["train"].images_without_labels == 1


def test_lid_custom_names_and_limit(tmp_path):
    lid = LidConfig(idx_to_name="classes.json", train_list="tr.json", val_list="va.json",
                    train_images="imgs/train", val_images="imgs/val", val_masks="gt", image_ext=".png")
    root = make_lid(tmp_path / "lid", lid)
    ds = open_dataset(lid_cfg(root, lid=lid, limit=2))
    assert ds.ids("train") == ["n02672831_10026", "n02691156_1"]
    assert ds.labelled("val").image_path(ds.labelled("val").ids[0]) == root / "imgs/val/ILSVRC2012_val_00000001.png"
    assert len(ds.masks("val")) == 2


def test_lid_without_mask_folder(tmp_path):
    root = make_lid(tmp_path / "lid")
    for p in (root / "masks").iterdir():
        p.unlink()
    (root / "masks").rmdir()
    ds = open_dataset(lid_cfg(root))
    assert not ds.has_masks("val")


def _bad_json(root: Path, name: str, payload) -> None:
    (root / name).write_text(json.dumps(payload))


LID_BAD = {
    "no class file": (lambda r: (r / "idx_to_name.json").unlink(), "idx_to_name.json: class index file not found"),
    "class ids with a gap": (lambda r: _bad_json(r, "idx_to_name.json", {"1": "a", "3": "b"}),
                             "idx_to_name.json: class ids must be exactly 1..2"),
    "two keys for one class id": (lambda r: _bad_json(r, "idx_to_name.json", {"1": "a", "2": "b", "01": "c"}),
                                  "idx_to_name.json: keys '1' and '01' are both class id 1"),
    "the same key twice": (lambda r: (r / "idx_to_name.json").write_text('{"1": "a", "2": "b", "1": "c"}'),
                           "idx_to_name.json: cannot read class index file (key '1' appears twice)"),
    "label id too large": (lambda r: _bad_json(r, "train.json", TRAIN[:1] + [["n1/n1_2", [2, 4]]]),
                           "train.json: entry 1 ('n1/n1_2'): class id 4 out of range 1..3"),
    "label id zero": (lambda r: _bad_json(r, "val.json", [["v1", [0]]]),
                      "val.json: entry 0 ('v1'): class id 0 out of range 1..3"),
    "malformed entry": (lambda r: _bad_json(r, "train.json", [["n1/n1_2", 3]]), "train.json: entry 0: must be"),
    "duplicate basename": (lambda r: _bad_json(r, "train.json", [["a/x_1", [1]], ["b/x_1", [2]]]),
                           "train.json: entry 1 ('b/x_1'): image id 'x_1' already used by entry 0"),
    "val list missing": (lambda r: (r / "val.json").unlink(), "val.json: image list not found"),
    "not json": (lambda r: (r / "train.json").write_text("[[oops"), "train.json: cannot read image list"),
    "image missing": (lambda r: (r / "train/n02691156/n02691156_1.JPEG").unlink(),
                      "n02691156_1.JPEG: missing image file"),
    "mask missing": (lambda r: (r / "masks/ILSVRC2012_val_00000002.png").unlink(),
                     "ILSVRC2012_val_00000002.png: missing mask file"),
    "mask id out of range": (lambda r: Image.fromarray(np.full((H, W), 9, np.uint8)).save(
        r / "masks/ILSVRC2012_val_00000001.png"), "ILSVRC2012_val_00000001.png: class id 9 out of range"),
}


@pytest.mark.parametrize("case", list(LID_BAD))
def test_lid_bad_input(tmp_path, case):
    root = make_lid(tmp_path / "lid")
    mutate, expected = LID_BAD[case]
    mutate(root)
    with pytest.raises(DataError) as err:
        open_dataset(lid_cfg(root))
    assert expected in str(err.value)
    assert str(root) in str(err.value)


def test_lid_requires_root():
    with pytest.raises(DataError, match="data.root"):
        open_dataset(DataConfig(format="lid"))
