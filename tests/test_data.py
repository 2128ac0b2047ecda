"""Dataset layer: the real MSRC folder, the VOC reader on small fixtures,
image-mode conversion, and one DataError per kind of bad input."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_core.config import DataConfig

from fixtures import CLASSES, H, W, _mask_for, make_voc, voc_cfg
from wsss_core.data import (
    VOC_CLASSES,
    DataError,
    LabelledImages,
    MaskSet,
    ValidationReport,
    open_dataset,
    read_image,
    validate_dataset,
)

MSRC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "book", "car", "cat", "chair", "cow", "dog",
    "flower", "person", "sheep", "sign",
)
MSRC_TRAIN_COUNTS = {
    "aeroplane": 13, "bicycle": 14, "bird": 17, "boat": 16, "book": 15, "car": 20, "cat": 13, "chair": 15,
    "cow": 23, "dog": 12, "flower": 17, "person": 29, "sheep": 14, "sign": 19,
}
# --------------------------------------------------------------------------- real data
def _label_hist(labels: np.ndarray) -> list[int]:
    return np.bincount((labels > 0.5).sum(1), minlength=3).tolist()


def test_msrc_counts_and_classes(msrc_root):
    ds = open_dataset(voc_cfg(msrc_root))  # validates every file
    assert ds.format == "voc"
    assert ds.classes == MSRC_CLASSES
    assert ds.num_classes == 15 and ds.fg_classes == MSRC_CLASSES[1:]
    assert ds.splits == ("train", "val")
    assert len(ds.ids("train")) == 276 and len(ds.ids("val")) == 59
    train = ds.labelled("train")
    assert train.labels.shape == (276, 14) and train.labels.dtype == np.float32
    assert dict(zip(ds.fg_classes, (train.labels > 0.5).sum(0).tolist())) == MSRC_TRAIN_COUNTS
    assert _label_hist(train.labels) == [52, 211, 13]
    assert _label_hist(ds.labelled("val").labels) == [6, 52, 1]
    for split in ds.splits:
        assert ds.label_source(split) == "csv"
        assert ds.has_masks(split)
        assert ds.trusted_ids(split) is None


def test_msrc_validation_report(msrc_root):
    ds = open_dataset(voc_cfg(msrc_root), validate=False)
    report = validate_dataset(ds)
    assert isinstance(report, ValidationReport)
    assert report.seconds > 0.0  # timed (its speed is measured in benchmarks/, not asserted here)
    tr = report.splits["train"]
    assert tr.images == 276 and tr.class_counts == MSRC_TRAIN_COUNTS
    assert tr.images_without_labels == 52 and tr.masks == 276 and tr.mask_coverage == 1.0
    assert 0.0 < tr.void_fraction < 0.5
    assert report.splits["val"].images_without_labels == 6
    d = report.as_dict()
    assert d["splits"]["val"]["images"] == 59 and d["classes"][0] == "background"
    assert "train: 276 images" in str(report)
    assert set(validate_dataset(ds, ["val"]).splits) == {"val"}


def _names(ds, split: str, sid: str) -> set[str]:
    images = ds.labelled(split)
    _, y = images[images.ids.index(sid)]
    return {ds.classes[k + 1] for k in np.flatnonzero(y)}


def test_msrc_known_labels(msrc_root):
    ds = open_dataset(voc_cfg(msrc_root), validate=False)
    assert _names(ds, "train", "10_11_s") == {"flower"}
    assert _names(ds, "train", "12_20_s") == {"bird", "chair"}
    assert _names(ds, "train", "16_21_s") == {"dog", "person"}
    assert _names(ds, "train", "17_10_s") == set()
    assert _names(ds, "val", "10_10_s") == {"flower"}
    assert ds.ids("train")[:2] == ["10_11_s", "10_13_s"]


def test_msrc_images_and_masks_align(msrc_root):
    ds = open_dataset(voc_cfg(msrc_root, limit=5), validate=False)
    images, masks = ds.labelled("val"), ds.masks("val")
    assert masks.ids == images.ids == ds.ids("val")[:5]
    for i, sid in enumerate(images.ids):
        img, y = images[i]
        m = masks.mask(sid)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert m.dtype == np.uint8 and m.shape == img.shape[:2]
        values = set(np.unique(m).tolist()) - {255}
        assert max(values) < ds.num_classes
        # the labels of these val images agree with their masks
        assert {k for k in values if k} == {k + 1 for k in np.flatnonzero(y)}
        np.testing.assert_array_equal(masks.image(sid), img)


# --------------------------------------------------------------------------- reader on fixtures
def test_fixture_round_trip(tmp_path):
    root = make_voc(tmp_path / "voc")
    ds = open_dataset(voc_cfg(root))
    assert ds.classes == CLASSES and ds.root == root
    assert ds.ids("train") == ["a0", "a1", "a2", "a3"]
    y = ds.labelled("train").labels
    np.testing.assert_array_equal(y, [[0, 0], [1, 0], [0, 1], [0, 0]])
    np.testing.assert_array_equal(ds.masks("train").mask("a1"), _mask_for(1))


def test_limit_takes_first_ids(tmp_path):
    root = make_voc(tmp_path / "voc")
    ds = open_dataset(voc_cfg(root, limit=2))
    assert ds.ids("train") == ["a0", "a1"] and ds.ids("val") == ["b0", "b1"]
    assert len(ds.labelled("train")) == 2 and len(ds.masks("val")) == 2
    assert validate_dataset(ds).splits["train"].images == 2


def test_labelled_images_has_no_mask_access(tmp_path):
    ds = open_dataset(voc_cfg(make_voc(tmp_path / "voc")))
    images = ds.labelled("train")
    assert isinstance(images, LabelledImages)
    assert not any("mask" in name.lower() for name in dir(images))
    assert not hasattr(images, "__dict__")  # slots only: nothing else can be attached
    held = [getattr(images, s) for s in LabelledImages.__slots__]
    assert not any(isinstance(v, (MaskSet, type(ds))) for v in held)
    assert all("SegmentationClass" not in str(p) for p in held[1])


def test_labelled_images_api(tmp_path):
    images = open_dataset(voc_cfg(make_voc(tmp_path / "voc"))).labelled("train")
    img, y = images[-1]
    assert img.shape == (H, W, 3) and y.dtype == np.float32 and y.shape == (2,)
    assert images.image_path(images.ids[1]).name == "a1.jpg"
    np.testing.assert_array_equal(images.image(images.ids[0]), read_image(images.image_path(images.ids[0])))
    np.testing.assert_array_equal(images[0][0], images.image(images.ids[0]))  # by position: the same image
    sub = images.subset([2, 0])
    assert sub.ids == ["a2", "a0"] and sub.labels.tolist() == [[0, 1], [0, 0]]
    assert images.subset(np.array([False, True, False, True])).ids == ["a1", "a3"]
    assert [x[1].tolist() for x in images][:2] == [[0, 0], [1, 0]]
    y[0] = 5  # items are copies
    assert images.labels[3, 0] == 0
    with pytest.raises(IndexError):
        images[4]
    with pytest.raises(TypeError):
        images["a0"]  # type: ignore[index]
    assert [images.position(i) for i in ("a3", "a0", "a2")] == [3, 0, 2]
    assert sub.position("a0") == 1  # positions of the subset, not of the parent
    with pytest.raises(KeyError, match="'zz'"):
        images.position("zz")


def test_mask_set_api(tmp_path):
    ds = open_dataset(voc_cfg(make_voc(tmp_path / "voc")))
    masks = ds.masks("val")
    assert list(masks) == ["b0", "b1", "b2"] and "b1" in masks and len(masks) == 3
    with pytest.raises(DataError, match="'zz'"):
        masks.mask("zz")


def test_default_voc_classes_when_no_class_file(tmp_path):
    ds = open_dataset(voc_cfg(make_voc(tmp_path / "voc", classes=None)))
    assert ds.classes == VOC_CLASSES and len(ds.classes) == 21
    assert ds.labelled("train").labels.shape == (4, 20)


def test_labels_derived_from_masks_are_flagged(tmp_path):
    root = make_voc(tmp_path / "voc", csv=False)
    with pytest.warns(UserWarning, match="are derived from the masks"):
        ds = open_dataset(voc_cfg(root), validate=False)
    assert ds.label_source("train") == "masks"
    np.testing.assert_array_equal(ds.labelled("train").labels, [[0, 0], [1, 0], [0, 1], [0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = validate_dataset(open_dataset(voc_cfg(root)))
    assert report.splits["val"].label_source == "masks" and report.splits["val"].class_counts == {"cat": 1, "dog": 1}


def test_trusted_ids(tmp_path):
    root = make_voc(tmp_path / "voc")
    assert open_dataset(voc_cfg(root)).trusted_ids("train") is None
    (root / "trusted_train.txt").write_text("a1\na3\n")
    assert open_dataset(voc_cfg(root)).trusted_ids("train") == frozenset({"a1", "a3"})
    assert open_dataset(voc_cfg(root, limit=2)).trusted_ids("train") == frozenset({"a1"})
    (root / "trusted_train.txt").write_text("a1\nnope\n")
    with pytest.raises(DataError, match=r"trusted_train.txt: line 2: id 'nope'"):
        open_dataset(voc_cfg(root))


def test_csv_background_and_empty_rows(tmp_path):
    root = make_voc(tmp_path / "voc")
    (root / "image_labels_train.csv").write_text("image_id,labels\na0,background\na1,cat dog\na2,\na3\n")
    y = open_dataset(voc_cfg(root)).labelled("train").labels
    np.testing.assert_array_equal(y, [[0, 0], [1, 1], [0, 0], [0, 0]])


# --------------------------------------------------------------------------- image modes
def _save_modes(folder: Path) -> dict[str, Image.Image]:
    """One image per PIL mode, saved in a format that keeps the mode."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    grey = rng.integers(0, 255, (H, W), dtype=np.uint8)
    pics = {
        "gray": (Image.fromarray(grey), "jpg"),
        "pal": (rgb.quantize(16), "png"),
        "rgba": (Image.fromarray(rng.integers(0, 255, (H, W, 4), dtype=np.uint8)), "png"),
        "cmyk": (rgb.convert("CMYK"), "jpg"),
        "la": (Image.fromarray(grey).convert("LA"), "png"),
        "rgbjpg": (rgb, "jpg"),
    }
    saved = {}
    for name, (im, ext) in pics.items():
        im.save(folder / f"{name}.{ext}")
        saved[name] = Image.open(folder / f"{name}.{ext}")
    return saved


def test_image_modes_convert_to_rgb(tmp_path):
    ids = ["gray", "pal", "rgba", "cmyk", "la", "rgbjpg"]
    root = make_voc(tmp_path / "voc", {"train": ids, "val": ["v0"]})
    for p in (root / "JPEGImages").glob("*"):
        if p.stem in ids:
            p.unlink()
    saved = _save_modes(root / "JPEGImages")
    assert {k: v.mode for k, v in saved.items()} == {
        "gray": "L", "pal": "P", "rgba": "RGBA", "cmyk": "CMYK", "la": "LA", "rgbjpg": "RGB"}
    ds = open_dataset(voc_cfg(root))
    images = ds.labelled("train")
    for i, sid in enumerate(images.ids):
        img, _ = images[i]
        assert img.dtype == np.uint8 and img.shape == (H, W, 3), sid
        np.testing.assert_array_equal(img, np.asarray(saved[sid].convert("RGB")), err_msg=sid)
        np.testing.assert_array_equal(ds.masks("train").image(sid), img)


def test_sixteen_bit_grey_is_rescaled(tmp_path):
    a = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 200).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == (H, W, 3)
    np.testing.assert_array_equal(img[..., 0], np.rint(a / 257.0).astype(np.uint8))
    assert (img[..., 0] == img[..., 2]).all()


def test_jpeg_with_trailing_bytes_is_accepted(tmp_path):
    root = make_voc(tmp_path / "voc")
    p = root / "JPEGImages" / "a0.jpg"
    p.write_bytes(p.read_bytes() + b"extra trailer")
    assert validate_dataset(open_dataset(voc_cfg(root))).splits["train"].images == 4


# --------------------------------------------------------------------------- bad input
def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _cut_end(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-30])


def _rewrite(p: Path, text: str) -> None:
    p.write_text(text)


def _save_mask(p: Path, a: np.ndarray) -> None:
    Image.fromarray(a).save(p)


def _png_image(root: Path) -> None:
    (root / "JPEGImages" / "a1.jpg").unlink()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "JPEGImages" / "a1.png")
    _truncate(root / "JPEGImages" / "a1.png")


BAD_INPUTS = {
    # name: (mutation of the fixture, text the DataError message must contain)
    "split list missing": (lambda r: (r / "ImageSets/Segmentation/val.txt").unlink(), "val.txt: split list not found"),
    "duplicate id": (lambda r: _rewrite(r / "ImageSets/Segmentation/train.txt", "a0\na1\na0\n"),
                     "train.txt: line 3: duplicate id 'a0'"),
    "image missing": (lambda r: (r / "JPEGImages/a2.jpg").unlink(), "a2.jpg: missing image file"),
    "image unreadable": (lambda r: (r / "JPEGImages/a2.jpg").write_bytes(b"not an image at all"),
                         "a2.jpg: unreadable image"),
    "jpeg truncated": (lambda r: _truncate(r / "JPEGImages/b1.jpg"), "b1.jpg: unreadable or truncated image"),
    "jpeg end cut": (lambda r: _cut_end(r / "JPEGImages/b1.jpg"), "b1.jpg: truncated or corrupt JPEG file"),
    "png truncated": (_png_image, "a1.png: truncated or corrupt PNG file"),
    "mask missing": (lambda r: (r / "SegmentationClass/b2.png").unlink(), "b2.png: missing mask file"),
    "image is a FIFO": (lambda r: (r / "JPEGImages/a2.jpg").unlink() or os.mkfifo(r / "JPEGImages/a2.jpg"),
                        "a2.jpg: is a FIFO, not a regular file"),
    "image is a device": (lambda r: (r / "JPEGImages/a2.jpg").unlink() or
                          (r / "JPEGImages/a2.jpg").symlink_to("/dev/zero"), "a2.jpg: is a device, not a regular file"),
    "mask wrong size": (lambda r: _save_mask(r / "SegmentationClass/a1.png", np.zeros((H, W + 1), np.uint8)),
                        "a1.png: mask size 21x14 differs from the image size 20x14"),
    "mask class out of range": (lambda r: _save_mask(r / "SegmentationClass/a3.png", np.full((H, W), 7, np.uint8)),
                                "a3.png: class id 7 out of range"),
    "mask in colour": (lambda r: Image.new("RGB", (W, H)).save(r / "SegmentationClass/a0.png"),
                       "a0.png: mask must be a single-channel"),
    "unknown class name": (lambda r: _rewrite(r / "image_labels_train.csv", "image_id,labels\na0,\na1,cat\na2,cow\n"),
                           "image_labels_train.csv: line 4: unknown class name 'cow'"),
    "csv misses an id": (lambda r: _rewrite(r / "image_labels_val.csv", "image_id,labels\nb0,\nb2,cat\n"),
                         "image_labels_val.csv: no row for image id 'b1'"),
    "csv bad header": (lambda r: _rewrite(r / "image_labels_val.csv", "id,tags\nb0,\n"),
                       "image_labels_val.csv: line 1: header"),
    "classes without background": (lambda r: _rewrite(r / "classes.txt", "cat\ndog\n"),
                                   "classes.txt: the first class (pixel value 0) must be 'background'"),
    "no labels at all": (lambda r: [(r / "image_labels_val.csv").unlink()]
                         + [p.unlink() for p in (r / "SegmentationClass").glob("b*.png")],
                         "image_labels_val.csv: not found, and split 'val' has no masks"),
    "image folder missing": (lambda r: [p.unlink() for p in (r / "JPEGImages").iterdir()]
                             and (r / "JPEGImages").rmdir(), "JPEGImages: image folder not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_data_error_naming_the_file(tmp_path, case):
    root = make_voc(tmp_path / "voc")
    mutate, expected = BAD_INPUTS[case]
    mutate(root)
    with pytest.raises(DataError) as err:
        open_dataset(voc_cfg(root))
    msg = str(err.value)
    assert expected in msg
    assert str(root) in msg  # full path of the offending file
    assert isinstance(err.value, ValueError)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere: dataset folder not found"):
        open_dataset(voc_cfg(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.root"):
        open_dataset(DataConfig(format="voc", root=None))


def test_root_removed_after_open(tmp_path):
    root = make_voc(tmp_path / "voc")
    ds = open_dataset(voc_cfg(root))
    import shutil

    shutil.rmtree(root)
    with pytest.raises(DataError, match="dataset folder not found"):
        validate_dataset(ds)


def test_unknown_split(tmp_path):
    ds = open_dataset(voc_cfg(make_voc(tmp_path / "voc")))
    with pytest.raises(DataError, match="split 'test'"):
        ds.labelled("test")
    with pytest.raises(DataError, match="has no masks"):
        open_dataset(voc_cfg(make_voc(tmp_path / "v2", masks=False))).masks("train")


# --------------------------------------------------------------------------- EXIF orientation
ORIENT_W, ORIENT_H = 40, 24
RED, BLUE = (255, 0, 0), (0, 0, 255)
# the displayed pixels of stored pixels `a` per EXIF Orientation (EXIF 2.32, tag 0x0112), in numpy
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: np.rot90(a, 2),  # upside down
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # stored row 0 is the left column, stored column 0 the top row
    6: lambda a: np.rot90(a, -1),  # turned clockwise: stored row 0 is the right column
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # stored row 0 is the right column, column 0 the bottom row
    8: lambda a: np.rot90(a, 1),  # turned anticlockwise: stored row 0 is the left column
}


def _quadrant_pattern() -> np.ndarray:
    """ORIENT_H x ORIENT_W: the top-left quadrant red, the rest blue (no symmetry to hide a wrong turn)."""
    a = np.empty((ORIENT_H, ORIENT_W, 3), np.uint8)
    a[...] = BLUE
    a[: ORIENT_H // 2, : ORIENT_W // 2] = RED
    return a


def _save_oriented(path: Path, a: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, exif=exif)


def _corner_colours(a: np.ndarray) -> list[tuple[int, ...]]:
    """The mean colour of a 4x4 patch 2 pixels in from each corner (clear of JPEG ringing at the quadrant edges)."""
    patches = [a[2:6, 2:6], a[2:6, -6:-2], a[-6:-2, 2:6], a[-6:-2, -6:-2]]
    return [tuple(int(round(float(v))) for v in p.reshape(-1, 3).mean(0)) for p in patches]


@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_read_image_applies_the_exif_orientation_of_a_jpeg(tmp_path, orientation):
    from wsss_core.data import check_image_file

    stored = _quadrant_pattern()
    path = tmp_path / f"o{orientation}.jpg"
    _save_oriented(path, stored, orientation)
    with Image.open(path) as im:
        assert im.size == (ORIENT_W, ORIENT_H) and im.getexif()[0x0112] == orientation  # stored as built
    expected = DISPLAYED[orientation](stored)
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == expected.shape
    for got, want in zip(_corner_colours(img), _corner_colours(expected)):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 12, (got, want)
    assert np.abs(img.astype(int) - expected.astype(int)).mean() < 8  # every pixel, up to JPEG loss
    assert check_image_file(path) == (expected.shape[1], expected.shape[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_applies_every_exif_orientation_exactly(tmp_path, orientation):
    from wsss_core.data import check_image_file

    stored = np.random.default_rng(orientation).integers(0, 255, (ORIENT_H, ORIENT_W, 3), dtype=np.uint8)
    path = tmp_path / f"o{orientation}.png"
    _save_oriented(path, stored, orientation)  # PNG eXIf chunk: lossless, so the comparison is exact
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == orientation
    expected = DISPLAYED[orientation](stored)
    np.testing.assert_array_equal(read_image(path), expected)
    assert check_image_file(path) == (expected.shape[1], expected.shape[0])


def test_masks_are_checked_against_the_displayed_size(tmp_path):
    root = make_voc(tmp_path / "voc")
    image, mask = root / "JPEGImages" / "a0.jpg", root / "SegmentationClass" / "a0.png"
    stored = _quadrant_pattern()
    _save_oriented(image, stored, 6)  # displayed 24 wide x 40 high
    _save_mask(mask, np.zeros((ORIENT_H, ORIENT_W), np.uint8))  # drawn on the stored pixels
    with pytest.raises(DataError) as err:
        open_dataset(voc_cfg(root))
    assert str(err.value) == (
        f"{mask}: mask size 40x24 differs from the image size 24x40 of {image} (the image's EXIF orientation 6 "
        "rotates it for display; draw masks on the image as displayed)"
    )
    # a mask of the displayed size passes, and the dataset reads the image as displayed
    _save_mask(mask, np.zeros((ORIENT_W, ORIENT_H), np.uint8))
    ds = open_dataset(voc_cfg(root))
    img, _ = ds.labelled("train")[0]
    assert img.shape == (ORIENT_W, ORIENT_H, 3)
    assert _corner_colours(img)[1] == pytest.approx(RED, abs=12)  # the red quadrant is now top-right
    assert ds.masks("train").mask("a0").shape == img.shape[:2]
    np.testing.assert_array_equal(ds.masks("train").image("a0"), img)
    # without an orientation tag a transposed mask gets the plain message, with no EXIF hint
    _save_oriented(image, stored, 1)
    with pytest.raises(DataError) as err:
        open_dataset(voc_cfg(root))
    assert str(err.value) == f"{mask}: mask size 24x40 differs from the image size 40x24 of {image}"


def test_the_data_stage_never_hashes_a_device_or_a_fifo(tmp_path):
    """`wsss run` fingerprints the dataset's files before validating the images: /dev/zero behind an image
    name was hashed for ever, a FIFO blocked for ever. Both are one DataError naming the file."""
    from wsss_core.data.content import dataset_content

    root = make_voc(tmp_path / "voc")
    image = root / "JPEGImages" / "a2.jpg"
    image.unlink()
    image.symlink_to("/dev/zero")
    ds = open_dataset(voc_cfg(root), validate=False)
    with pytest.raises(DataError, match=f"^{image}: is a device, not a regular file$"):
        dataset_content(ds)
    image.unlink()
    os.mkfifo(image)
    with pytest.raises(DataError, match=f"^{image}: is a FIFO, not a regular file$"):
        dataset_content(ds)
