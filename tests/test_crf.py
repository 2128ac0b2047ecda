"""Dense CRF and confident labels (wsss_core.crf) on small synthetic images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss_core.config import CrfConfig
from wsss_core.crf import (
    cam_label_indices,
    confident_label_scores,
    confident_labels,
    confident_labels_many,
    crf_many,
    dense_crf,
    dense_crf_labels,
    refined_mask,
    refined_prediction,
    with_label_trust,
)

CFG = CrfConfig()


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    r = int(3 * sigma)
    x = np.arange(-r, r + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()

    def conv(v: np.ndarray) -> np.ndarray:
        return np.convolve(np.pad(v, r, mode="edge"), k, mode="valid")

    return np.apply_along_axis(conv, 1, np.apply_along_axis(conv, 0, a))


def _rectangles(seed: int = 0, shift: int = 3, h: int = 64, w: int = 96):
    """Two flat-coloured rectangles on a noisy grey background, and CAMs that are
    blurred, shifted copies of their masks. Returns image, cams (2,H,W), truth (0/1/2)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(120, 12, (h, w, 3)), 0, 255)
    a = np.zeros((h, w), bool)
    a[10:40, 8:38] = True
    b = np.zeros((h, w), bool)
    b[20:56, 52:88] = True
    img[a] = (220, 40, 40)
    img[b] = (40, 70, 220)
    cams = []
    for m in (a, b):
        c = _blur(np.roll(m.astype(np.float64), (shift, shift), (0, 1)), 4.0)
        cams.append(c / c.max())
    truth = np.zeros((h, w), np.int64)
    truth[a] = 1
    truth[b] = 2
    return img.astype(np.uint8), np.stack(cams).astype(np.float32), truth


def _miou(pred: np.ndarray, truth: np.ndarray, n: int) -> float:
    return float(np.mean([((pred == k) & (truth == k)).sum() / ((pred == k) | (truth == k)).sum() for k in range(n)]))


def _band_case():
    """Flat regions aligned with a piecewise-constant CAM: core 0.8, ring 0.15, outside 0."""
    h, w = 72, 96
    region = np.zeros((h, w), np.int64)
    region[8:64, 8:56] = 1
    region[20:52, 20:44] = 2
    colors = np.array([(30, 160, 60), (200, 200, 60), (200, 40, 40)], np.uint8)
    image = colors[region]
    cam = np.choose(region, [0.0, 0.15, 0.8])[None].astype(np.float32)
    return image, cam, region


# --------------------------------------------------------------------------- dense CRF
@pytest.mark.parametrize("threshold", [0.15, 0.3, 0.5])
def test_crf_snaps_cam_labels_to_object_edges(threshold):
    image, cams, truth = _rectangles()
    cam_labels = cam_label_indices(cams, threshold)
    refined = dense_crf_labels(image, cam_labels, 3, CFG)
    before, after = _miou(cam_labels, truth, 3), _miou(refined, truth, 3)
    assert before < 0.8
    assert after > before + 0.15
    assert after > 0.95
    assert refined.shape == truth.shape and set(np.unique(refined)) <= {0, 1, 2}


def test_crf_accepts_non_contiguous_image_and_labels():
    image, cams, _ = _rectangles()
    labels = cam_label_indices(cams, 0.3)
    expected = dense_crf_labels(image, labels, 3, CFG)
    # the same data as strided (non-contiguous) views, and a Fortran-order image
    wide_image = np.zeros((image.shape[0], 2 * image.shape[1], 3), np.uint8)
    wide_image[:, ::2] = image
    wide_labels = np.zeros((labels.shape[0], 2 * labels.shape[1]), labels.dtype)
    wide_labels[:, ::2] = labels
    assert not wide_image[:, ::2].flags.c_contiguous
    np.testing.assert_array_equal(dense_crf_labels(wide_image[:, ::2], wide_labels[:, ::2], 3, CFG), expected)
    np.testing.assert_array_equal(dense_crf_labels(np.asfortranarray(image), labels.astype(np.int32), 3, CFG),
                                  expected)
    frozen = image.copy()
    frozen.flags.writeable = False  # as np.asarray(PIL image) gives
    np.testing.assert_array_equal(dense_crf_labels(frozen, labels, 3, CFG), expected)


def test_crf_single_label_is_identity():
    image, _, _ = _rectangles()
    out = dense_crf_labels(image, np.zeros(image.shape[:2], np.int64), 1, CFG)
    assert out.shape == image.shape[:2] and not out.any()


def test_dense_crf_probabilities():
    image, cams, truth = _rectangles()
    logits = np.concatenate([np.full((1,) + truth.shape, 0.3, np.float32), cams]) * 8
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    q = dense_crf(image, probs, CFG)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert _miou(q.argmax(0), truth, 3) > _miou(probs.argmax(0), truth, 3) + 0.1


def test_crf_input_errors():
    image, cams, _ = _rectangles()
    labels = cam_label_indices(cams, 0.3)
    with pytest.raises(ValueError, match="labels shape"):
        dense_crf_labels(image, labels[:-1], 3, CFG)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf_labels(image.astype(np.float32), labels, 3, CFG)
    with pytest.raises(ValueError, match="HxWx3"):
        dense_crf_labels(image[..., 0], labels, 3, CFG)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.1"):
        dense_crf_labels(image, labels, 2, CFG)
    with pytest.raises(ValueError, match="gt_prob"):
        dense_crf_labels(image, labels, 3, CrfConfig(gt_prob=1.0))
    with pytest.raises(ValueError, match="probs"):
        dense_crf(image, np.ones((2, 3, 3), np.float32), CFG)


# --------------------------------------------------------------------------- confident labels
def test_cam_label_indices_padding_semantics():
    cams = np.array([[[0.2, 0.3, 0.5]], [[0.1, 0.4, 0.5]]], np.float32)  # (2, 1, 3)
    # background plane == threshold; ties resolve to the earlier plane (background first)
    np.testing.assert_array_equal(cam_label_indices(cams, 0.3), [[0, 2, 1]])
    np.testing.assert_array_equal(cam_label_indices(cams, 0.0), [[1, 2, 1]])


def test_unconfident_exactly_in_band_between_thresholds():
    image, cam, region = _band_case()
    out = confident_labels(image, cam, np.array([5]), CFG)
    assert out.dtype == np.uint8
    expected = np.choose(region, [0, 255, 5])  # outside bg, ring (0.05 < cam <= 0.3) unconfident, core class 5
    np.testing.assert_array_equal(out, expected)
    # equal thresholds leave no band
    same = CrfConfig(conf_fg_thres=0.3, conf_bg_thres=0.3)
    assert not (confident_labels(image, cam, np.array([5]), same) == 255).any()


@pytest.mark.parametrize("fg, bg", [(0.30, 0.05), (0.50, 0.10)])
def test_a_cam_exactly_on_a_threshold_is_background_there(fg, bg):
    """Ties go to the background: a CAM equal to conf_fg_thres is not confident foreground (the pixel is
    unconfident: above conf_bg_thres), one equal to conf_bg_thres is background; a hair above either
    threshold crosses it. Uniform planes, so the CRF keeps every pixel's label."""
    cfg = CrfConfig(conf_fg_thres=fg, conf_bg_thres=bg)
    image = np.full((12, 16, 3), 120, np.uint8)
    keys = np.array([4])

    def labels(value: float) -> set[int]:
        return set(np.unique(confident_labels(image, np.full((1, 12, 16), value, np.float32), keys, cfg)).tolist())

    assert labels(fg) == {255}
    assert labels(bg) == {0}
    assert labels(np.nextafter(np.float32(fg), np.float32(1))) == {4}
    assert labels(np.nextafter(np.float32(bg), np.float32(1))) == {255}
    np.testing.assert_array_equal(cam_label_indices(np.full((2, 1, 1), fg, np.float32), fg), [[0]])


def test_class_ids_mapped_through_keys():
    image, cams, truth = _rectangles()
    out = confident_labels(image, cams, np.array([3, 7]), CFG)
    assert set(np.unique(out)) <= {0, 3, 7, 255}
    assert {3, 7} <= set(np.unique(out))
    # plane i belongs to keys[i]: the first rectangle is 3, the second 7
    assert np.mean(out[truth == 1] == 3) > 0.9
    assert np.mean(out[truth == 2] == 7) > 0.9
    # swapping planes and keys together gives the same map
    np.testing.assert_array_equal(confident_labels(image, cams[::-1], np.array([7, 3]), CFG), out)


def test_no_classes_is_all_background():
    image, _, _ = _rectangles()
    h, w = image.shape[:2]
    out = confident_labels(image, np.zeros((0, h, w), np.float32), np.zeros(0, np.int64), CFG)
    assert out.shape == (h, w) and out.dtype == np.uint8 and not out.any()


def test_confident_labels_shape_errors():
    image, cams, _ = _rectangles()
    keys = np.array([1, 2])
    with pytest.raises(ValueError, match="cams height x width"):
        confident_labels(image, cams[:, :-2], keys, CFG)
    with pytest.raises(ValueError, match="keys has 1"):
        confident_labels(image, cams, np.array([1]), CFG)
    with pytest.raises(ValueError, match=r"cams must be \(K, H, W\)"):
        confident_labels(image, cams[0], keys, CFG)
    with pytest.raises(ValueError, match="1..254"):
        confident_labels(image, cams, np.array([0, 2]), CFG)
    with pytest.raises(ValueError, match="NaN"):
        confident_labels(image, np.full_like(cams, np.nan), keys, CFG)


# --------------------------------------------------------------------------- refined pseudo masks
def test_refined_mask_snaps_a_shifted_mask_to_the_colour_edges():
    """A pseudo mask that is the true one shifted by 3 px (as a walk's mask overshoots an object) comes
    back with the true outlines: class ids 7 and 12 kept, every pixel but a few at the corners right."""
    image, _, truth = _rectangles()
    keys = np.array([7, 12])
    lut = np.array([0, 7, 12], np.uint8)
    shifted = np.roll(lut[truth], (3, 3), (0, 1))
    cfg = CrfConfig(gt_prob=0.95)
    out = refined_mask(image, shifted, keys, cfg)
    assert out.dtype == np.uint8 and set(np.unique(out).tolist()) == {0, 7, 12}
    wrong_before = int((shifted != lut[truth]).sum())
    wrong_after = int((out != lut[truth]).sum())
    assert wrong_before == 2 * (30 + 30) * 3 - 2 * 9 + 2 * (36 + 36) * 3 - 2 * 9  # two L-shaped 3-px bands each
    assert wrong_after <= 0.05 * wrong_before
    # the CRF is the label-unary one: the same call on local indices 0..2 gives the same map
    np.testing.assert_array_equal(out, lut[dense_crf_labels(image, np.searchsorted(lut, shifted), 3, cfg)])


def test_refined_prediction_uses_the_classes_the_prediction_holds():
    """A segmenter's map of a new image (no image labels): the CRF runs over the classes the map holds, so a
    3-px overshoot comes back to the colour edges as `refined_mask` with those keys would give it, and no class
    the map lacks can appear; a background-only map or no CRF returns the map unchanged."""
    image, _, truth = _rectangles()
    lut = np.array([0, 7, 12], np.uint8)
    shifted = np.roll(lut[truth], (3, 3), (0, 1))
    cfg = with_label_trust(CFG, 0.95)
    assert cfg == CrfConfig(gt_prob=0.95) and with_label_trust(CFG, None) is None
    out = refined_prediction(image, shifted, cfg)
    np.testing.assert_array_equal(out, refined_mask(image, shifted, np.array([7, 12]), cfg))
    assert int((out != lut[truth]).sum()) <= 0.05 * int((shifted != lut[truth]).sum())
    # only class 12 predicted: class 7's rectangle can only become background or stay 12, never 7
    only12 = np.where(shifted == 7, 12, shifted).astype(np.uint8)
    assert set(np.unique(refined_prediction(image, only12, cfg)).tolist()) <= {0, 12}
    background = np.zeros(truth.shape, np.uint8)
    assert refined_prediction(image, background, cfg) is background
    assert refined_prediction(image, shifted, None) is shifted


def test_refined_mask_refuses_labels_the_image_does_not_have():
    image, _, truth = _rectangles()
    with pytest.raises(ValueError, match=r"labels \[2\] that are neither background nor the image's classes \[1\]"):
        refined_mask(image, truth.astype(np.uint8), np.array([1]), CrfConfig(gt_prob=0.9))
    for keys in ([0, 1, 2], [1, 1, 2], [1, 2, 255]):
        with pytest.raises(ValueError, match="keys must be distinct class ids in 1..254"):
            refined_mask(image, truth.astype(np.uint8), np.array(keys), CrfConfig(gt_prob=0.9))
    with pytest.raises(ValueError, match="mask shape"):
        refined_mask(image, truth[:10].astype(np.uint8), np.array([1, 2]), CrfConfig(gt_prob=0.9))


def test_confident_labels_check_their_class_ids_as_the_refinement_does():
    image, _, _ = _rectangles()
    cams = np.zeros((2, *image.shape[:2]), np.float32)
    for keys, why in (([1, 1], "keys must be distinct class ids in 1..254 (0 is background, 255 void), got [1, 1]"),
                      ([0, 3], "keys must be distinct class ids in 1..254 (0 is background, 255 void), got [0, 3]"),
                      ([1.0, 2.0], "keys must be a 1-D array of integer class ids, got float64 of shape (2,)")):
        with pytest.raises(ValueError) as e:
            confident_labels(image, cams, np.array(keys), CrfConfig())
        assert str(e.value) == why


def test_crf_many_runs_any_top_level_function_in_workers():
    image, _, truth = _rectangles()
    items = [(f"img{i}", image, np.roll(truth, i, 1).astype(np.uint8), np.array([1, 2])) for i in range(3)]
    cfg = CrfConfig(gt_prob=0.9)
    parallel = dict(crf_many(refined_mask, iter(items), cfg, workers=2))
    for image_id, img, mask, keys in items:
        np.testing.assert_array_equal(parallel[image_id], refined_mask(img, mask, keys, cfg))


# --------------------------------------------------------------------------- many images
def _items(n: int, consumed: list[str] | None = None):
    for i in range(n):
        image, cams, _ = _rectangles(seed=i, shift=1 + i % 4)
        if consumed is not None:
            consumed.append(f"img{i}")
        yield f"img{i}", image, cams, np.array([1 + i % 3, 4])


def test_parallel_equals_serial_with_bounded_window():
    serial = dict(confident_labels_many(_items(6), CFG, workers=0))
    assert list(serial) == [f"img{i}" for i in range(6)]
    consumed: list[str] = []
    seen: list[str] = []
    parallel = {}
    for k, (image_id, labels) in enumerate(
            confident_labels_many(_items(6, consumed), CFG, workers=2, on_result=lambda i, _: seen.append(i))):
        if k == 0:
            assert len(consumed) <= 4  # at most 2 * workers images read ahead
        parallel[image_id] = labels
    assert sorted(parallel) == sorted(serial) and sorted(seen) == sorted(serial)
    for image_id, labels in serial.items():
        np.testing.assert_array_equal(parallel[image_id], labels)


def test_many_errors_name_the_image():
    image, cams, _ = _rectangles()
    items = [("good", image, cams, np.array([1, 2])), ("bad", image, cams[:1], np.array([1, 2]))]
    with pytest.raises(ValueError, match="bad: cams have 1 class planes"):
        list(confident_labels_many(iter(items), CFG, workers=0))
    with pytest.raises(ValueError, match="bad: "):
        list(confident_labels_many(iter(items), CFG, workers=1))


# --------------------------------------------------------------------------- metrics
def test_scores_hand_computed():
    label = np.array([[0, 1, 255], [2, 2, 0]], np.uint8)
    gt = np.array([[0, 1, 1], [2, 0, 255]], np.uint8)
    s = confident_label_scores(iter([label]), iter([gt]), 3)
    assert s["images"] == 1 and s["pixels"] == 5 and s["confident_pixels"] == 4
    assert s["fg_precision"] == pytest.approx(2 / 3)  # (0,1) ok, (1,0) ok, (1,1) is GT bg
    assert s["bg_precision"] == pytest.approx(1.0)  # (1,2) is GT void: not counted
    assert s["precision"] == pytest.approx(3 / 4)
    assert s["coverage"] == pytest.approx(4 / 5)  # (0,2) unconfident
    # IoU over (gt, pred) pairs (0,0) (1,1) (2,2) (0,2): bg 1/2, class 1 1/1, class 2 1/2
    np.testing.assert_allclose(s["iou"], [0.5, 1.0, 0.5])
    assert s["miou"] == pytest.approx(2 / 3)


def test_scores_stream_over_images():
    label = np.array([[0, 1, 255], [2, 2, 0]], np.uint8)
    gt = np.array([[0, 1, 1], [2, 0, 255]], np.uint8)
    all_unconfident = np.full((2, 2), 255, np.uint8)
    gt2 = np.array([[1, 1], [0, 0]], np.uint8)
    s = confident_label_scores((x for x in [label, all_unconfident]), (x for x in [gt, gt2]), 3)
    assert s["images"] == 2
    assert s["coverage"] == pytest.approx(4 / 9)
    assert s["precision"] == pytest.approx(3 / 4)
    only_bg = confident_label_scores([np.zeros((2, 2), np.uint8)], [np.zeros((2, 2), np.uint8)], 3)
    assert math.isnan(only_bg["fg_precision"]) and only_bg["bg_precision"] == 1.0


def test_scores_input_errors():
    a = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        confident_label_scores([a], [np.zeros((2, 3), np.uint8)], 3)
    with pytest.raises(ValueError, match="gt_masks ended"):
        confident_label_scores([a, a], [a], 3)
    with pytest.raises(ValueError, match="not a class id"):
        confident_label_scores([a + 5], [a], 3)
    with pytest.raises(ValueError, match="GT mask value 9"):
        confident_label_scores([a], [a + 9], 3)
