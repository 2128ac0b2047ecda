"""wsss_core.metrics: hand-computed cases and property tests against scikit-learn."""

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import average_precision_score, f1_score

from wsss_core.metrics import (
    ConfusionMatrix,
    average_precision,
    classification_scores,
    f1_scores,
    mean_average_precision,
    segmentation_scores,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- segmentation, by hand
def test_three_by_three_by_hand():
    gt = np.array([[0, 0, 1],
                   [0, 1, 1],
                   [2, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 1],
                     [0, 1, 2],
                     [2, 2, 0]], np.uint8)
    cm = ConfusionMatrix(3).update(pred, gt)
    # rows gt, cols pred
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 0],
                                              [0, 2, 1],
                                              [1, 0, 2]])
    # class 0: tp 2, gt 3, pred 3 -> 2/4; class 1: 2/(3+3-2)=2/4; class 2: 2/(3+3-2)=2/4
    np.testing.assert_allclose(cm.iou(), [0.5, 0.5, 0.5])
    assert cm.miou() == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(6 / 9)
    np.testing.assert_allclose(cm.class_accuracy(), [2 / 3, 2 / 3, 2 / 3])
    assert cm.mean_class_accuracy() == pytest.approx(2 / 3)
    assert cm.total == 9


def test_unequal_ious_by_hand():
    gt = np.array([[0, 0, 0],
                   [0, 1, 1],
                   [0, 1, 1]])
    pred = np.array([[0, 0, 0],
                     [0, 0, 1],
                     [1, 1, 1]])
    cm = ConfusionMatrix(2).update(pred, gt)
    # class 0: tp 4, gt 5, pred 5 -> 4/6; class 1: tp 3, gt 4, pred 4 -> 3/5
    np.testing.assert_allclose(cm.iou(), [4 / 6, 3 / 5])
    assert cm.miou() == pytest.approx((4 / 6 + 3 / 5) / 2)
    assert cm.pixel_accuracy() == pytest.approx(7 / 9)
    np.testing.assert_allclose(cm.class_accuracy(), [4 / 5, 3 / 4])


def test_void_is_ignored():
    gt = np.array([[0, 255, 1],
                   [255, 1, 1]], np.uint8)
    pred = np.array([[0, 1, 1],
                     [1, 1, 0]], np.uint8)
    cm = ConfusionMatrix(2).update(pred, gt)
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [1, 2]])
    assert cm.total == 4
    # class 0: tp 1, gt 1, pred 2 -> 1/2; class 1: tp 2, gt 3, pred 2 -> 2/3
    np.testing.assert_allclose(cm.iou(), [1 / 2, 2 / 3])
    # a prediction out of range on a void pixel is fine
    ConfusionMatrix(2).update(np.array([[7]]), np.array([[255]]))


def test_class_absent_from_both_is_excluded():
    gt = np.array([[0, 0], [2, 2]])
    pred = np.array([[0, 2], [2, 2]])
    cm = ConfusionMatrix(4).update(pred, gt)
    iou = cm.iou()
    assert math.isnan(iou[1]) and math.isnan(iou[3])
    np.testing.assert_allclose(iou[[0, 2]], [1 / 2, 2 / 3])
    assert cm.miou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    acc = cm.class_accuracy()
    assert math.isnan(acc[1]) and math.isnan(acc[3])
    assert cm.mean_class_accuracy() == pytest.approx((1 / 2 + 1) / 2)


def test_class_only_predicted_has_zero_iou():
    cm = ConfusionMatrix(3).update(np.array([[0, 1]]), np.array([[0, 0]]))
    iou = cm.iou()
    assert iou[1] == 0.0 and math.isnan(iou[2])
    assert math.isnan(cm.class_accuracy()[1])  # absent in GT


def test_pred_255_counts_as_a_miss():
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 255, 1, 255]], np.uint8)
    cm = ConfusionMatrix(2).update(pred, gt)
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(cm.missed, [1, 1])
    assert cm.total == 4
    # a miss is a false negative of its GT class and a false positive of nobody
    np.testing.assert_allclose(cm.iou(), [1 / 2, 1 / 2])
    np.testing.assert_allclose(cm.class_accuracy(), [1 / 2, 1 / 2])
    assert cm.pixel_accuracy() == pytest.approx(1 / 2)
    # only misses for a class: it is present in GT, IoU 0
    cm2 = ConfusionMatrix(2).update(np.array([[0, 255]]), np.array([[0, 1]]))
    np.testing.assert_allclose(cm2.iou(), [1.0, 0.0])
    assert cm2.miou() == pytest.approx(0.5)


def test_empty_matrix_is_nan():
    cm = ConfusionMatrix(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(cm.iou()).all()
        assert math.isnan(cm.miou())
        assert math.isnan(cm.pixel_accuracy())
        assert math.isnan(cm.mean_class_accuracy())
    cm.update(np.full((2, 2), 1), np.full((2, 2), 255))
    assert cm.total == 0


def test_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="prediction value 5"):
        cm.update(np.array([[0, 5]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="prediction value -1"):
        cm.update(np.array([[0, -1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="GT value 7"):
        cm.update(np.array([[0, 0]]), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="dtype"):
        cm.update(np.array([[0.5]]), np.array([[0]]))
    assert cm.total == 0  # failed updates add nothing
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)
    with pytest.raises(ValueError, match="num_classes"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="2 class names"):
        segmentation_scores(cm, ["background", "cat"])
    with pytest.raises(ValueError, match="duplicate"):
        segmentation_scores(cm, ["background", "cat", "cat"])


def test_merge_iadd_reset():
    a = ConfusionMatrix(2).update(np.array([0, 1]), np.array([0, 0]))
    b = ConfusionMatrix(2).update(np.array([1, 255]), np.array([1, 1]))
    c = a + b
    assert c.total == 4 and a.total == 2
    a += b
    np.testing.assert_array_equal(a.matrix, c.matrix)
    np.testing.assert_array_equal(a.missed, [0, 1])
    assert a.merge(b) is a
    a.reset()
    assert a.total == 0 and not a.matrix.any() and not a.missed.any()


def test_segmentation_scores_json():
    cm = ConfusionMatrix(4).update(np.array([[0, 2], [2, 2]]), np.array([[0, 0], [2, 2]]))
    s = segmentation_scores(cm, ("background", "cat", "dog", "sheep"))
    assert set(s) >= {"miou", "pixel_accuracy", "mean_class_accuracy", "iou"}
    assert s["iou"] == {"background": 0.5, "cat": None, "dog": pytest.approx(2 / 3), "sheep": None}
    assert type(s["miou"]) is float and type(s["iou"]["background"]) is float
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    json.dumps(s, allow_nan=False)
    empty = segmentation_scores(ConfusionMatrix(2), ("background", "cat"))
    assert empty["miou"] is None and empty["iou"] == {"background": None, "cat": None}
    json.dumps(empty, allow_nan=False)


# --------------------------------------------------------------------------- segmentation, properties
@st.composite
def label_pairs(draw, void=True):
    k = draw(st.integers(1, 6))
    shape = draw(st.tuples(st.integers(1, 12), st.integers(1, 12)))
    labels = st.integers(0, k - 1) | st.just(255) if void else st.integers(0, k - 1)
    gt = draw(arrays(np.uint8, shape, elements=labels))
    pred = draw(arrays(np.uint8, shape, elements=st.integers(0, k - 1)))
    return k, pred, gt


@SETTINGS
@given(label_pairs())
def test_iou_in_unit_interval_and_total(case):
    k, pred, gt = case
    cm = ConfusionMatrix(k).update(pred, gt)
    iou = cm.iou()
    ok = ~np.isnan(iou)
    assert ((iou[ok] >= 0) & (iou[ok] <= 1)).all()
    assert cm.matrix.sum() == cm.total == int((gt != 255).sum())
    present = np.zeros(k, bool)
    present[np.unique(gt[gt != 255])] = True
    present[np.unique(pred[gt != 255])] = True
    np.testing.assert_array_equal(ok, present)
    miou = cm.miou()
    assert math.isnan(miou) if not present.any() else 0 <= miou <= 1


@SETTINGS
@given(label_pairs(), st.integers(0, 200))
def test_merge_equals_single_update(case, cut):
    k, pred, gt = case
    p, g = pred.ravel(), gt.ravel()
    cut = cut % (p.size + 1)
    whole = ConfusionMatrix(k).update(p, g)
    a = ConfusionMatrix(k).update(p[:cut], g[:cut])
    b = ConfusionMatrix(k).update(p[cut:], g[cut:])
    two = ConfusionMatrix(k).update(p[:cut], g[:cut]).update(p[cut:], g[cut:])
    a += b
    for cm in (a, two):
        np.testing.assert_array_equal(cm.matrix, whole.matrix)
        np.testing.assert_array_equal(cm.iou(), whole.iou())  # NaN positions equal too
        assert cm.miou() == whole.miou() or (math.isnan(cm.miou()) and math.isnan(whole.miou()))


@SETTINGS
@given(label_pairs(void=False))
def test_perfect_prediction(case):
    k, _, gt = case
    cm = ConfusionMatrix(k).update(gt, gt)
    present = np.isin(np.arange(k), gt)
    np.testing.assert_array_equal(cm.iou()[present], 1.0)
    assert np.isnan(cm.iou()[~present]).all()
    assert cm.miou() == 1.0 and cm.pixel_accuracy() == 1.0 and cm.mean_class_accuracy() == 1.0


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@SETTINGS
@given(label_pairs(void=False))
def test_confusion_matches_sklearn(case):
    from sklearn.metrics import confusion_matrix, jaccard_score

    k, pred, gt = case
    cm = ConfusionMatrix(k).update(pred, gt)
    labels = list(range(k))
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(gt.ravel(), pred.ravel(), labels=labels))
    present = [c for c in labels if c in gt or c in pred]
    ref = jaccard_score(gt.ravel(), pred.ravel(), labels=present, average=None, zero_division=0)
    np.testing.assert_allclose(cm.iou()[present], ref)


# --------------------------------------------------------------------------- AP / F1, by hand
def test_ap_by_hand():
    # ranks: +, -, +, -  -> (1/1 + 2/3) / 2
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert average_precision(scores, [1, 0, 1, 0])[0] == pytest.approx((1 + 2 / 3) / 2)
    # ranks: -, -, +, +  -> (1/3 + 2/4) / 2
    assert average_precision(scores, [0, 0, 1, 1])[0] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # all positives on top -> 1
    assert average_precision(scores, [1, 1, 0, 0])[0] == 1.0
    # ties: the tied block [+, -] at the top counts as one threshold of precision 1/2
    tied = np.array([0.9, 0.9, 0.1])
    assert average_precision(tied, [1, 0, 0])[0] == pytest.approx(0.5)
    assert average_precision(tied, [0, 1, 0])[0] == pytest.approx(0.5)
    # tied block [+, +, -] then + : 2/3 * 2/3 + 3/4 * 1/3
    tied = np.array([0.5, 0.5, 0.5, 0.2])
    assert average_precision(tied, [1, 1, 0, 1])[0] == pytest.approx(2 / 3 * 2 / 3 + 3 / 4 / 3)


def test_ap_multi_class_and_no_positives():
    scores = np.array([[0.9, 0.1, 0.3],
                       [0.2, 0.8, 0.4],
                       [0.6, 0.7, 0.5]])
    targets = np.array([[1, 0, 0],
                        [0, 1, 0],
                        [0, 1, 0]])
    ap = average_precision(scores, targets)
    # class 0: ranks +, -, - -> 1; class 1: ranks +, +, - -> 1; class 2: no positives
    np.testing.assert_allclose(ap[:2], [1.0, 1.0])
    assert math.isnan(ap[2])
    assert mean_average_precision(scores, targets) == 1.0
    assert math.isnan(mean_average_precision(scores[:, 2:], targets[:, 2:]))
    # class 0 with target on the last-ranked image: ranks -, -, + -> 1/3
    assert average_precision(scores[:, :1], [[0], [1], [0]])[0] == pytest.approx(1 / 3)


def test_f1_by_hand():
    scores = np.array([[0.9, 0.2, 0.1],
                       [0.6, 0.7, 0.2],
                       [0.1, 0.4, 0.3]])
    targets = np.array([[1, 1, 0],
                        [0, 1, 0],
                        [1, 0, 0]])
    f = f1_scores(scores, targets)
    # class 0: tp 1 fp 1 fn 1 -> 1/2 ; class 1: tp 1 fp 0 fn 1 -> 2/3 ; class 2: undefined
    np.testing.assert_allclose(f["per_class"][:2], [1 / 2, 2 / 3])
    assert math.isnan(f["per_class"][2])
    assert f["macro"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # pooled tp 2 fp 1 fn 2 -> 4 / 7
    assert f["micro"] == pytest.approx(4 / 7)
    # threshold is inclusive
    assert f1_scores(np.array([[0.5]]), np.array([[1]]))["per_class"][0] == 1.0


def test_classification_errors():
    with pytest.raises(ValueError, match="shape"):
        average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0/1"):
        average_precision(np.zeros((2, 1)), np.array([[2], [0]]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([[np.nan]]), np.array([[1]]))
    with pytest.raises(ValueError, match="2 class names"):
        classification_scores(np.zeros((2, 3)), np.zeros((2, 3)), ["a", "b"])


def test_classification_scores_json():
    scores = np.array([[0.9, 0.1], [0.2, 0.3]], np.float32)
    targets = np.array([[1, 0], [0, 0]], np.float32)
    s = classification_scores(scores, targets, ("cat", "dog"))
    assert s["map"] == 1.0 and s["ap"] == {"cat": 1.0, "dog": None}
    assert s["f1"] == {"cat": 1.0, "dog": None}
    assert s["f1_macro"] == 1.0 and s["f1_micro"] == 1.0
    assert s["positives"] == {"cat": 1, "dog": 0}
    assert all(type(s[k]) is float for k in ("map", "f1_macro", "f1_micro"))
    json.dumps(s, allow_nan=False)
    none = classification_scores(np.zeros((0, 2)), np.zeros((0, 2)), ("cat", "dog"))
    assert none["map"] is None and none["f1_micro"] is None
    json.dumps(none, allow_nan=False)


# --------------------------------------------------------------------------- AP / F1, properties
@st.composite
def multilabel(draw):
    n = draw(st.integers(1, 25))
    k = draw(st.integers(1, 5))
    # few distinct score values so ties are common
    values = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]) | st.floats(0, 1, width=32)
    scores = draw(arrays(np.float64, (n, k), elements=values))
    targets = draw(arrays(np.int64, (n, k), elements=st.integers(0, 1)))
    return scores, targets


@SETTINGS
@given(multilabel())
def test_ap_equals_sklearn(case):
    scores, targets = case
    ap = average_precision(scores, targets)
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
            assert 0 < ap[c] <= 1
        else:
            assert math.isnan(ap[c])


@SETTINGS
@given(multilabel(), st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_f1_equals_sklearn(case, threshold):
    scores, targets = case
    pred = (scores >= threshold).astype(int)
    f = f1_scores(scores, targets, threshold)
    defined = [c for c in range(scores.shape[1]) if targets[:, c].any() or pred[:, c].any()]
    assume(defined)
    # per class: sklearn's binary F1 on each column
    ref = [f1_score(targets[:, c], pred[:, c], zero_division=0) for c in defined]
    np.testing.assert_allclose(f["per_class"][defined], ref)
    if scores.shape[1] >= 2:  # sklearn reads a single column as binary, not multilabel
        ref_macro = f1_score(targets, pred, labels=defined, average="macro", zero_division=0)
        ref_micro = f1_score(targets, pred, average="micro", zero_division=0)
    else:
        ref_macro = ref_micro = ref[0]
    assert f["macro"] == pytest.approx(ref_macro)
    assert f["micro"] == pytest.approx(ref_micro)


def test_mask_edges_inside_void_bands():
    from wsss_core.evaluate import mask_edges

    m = np.zeros((5, 8), np.uint8)
    m[:, 5:] = 3
    m[:, 3:5] = 255  # a void band between background and class 3, as VOC and MSRC outline objects
    edges = mask_edges(m)
    # void takes the nearest label: columns 0-3 background, 4-7 class 3 -> the edge is at column 3
    assert edges[:, 3].all() and edges.sum() == 5
    plain = np.zeros((3, 4), np.uint8)
    plain[1:, 2:] = 1
    # the left / upper pixel of every pair of different neighbours
    assert mask_edges(plain).tolist() == [[False, False, True, True], [False, True, False, False],
                                          [False, True, False, False]]
    assert not mask_edges(np.full((3, 3), 255, np.uint8)).any()
