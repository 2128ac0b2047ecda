"""Random walk (wsss_core.random_walk) against a dense N x N reference, and pseudo masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_core.random_walk import pseudo_mask, random_walk, transition_matrix


# --------------------------------------------------------------------------- the dense reference (tests only)
def ref_segment(y0: int, x0: int, y1: int, x1: int) -> list[tuple[int, int]]:
    """Pixels of the bounding box of the two pixels within distance < 1 of the line through their centres."""
    dy, dx = y1 - y0, x1 - x0
    norm = math.hypot(dy, dx)
    return [(y, x)
            for y in range(min(y0, y1), max(y0, y1) + 1)
            for x in range(min(x0, x1), max(x0, x1) + 1)
            if abs(dy * (x - x0) - dx * (y - y0)) / norm < 1.0]


def dense_affinity(boundary: np.ndarray, radius: int) -> np.ndarray:
    """A (N, N): identity plus 1 - path max for every ordered pixel pair within the radius."""
    h, w = boundary.shape
    n = h * w
    a = np.eye(n)
    for i in range(n):
        yi, xi = divmod(i, w)
        for j in range(n):
            yj, xj = divmod(j, w)
            if i != j and (yi - yj) ** 2 + (xi - xj) ** 2 < radius ** 2:
                a[i, j] = 1.0 - max(boundary[y, x] for y, x in ref_segment(yi, xi, yj, xj))
    return a


def dense_transition(boundary: np.ndarray, radius: int, beta: float) -> np.ndarray:
    w = dense_affinity(boundary, radius) ** beta
    return w / w.sum(axis=0, keepdims=True)


def dense_random_walk(cams, boundary, radius=5, beta=10.0, exp_times=8) -> np.ndarray:
    cams = np.asarray(cams, np.float64)
    boundary = np.asarray(boundary, np.float64)
    k, h, w = cams.shape
    t = dense_transition(boundary, radius, beta)
    for _ in range(exp_times):
        t = t @ t
    x = cams.reshape(k, h * w) * (1.0 - boundary.reshape(1, h * w))
    return (x @ t).reshape(k, h, w)


def normalised(a: np.ndarray) -> np.ndarray:
    top = np.abs(a).max() if a.size else 0.0
    return a / top if top > 0 else a


def smooth_boundary(rng, h, w) -> np.ndarray:
    """Random boundary in [0, 1] with a few strong ridges and a weak background."""
    b = 0.3 * rng.random((h, w))
    b[:, rng.integers(1, w - 1)] = 0.95
    b[rng.integers(1, h - 1), : w // 2] = 0.9
    return b


# --------------------------------------------------------------------------- random walk == dense reference
CASES = [
    # (h, w, K, radius, beta, exp_times, boundary kind)
    (7, 9, 1, 5, 10.0, 8, "random"),
    (12, 10, 6, 5, 10.0, 8, "random"),
    (5, 13, 6, 5, 10.0, 8, "random"),
    (7, 9, 6, 5, 10.0, 2, "random"),
    (9, 6, 3, 3, 4.0, 1, "random"),
    (6, 7, 4, 5, 10.0, 0, "random"),
    (6, 7, 2, 5, 10.0, 8, "ones"),
    (8, 7, 6, 5, 10.0, 8, "zeros"),
    (8, 7, 6, 5, 10.0, 3, "zeros"),
    (3, 3, 2, 5, 10.0, 8, "random"),
]


@pytest.mark.parametrize("h,w,k,radius,beta,exp_times,kind", CASES)
def test_random_walk_equals_dense_reference(h, w, k, radius, beta, exp_times, kind):
    rng = np.random.default_rng(h * 100 + w * 10 + k + exp_times)
    cams = rng.random((k, h, w)) * (rng.random((k, h, w)) > 0.4)
    boundary = {"random": smooth_boundary(rng, h, w) if min(h, w) > 2 else rng.random((h, w)),
                "ones": np.ones((h, w)), "zeros": np.zeros((h, w))}[kind]
    want = normalised(dense_random_walk(cams, boundary, radius, beta, exp_times))
    got32 = random_walk(cams.astype(np.float32), boundary.astype(np.float32), radius, beta, exp_times)
    assert isinstance(got32, np.ndarray) and got32.shape == (k, h, w) and got32.dtype == np.float32
    assert np.abs(normalised(got32.astype(np.float64)) - want).max() <= 1e-4
    got64 = random_walk(torch.from_numpy(cams), torch.from_numpy(boundary), radius, beta, exp_times)
    assert isinstance(got64, torch.Tensor) and got64.dtype == torch.float64
    assert np.abs(normalised(got64.numpy()) - want).max() <= 1e-9
    if kind == "ones":
        assert np.all(want == 0) and np.all(got64.numpy() == 0)


@pytest.mark.parametrize("h,w", [(6, 8), (9, 3), (2, 7)])
def test_transition_matrix_equals_dense_columns(h, w):
    """M is T transposed: row j = column j of the column-normalised A ** beta (self-loop included)."""
    rng = np.random.default_rng(3)
    b = rng.random((h, w))
    m = transition_matrix(torch.from_numpy(b), radius=5, beta=10.0, dtype=torch.float64)
    crow, col = m.crow_indices().numpy(), m.col_indices().numpy()
    for r in range(h * w):  # CSR rows sorted, no duplicates, only in-image neighbours stored
        assert np.all(np.diff(col[crow[r]:crow[r + 1]]) > 0)
    t = dense_transition(b, 5, 10.0)
    assert crow[-1] == np.count_nonzero(dense_affinity(np.zeros((h, w)), 5))
    np.testing.assert_allclose(m.to_dense().numpy(), t.T, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(m.to_dense().numpy().sum(1), 1.0, rtol=1e-12)


def test_random_walk_no_classes_and_validation():
    out = random_walk(np.zeros((0, 4, 5), np.float32), np.zeros((4, 5), np.float32))
    assert out.shape == (0, 4, 5)
    with pytest.raises(ValueError):
        random_walk(np.zeros((2, 4, 5)), np.zeros((4, 6)))


def test_random_walk_keeps_regions_apart():
    """A closed wall keeps a class inside its box: scores outside stay (almost) zero."""
    h, w = 12, 12
    b = np.zeros((h, w))
    b[2, 2:9] = b[8, 2:9] = b[2:9, 2] = b[2:9, 8] = 1.0
    cams = np.zeros((1, h, w))
    cams[0, 4:7, 4:7] = 1.0
    rw = random_walk(cams, b)
    assert rw[0, 3:8, 3:8].min() > 0.1
    assert rw[0, :2].max() < 1e-6 and rw[0, 10:].max() < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_random_walk_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    cams = torch.from_numpy(rng.random((3, 9, 11)).astype(np.float32))
    b = torch.from_numpy(smooth_boundary(rng, 9, 11).astype(np.float32))
    cpu = random_walk(cams, b)
    gpu = random_walk(cams.cuda(), b.cuda())
    assert gpu.is_cuda
    assert (gpu.cpu() / gpu.max().cpu() - cpu / cpu.max()).abs().max() <= 1e-4


# --------------------------------------------------------------------------- pseudo masks
def test_pseudo_mask_bg_threshold_and_crop():
    # one class: 1.0 on map columns 0-2, 0.1 on 3-5; upsampled column o samples map column
    # c = (o + 0.5) / 4 - 0.5, value 1 - 0.9 (c - 2) between columns 2 and 3
    rw = np.zeros((1, 4, 6), np.float32)
    rw[0, :, :3] = 1.0
    rw[0, :, 3:] = 0.1
    m = pseudo_mask(rw, [7], (15, 21), bg_threshold=0.25)  # 16 x 24 cropped to 15 x 21
    assert m.shape == (15, 21) and m.dtype == np.uint8
    assert np.all(m[:, :13] == 7) and np.all(m[:, 13:] == 0)  # 1 - 0.9 (c - 2) > 0.25 <=> o <= 12
    m = pseudo_mask(rw * 3, [7], (15, 21), bg_threshold=0.5)  # global max divided out
    assert np.all(m[:, :12] == 7) and np.all(m[:, 12:] == 0)  # > 0.5 <=> o <= 11


def test_pseudo_mask_class_ids_and_global_max():
    rw = np.zeros((3, 4, 5), np.float32)
    rw[0, :2] = 2.0  # top half: class 5
    rw[1, 2:, :2] = 1.0  # bottom left: class 12 (0.5 after dividing by the global max 2)
    rw[2, 2:, 3:] = 0.4  # bottom right: 0.2 after the global max, under the 0.25 background
    m = pseudo_mask(torch.from_numpy(rw), np.array([5, 12, 200]), (13, 17))
    assert m.shape == (13, 17)
    assert np.all(m[:6] == 5)
    assert np.all(m[10:, :6] == 12)
    assert np.all(m[10:, 14:] == 0)
    assert set(np.unique(m)) <= {0, 5, 12}


def test_pseudo_mask_degenerate_inputs():
    assert np.all(pseudo_mask(np.zeros((0, 3, 4)), [], (10, 13)) == 0)
    assert pseudo_mask(np.zeros((0, 3, 4)), [], (10, 13)).shape == (10, 13)
    assert np.all(pseudo_mask(np.zeros((2, 3, 4)), [1, 2], (12, 16)) == 0)  # zero max: background
    with pytest.raises(ValueError):
        pseudo_mask(np.zeros((2, 3, 4)), [1], (12, 16))
    with pytest.raises(ValueError):
        pseudo_mask(np.zeros((1, 3, 4)), [1], (13, 16))


def test_cams_with_background_is_one_minus_the_top_cam_to_the_power():
    from wsss_core.random_walk import cams_with_background

    cams = np.array([[[0.2, 0.9, 0.0]], [[0.5, 0.0, 0.0]]], np.float32)  # 2 classes on a 1 x 3 grid
    x = cams_with_background(cams, 2.0)
    assert x.shape == (3, 1, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], [[0.25, 0.01, 1.0]], rtol=1e-6)  # (1 - 0.5)^2, (1 - 0.9)^2, (1 - 0)^2
    np.testing.assert_array_equal(x[1:], cams)
    np.testing.assert_allclose(cams_with_background(cams, 4.0)[0], [[0.0625, 1e-4, 1.0]], rtol=1e-5)
    np.testing.assert_array_equal(cams_with_background(np.zeros((0, 2, 2)), 4.0), np.ones((1, 2, 2)))


def test_pseudo_mask_with_a_walked_background():
    """bg_threshold None: channel 0 is the background's own walked score, compared as it is (no global max,
    no constant): the same class score is foreground beside a weak background, background beside a strong one."""
    rw = np.zeros((2, 2, 2), np.float32)
    rw[1] = 0.3  # class 7 everywhere
    rw[0, 0] = 0.2  # top row: background below the class
    rw[0, 1] = 0.4  # bottom row: above it
    m = pseudo_mask(rw, [7], (8, 8), None)
    assert np.all(m[:2] == 7) and np.all(m[-2:] == 0)  # rows 0-1 and 6-7 sample one map row only
    # IRNet's rule on the class channel alone: 0.3 / 0.3 = 1 beats any threshold < 1 everywhere
    assert np.all(pseudo_mask(rw[1:], [7], (8, 8), 0.5) == 7)
    np.testing.assert_array_equal(pseudo_mask(rw * 10, [7], (8, 8), None), m)  # a common scale changes nothing
    with pytest.raises(ValueError, match="1 \\+ K = 2"):
        pseudo_mask(rw[1:], [7], (8, 8), None)  # no background channel


def test_agreed_labels_ignore_where_another_labelling_disagrees():
    from wsss_core.random_walk import agreed_labels

    mask = np.array([[1, 1, 0, 0], [2, 2, 0, 255]], np.uint8)
    walk = np.array([[1, 0, 0, 0], [2, 2, 0, 0]], np.uint8)          # (0,1) disagrees
    confident = np.array([[255, 1, 2, 255], [2, 255, 0, 1]], np.uint8)  # (0,2) disagrees; 255 says nothing
    out = agreed_labels(mask, walk, confident)
    assert out.tolist() == [[1, 255, 255, 0], [2, 2, 0, 255]]
    assert mask.tolist() == [[1, 1, 0, 0], [2, 2, 0, 255]]  # the input is not changed
    assert agreed_labels(mask).tolist() == mask.tolist()
    with pytest.raises(ValueError, match=r"label maps differ in size: \(2, 3\) against \(2, 4\)"):
        agreed_labels(mask, walk[:, :3])
