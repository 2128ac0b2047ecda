"""The intervals of `wsss compare`: images and training seeds resampled (wsss_core.bootstrap), checked
against direct implementations that fill a confusion matrix pixel by pixel with the drawn images."""

import statistics

import numpy as np
import pytest

from wsss_core.bootstrap import (bootstrap_weights, interval, paired_difference, replicate_row, resampled_miou,
                                 seed_draws)
from wsss_core.compare import Comparison, compare_scores, comparison_table
from wsss_core.metrics import ConfusionMatrix, ImageScores

CLASSES = ["bg", "a", "b", "c", "rare"]


def _images(rng, n: int, quality: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred, gt) pairs of 6 x 7 pixels over classes 0-3, the prediction right with probability `quality`;
    class 4 ("rare") only in the ground truth of image 0, and predicted only there."""
    out = []
    for i in range(n):
        gt = rng.integers(0, 4, (6, 7))
        pred = np.where(rng.random((6, 7)) < quality, gt, rng.integers(0, 4, (6, 7)))
        if i == 0:
            gt[:2, :3] = 4
            pred[:2, :2] = 4
        out.append((pred, gt))
    return out


def _scores(images, ids=None) -> ImageScores:
    s = ImageScores("masks", "val", CLASSES)
    for i, (pred, gt) in zip(ids if ids is not None else range(len(images)), images):
        s.add(f"i{i}", pred, gt)
    return s


def _direct_miou(images, weights_row) -> float:
    """mIoU of one resample: a confusion matrix filled with each drawn image as often as it was drawn."""
    cm = ConfusionMatrix(len(CLASSES))
    for i, times in enumerate(weights_row):
        for _ in range(times):
            cm.update(*images[i])
    return cm.miou()


# --------------------------------------------------------------------------- the draws
def test_resampling_draws_every_image_equally_often():
    """Each image's count over the resamples is Binomial(n, 1/n): its mean is 1, the last image included
    (a draw from integers(0, n - 1) never picks it)."""
    w = bootstrap_weights(5, 20000, seed=4)
    assert (w.sum(1) == 5).all()
    np.testing.assert_allclose(w.mean(0), np.ones(5), atol=0.05)
    assert (bootstrap_weights(1, 10, seed=0) == 1).all()  # one image: drawn every time
    two = bootstrap_weights(2, 1000, seed=0)
    assert 0.45 < (two[:, 1] == 2).mean() + 0.5 * (two[:, 1] == 1).mean() < 0.55


def test_seed_draws_pick_every_seed_and_one_seed_is_the_identity():
    d = seed_draws(3, 9000, seed=[0, 1])
    assert d.shape == (9000, 3)
    np.testing.assert_allclose(np.bincount(d.ravel(), minlength=3) / d.size, [1 / 3] * 3, atol=0.01)
    assert (seed_draws(1, 50, seed=7) == 0).all()


def test_the_interval_is_the_central_95_percent():
    """On 0, 0.001, ..., 1 the 2.5th and 97.5th percentiles are exactly 0.025 and 0.975."""
    i = interval(0.5, np.arange(1001) / 1000)
    assert (i.low, i.high) == pytest.approx((0.025, 0.975), abs=1e-12)
    assert i.images_only and i.sd is None and not interval(0.1, np.array([0.05, 0.2])).holds_zero


# --------------------------------------------------------------------------- images only
def test_a_resample_scores_the_images_it_drew():
    """Each resample's mIoU equals a confusion matrix filled with the drawn images, repeats counted; the
    rare class, in one image only, counts only in the resamples that drew that image."""
    images = _images(np.random.default_rng(1), 12, 0.6)
    s = _scores(images)
    w = bootstrap_weights(12, 60, seed=3)
    assert (w[:, 0] == 0).any() and (w[:, 0] > 0).any()  # the rare class is in some resamples and not others
    got = resampled_miou(s, w, np.arange(12))
    np.testing.assert_allclose(got, [_direct_miou(images, row) for row in w], rtol=0, atol=1e-12)


def test_a_subset_in_another_order_is_looked_up_by_position():
    images = _images(np.random.default_rng(2), 8, 0.6)
    s = _scores(images)
    order = np.array([5, 2, 7, 0])
    w = bootstrap_weights(4, 40, seed=1)
    want = [_direct_miou([images[k] for k in order], row) for row in w]
    np.testing.assert_allclose(resampled_miou(s, w, order), want, rtol=0, atol=1e-12)


def test_paired_intervals_see_a_small_real_difference():
    """Run b is run a with one class made better on every image: its paired interval excludes 0,
    while the unpaired intervals of the two runs overlap."""
    rng = np.random.default_rng(5)
    a, b = ImageScores("x", "val", ["bg", "a"]), ImageScores("x", "val", ["bg", "a"])
    for i in range(40):
        gt = (rng.random((10, 10)) < rng.uniform(0.1, 0.9)).astype(np.int64)
        pa = np.where(rng.random((10, 10)) < 0.7, gt, 1 - gt)
        pb = pa.copy()
        fix = np.argwhere((gt == 1) & (pa == 0))[:2]
        pb[tuple(fix.T)] = 1
        a.add(f"{i}", pa, gt)
        b.add(f"{i}", pb, gt)
    w = bootstrap_weights(40, 1000, 0)
    ra, rb = (replicate_row([x], [np.arange(40)], w, 0) for x in (a, b))
    paired = paired_difference(rb, ra)
    assert paired.value == pytest.approx(b.miou() - a.miou(), abs=1e-12) and paired.low > 0
    ia, ib = ra.estimate, rb.estimate
    assert ib.low < ia.high  # alone, the two intervals overlap


# --------------------------------------------------------------------------- seeds, then images
def test_the_two_level_bootstrap_equals_a_direct_implementation():
    """Three seeds of different quality: each resample draws three seeds with replacement and the images
    (the same images for every seed), and averages the drawn seeds' mIoU, each from a confusion matrix."""
    rng = np.random.default_rng(3)
    truth = [rng.integers(0, 4, (6, 7)) for _ in range(10)]
    truth[0][:2, :3] = 4  # the rare class: in one image's ground truth, predicted by none of the seeds
    per_seed = []
    for q in (0.4, 0.6, 0.8):
        per_seed.append([(np.where(rng.random(g.shape) < q, g, rng.integers(0, 4, g.shape)), g) for g in truth])
    scores = [_scores(imgs) for imgs in per_seed]
    w = bootstrap_weights(10, 150, seed=2)
    row = replicate_row(scores, [np.arange(10)] * 3, w, draw_seed=[0, 5])
    draws = seed_draws(3, 150, [0, 5])
    want = [np.mean([_direct_miou(per_seed[s], w[r]) for s in draws[r]]) for r in range(150)]
    np.testing.assert_allclose(row.samples, want, rtol=0, atol=1e-12)
    values = [_direct_miou(imgs, np.ones(10, np.int64)) for imgs in per_seed]
    np.testing.assert_allclose(row.values, values, rtol=0, atol=1e-12)
    est = row.estimate
    assert est.value == pytest.approx(np.mean(values), abs=1e-12)
    assert est.sd == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert est.seeds == pytest.approx(tuple(values)) and not est.images_only


def test_when_seed_noise_dominates_the_interval_spans_the_seeds():
    """Every image of a seed is the same picture: resampling images changes nothing, and the interval of
    the mean of three drawn seeds runs exactly from the worst seed to the best (each all three times with
    probability 1/27, above the 2.5 % tail)."""
    rng = np.random.default_rng(7)
    gt = rng.integers(0, 4, (6, 7))
    scores, values = [], []
    for q in (0.3, 0.55, 0.9):
        pred = np.where(rng.random(gt.shape) < q, gt, (gt + 1) % 4)
        scores.append(_scores([(pred, gt)] * 15))
        values.append(_direct_miou([(pred, gt)], [1]))
    row = replicate_row(scores, [np.arange(15)] * 3, bootstrap_weights(15, 5000, 0), [0, 0])
    est = row.estimate
    assert (est.low, est.high) == pytest.approx((min(values), max(values)), abs=1e-12)
    assert est.sd == pytest.approx(statistics.stdev(values), abs=1e-12)


def test_when_image_noise_dominates_the_seeds_add_nothing():
    """Three identical seeds: the two-level interval is the images-only interval, to the last digit, and
    the spread over seeds is 0."""
    images = _images(np.random.default_rng(11), 20, 0.6)
    s = _scores(images)
    w = bootstrap_weights(20, 1000, 9)
    three = replicate_row([s, s, s], [np.arange(20)] * 3, w, [9, 0]).estimate
    one = replicate_row([s], [np.arange(20)], w, [9, 0]).estimate
    assert (three.value, three.low, three.high) == (one.value, one.low, one.high)
    assert three.sd == 0.0 and one.images_only and one.sd is None and not three.images_only
    assert one.low < one.value < one.high  # the images alone do move it


# --------------------------------------------------------------------------- rows of a comparison
def test_runs_that_list_their_images_in_another_order_are_paired_by_id():
    """The same masks scored in reversed image order: every resample's difference is exactly 0."""
    images = _images(np.random.default_rng(4), 9, 0.6)
    a = _scores(images)
    b = _scores(images[::-1], ids=range(8, -1, -1))
    other = _images(np.random.default_rng(5), 9, 0.6)
    c = _scores(other)
    miou, delta, class_delta = compare_scores({"a": a, "b": b, "c": c}, {"a": ["a"], "b": ["b"], "c": ["c"]},
                                              "a", resamples=300)
    assert (delta["b"].value, delta["b"].low, delta["b"].high) == (0.0, 0.0, 0.0)
    assert all(v in (None, 0.0) for v in class_delta["b"].values())
    assert miou["b"].value == miou["a"].value == pytest.approx(_direct_miou(images, [1] * 9), abs=1e-12)
    assert delta["c"].value == pytest.approx(_direct_miou(other, [1] * 9) - _direct_miou(images, [1] * 9))


def test_a_row_of_seeds_pools_its_runs_and_the_table_says_so():
    rng = np.random.default_rng(6)
    base = _scores(_images(rng, 10, 0.5))
    seeds = [_scores(_images(np.random.default_rng(k), 10, 0.7)) for k in (20, 21, 22)]
    members = {"base": ["base"], "x": ["x", "x,seed=1", "x,seed=2"]}
    scores = {"base": base, "x": seeds[0], "x,seed=1": seeds[1], "x,seed=2": seeds[2]}
    miou, delta, _ = compare_scores(scores, members, "base", resamples=200)
    assert miou["x"].value == pytest.approx(np.mean([s.miou() for s in seeds]), abs=1e-12)
    assert miou["x"].sd == pytest.approx(statistics.stdev([s.miou() for s in seeds]), abs=1e-12)
    assert miou["base"].images_only and not miou["x"].images_only
    assert delta["x"].value == pytest.approx(miou["x"].value - base.miou(), abs=1e-12)
    c = Comparison(["base", "x"], "base", {}, ["e"], {"e": "masks (val)"}, members=members,
                   seeds={"base": {"base": "seed 0"}, "x": {n: f"seed {k}" for k, n in enumerate(members["x"])}},
                   miou={"e": miou}, delta={"e": delta}, resamples=200)
    text = comparison_table(c)
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("    ")}
    m = miou["x"]
    assert f"3 seeds {100 * m.value:5.1f} ± {100 * m.sd:3.1f} [{100 * m.low:5.1f}, {100 * m.high:5.1f}]" \
        in lines["x"]
    assert lines["base"].rstrip().endswith("*") and "1 seed " in lines["base"]
    assert "x: 3 seed(s): x (seed 0); x,seed=1 (seed 1); x,seed=2 (seed 2)" in text
