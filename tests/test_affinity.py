"""Pixel-pair affinities (wsss_core.affinity): offsets, paths, path max, labels, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_core.affinity import (
    affinity_from_boundary,
    affinity_labels,
    affinity_loss,
    affinity_training_loss,
    downsize_labels,
    full_offsets,
    half_offsets,
    path_index,
    path_pixels,
)

X = 255


# --------------------------------------------------------------------------- an independent reference
def ref_path(dy: int, dx: int) -> set[tuple[int, int]]:
    """Bounding-box pixels at distance < 1 from the line through (0, 0) and (dy, dx), in floats."""
    norm = math.hypot(dy, dx)
    out = set()
    for y in range(-abs(dy), abs(dy) + 1):
        for x in range(-abs(dx), abs(dx) + 1):
            in_box = min(0, dy) <= y <= max(0, dy) and min(0, dx) <= x <= max(0, dx)
            if in_box and abs(dy * x - dx * y) / norm < 1.0:
                out.add((y, x))
    return out


def ref_affinity(boundary: np.ndarray, offsets) -> np.ndarray:
    """(D, H, W): 1 - max boundary on the path, 0 when the destination is outside."""
    h, w = boundary.shape
    out = np.zeros((len(offsets), h, w))
    for d, (dy, dx) in enumerate(offsets):
        path = ref_path(dy, dx)
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    out[d, y, x] = 1 - max(boundary[y + py, x + px] for py, px in path)
    return out


# --------------------------------------------------------------------------- offsets and paths
def test_half_offsets_radius_2_and_counts():
    assert half_offsets(2) == ((0, 1), (1, -1), (1, 0), (1, 1))
    for r, n in ((2, 4), (3, 12), (5, 34), (10, 152)):
        half = half_offsets(r)
        full = full_offsets(r)
        assert len(half) == n and len(full) == 2 * n
        assert len(set(full)) == len(full)
        assert all(0 < dy * dy + dx * dx < r * r for dy, dx in full)
        brute = {(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if 0 < dy * dy + dx * dx < r * r}
        assert set(full) == brute
        assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in half)


def test_path_pixels_hand_cases():
    assert set(path_pixels(0, 3)) == {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert set(path_pixels(2, 0)) == {(0, 0), (1, 0), (2, 0)}
    assert set(path_pixels(1, 1)) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # no leaking through a diagonal gap
    # (3, 4): |3x - 4y| < 5; (1, 3) and (2, 1) sit at distance exactly 1 and are left out
    assert set(path_pixels(3, 4)) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2),
                                      (2, 2), (2, 3), (2, 4), (3, 3), (3, 4)}
    for dy, dx in half_offsets(5):
        p = path_pixels(dy, dx)
        assert p[0] == (0, 0) and p[-1] == (dy, dx)
        assert set(p) == ref_path(dy, dx)
        assert set(path_pixels(-dy, -dx)) == {(-y, -x) for y, x in p}


def test_path_index_is_cached_and_consistent():
    pi = path_index(5)
    assert path_index(5) is pi
    assert pi.offsets == half_offsets(5)
    assert all(pi.paths[d] == path_pixels(*o) for d, o in enumerate(pi.offsets))
    seen = np.concatenate([ids for ids, _ in pi.groups])
    assert sorted(seen.tolist()) == list(range(len(pi.offsets)))


# --------------------------------------------------------------------------- affinities
def test_affinity_vertical_boundary_line_by_hand():
    b = torch.zeros(1, 1, 5, 6)
    b[..., :, 2] = 0.7
    a = affinity_from_boundary(b, 3)[0]
    d = {o: i for i, o in enumerate(half_offsets(3))}
    right, down, dr, dl, right2 = d[(0, 1)], d[(1, 0)], d[(1, 1)], d[(1, -1)], d[(0, 2)]
    assert torch.allclose(a[right, :, 0], torch.ones(5))  # cols 0 -> 1: no boundary
    assert torch.allclose(a[right, :, 1], torch.full((5,), 0.3))  # 1 -> 2 touches the line
    assert torch.allclose(a[right, :, 2], torch.full((5,), 0.3))  # 2 -> 3
    assert torch.allclose(a[right, :, 3], torch.ones(5))
    assert torch.all(a[right, :, 5] == 0)  # destination outside
    assert torch.allclose(a[down, :4, 2], torch.full((4,), 0.3))  # along the line
    assert torch.allclose(a[down, :4, 0], torch.ones(4))
    assert torch.all(a[down, 4, :] == 0)  # last row: destination outside
    assert a[dr, 0, 1].item() == pytest.approx(0.3)  # (0,1)->(1,2) ends on the line
    assert a[dr, 0, 3].item() == pytest.approx(1.0)
    assert a[dl, 0, 3].item() == pytest.approx(0.3)  # (0,3)->(1,2)
    assert a[dl, 0, 4].item() == pytest.approx(1.0)  # (0,4)->(1,3)
    assert a[right2, 1, 0].item() == pytest.approx(0.3)  # crosses the line
    assert a[right2, 1, 3].item() == pytest.approx(1.0)


def test_affinity_matches_reference_and_batches():
    rng = np.random.default_rng(0)
    b = rng.random((2, 1, 7, 9))
    a = affinity_from_boundary(torch.from_numpy(b), 5).numpy()  # no autograd: running max
    g = affinity_from_boundary(torch.from_numpy(b).requires_grad_(True), 5).detach().numpy()  # gather path
    for i in range(2):
        want = ref_affinity(b[i, 0], half_offsets(5))
        np.testing.assert_allclose(a[i], want, atol=1e-12)
        np.testing.assert_allclose(g[i], want, atol=1e-12)


def test_affinity_gradient_flows():
    rng = np.random.default_rng(1)
    b = torch.from_numpy(rng.random((1, 1, 4, 5))).requires_grad_(True)
    a = affinity_from_boundary(b, 3)
    a.sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and (b.grad < 0).any()
    torch.autograd.gradcheck(lambda t: affinity_from_boundary(t, 3), (b.detach().clone().requires_grad_(True),))


# --------------------------------------------------------------------------- labels
LABELS = np.array(
    [[0, 0, 1, 1, X],
     [0, 0, 1, 1, 1],
     [0, 2, 2, 1, 1],
     [0, 2, 2, 0, 0]], dtype=np.uint8)

# hand counts per offset of radius 2 (bg_pos, fg_pos, neg), pair by pair
HAND = {(0, 1): (3, 6, 6), (1, 0): (4, 6, 4), (1, 1): (1, 5, 6), (1, -1): (2, 3, 6)}


def test_affinity_labels_hand_counts():
    bg, fg, neg = affinity_labels(LABELS, 2)
    offs = half_offsets(2)
    assert bg.shape == fg.shape == neg.shape == (4, 4, 5) and bg.dtype == bool
    for d, o in enumerate(offs):
        assert (bg[d].sum(), fg[d].sum(), neg[d].sum()) == HAND[o], o
    assert (bg.sum(), fg.sum(), neg.sum()) == (10, 20, 22)
    assert not (bg & fg).any() and not (bg & neg).any() and not (fg & neg).any()
    right, down, dl = offs.index((0, 1)), offs.index((1, 0)), offs.index((1, -1))
    assert bg[right, 0, 0] and neg[right, 0, 1] and fg[right, 0, 2]
    assert not (bg[right, 0, 3] or fg[right, 0, 3] or neg[right, 0, 3])  # destination is 255
    assert not (bg[down, 0, 4] or fg[down, 0, 4] or neg[down, 0, 4])  # source is 255
    assert neg[down, 2, 3] and fg[down, 2, 1] and bg[down, 2, 0]
    assert neg[dl, 2, 1] and not neg[dl, 2, 0]  # (2,0)->(3,-1) is outside
    for m in (bg, fg, neg):
        assert not m[right, :, 4].any() and not m[down, 3].any() and not m[dl, :, 0].any()


def test_downsize_labels_sampling_and_size():
    lab = (np.arange(9)[:, None] * 10 + np.arange(10)[None, :]).astype(np.uint8)
    out = downsize_labels(lab)
    assert out.shape == (3, 3)  # ceil(9/4), ceil(10/4)
    np.testing.assert_array_equal(out, [[22, 26, 29], [62, 66, 69], [82, 86, 89]])
    np.testing.assert_array_equal(downsize_labels(lab[:8, :8]), [[22, 26], [62, 66]])


# --------------------------------------------------------------------------- loss
def test_affinity_loss_by_hand():
    aff = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.4], dtype=torch.float64).view(1, 1, 1, 5).requires_grad_(True)
    bg = np.array([1, 0, 0, 0, 0], bool).reshape(1, 1, 5)
    fg = np.array([0, 1, 0, 0, 0], bool).reshape(1, 1, 5)
    neg = np.array([0, 0, 1, 1, 0], bool).reshape(1, 1, 5)
    e = 1e-5
    want_bg = -math.log(0.9 + e) / (1 + e)
    want_fg = -math.log(0.5 + e) / (1 + e)
    want_neg = (-math.log(1 + e - 0.2) - math.log(1 + e - 0.7)) / (2 + e)
    want = ((want_bg + want_fg) / 2 + want_neg) / 2
    out = affinity_loss(aff, bg, fg, neg)
    assert out.total.item() == pytest.approx(want, rel=1e-12)
    assert out.bg_pos.item() == pytest.approx(want_bg, rel=1e-12)
    assert out.fg_pos.item() == pytest.approx(want_fg, rel=1e-12)
    assert out.neg.item() == pytest.approx(want_neg, rel=1e-12)
    assert out.pos.item() == pytest.approx((want_bg + want_fg) / 2, rel=1e-12)
    out.total.backward()
    assert aff.grad[0, 0, 0, 4] == 0 and aff.grad[0, 0, 0, 0] < 0 and aff.grad[0, 0, 0, 2] > 0
    # no fg pairs at all: that term is 0, not NaN
    empty = affinity_loss(aff.detach(), torch.from_numpy(bg), torch.zeros(1, 1, 5), torch.from_numpy(neg))
    assert empty.fg_pos.item() == 0.0
    assert empty.total.item() == pytest.approx((want_bg / 2 + want_neg) / 2, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_loss_is_float32_for_a_half_precision_boundary(dtype):
    """Under autocast (CUDA's float16) the boundary net returns half precision, where 1 + 1e-5 - a rounds to
    0 for a = 1 - 1e-4 and the neg term would be -log(0) = inf: the loss takes the logs in float32.
    One row of two cells, boundary 1e-4 in `dtype`, the one in-image pair (offset (0, 1)) a negative."""
    offsets = [tuple(int(v) for v in o) for o in half_offsets(2)]
    b = torch.full((1, 1, 1, 2), 1e-4, dtype=dtype)
    neg = torch.zeros(1, len(offsets), 1, 2, dtype=torch.bool)
    neg[0, offsets.index((0, 1)), 0, 0] = True
    none = torch.zeros_like(neg)
    loss = affinity_training_loss(2)(lambda x: x, (b, none, none, neg))
    a = 1.0 - b.float()[0, 0, 0, 0].item()  # the half-precision boundary, exactly, as float32 sees it
    e = 1e-5
    want = (-math.log(1 + e - a) / (1 + e)) / 2  # no positive pairs: total = (0 + neg) / 2
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want, rel=1e-4)
    assert math.isinf(affinity_loss(affinity_from_boundary(b, 2), none, none, neg).total.item())  # the fault
