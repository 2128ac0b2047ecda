"""Pixel-pair affinities on the stride-4 grid (IRNet's inter-pixel relations).

IRNet learns a class-boundary map B (stride 4, values in [0, 1]) from pairs
of nearby pixels: the affinity of pixels i and j is

    a_ij = 1 - max_{k on the segment i -> j} B_k,

high when no boundary separates them. Training labels come from the confident
CRF labels (same class -> positive, different classes -> negative); inference
(`wsss_core.random_walk`) turns the same affinities into a random walk.

Conventions used throughout (training and inference share them):

- Offsets within radius r: all (dy, dx) with 0 < dy^2 + dx^2 < r^2 (rows
  first, dy down, dx right). `half_offsets(r)` lists each unordered pair once
  (dy > 0, or dy == 0 and dx > 0) in a fixed order: the dy == 0 row with
  dx = 1 .. r-1, then dy = 1 .. r-1 with dx ascending. `full_offsets(r)` is
  the half set followed by its negation.
- Path of an offset (the pixels whose boundary values are maxed): every pixel
  (y, x), relative to the source, inside the bounding box of source and
  destination (min(0, dy) <= y <= max(0, dy), likewise x) whose centre lies at
  perpendicular distance < 1 from the line through the two centres, i.e.
  (dy * x - dx * y)^2 < dy^2 + dx^2 in integers. Both endpoints are included.
  Straight offsets give the plain segment; for the diagonal (1, 1) the path is
  the whole 2 x 2 block, so a boundary cannot be crossed through a diagonal
  gap. The path of -o is the negation of the path of o (same pixel set seen
  from the other end), hence a_ij == a_ji.
- Outside the image the boundary counts as 1.0 (IRNet pads with 1.0). Since
  the destination is on its own path, a pair whose destination lies outside
  the image has affinity exactly 0; `affinity_labels` marks such pairs as
  ignored in all three label maps, so they never enter the loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PathIndex",
    "half_offsets",
    "full_offsets",
    "path_pixels",
    "path_index",
    "path_max",
    "affinity_from_boundary",
    "downsize_labels",
    "affinity_labels",
    "AffinityLoss",
    "affinity_loss",
    "IGNORE",
]

IGNORE = 255  # unconfident label value
LOSS_EPS = 1e-5  # IRNet: -log(a + 1e-5), -log(1 + 1e-5 - a), sums / (count + 1e-5)
_CHUNK_VALUES = 1 << 25  # max values gathered at once by path_max (128 MB in float32)


# --------------------------------------------------------------------------- offsets and paths
def _check_radius(radius: int) -> int:
    r = int(radius)
    if r != radius or r < 2:
        raise ValueError(f"radius must be an integer >= 2 (offsets satisfy 0 < dy^2 + dx^2 < r^2), got {radius!r}")
    return r


def half_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Each unordered neighbour pair once: (0, dx > 0), then dy > 0 rows, dx ascending."""
    r = _check_radius(radius)
    out = [(0, dx) for dx in range(1, r)]
    out += [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dy * dy + dx * dx < r * r]
    return tuple(out)


def full_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """All neighbours within the radius: `half_offsets` then their negations."""
    half = half_offsets(radius)
    return half + tuple((-dy, -dx) for dy, dx in half)


def path_pixels(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """Pixels (relative to the source) whose boundary values limit a_(p, p + (dy, dx)).

    Bounding-box pixels at perpendicular distance < 1 from the line through
    both centres; ordered by distance from the source, source first,
    destination last.
    """
    if dy == 0 and dx == 0:
        return ((0, 0),)
    length_sq = dy * dy + dx * dx
    pix = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq
    ]
    pix.sort(key=lambda p: (p[0] * dy + p[1] * dx, p))  # projection on the direction
    return tuple(pix)


@dataclass(frozen=True)
class PathIndex:
    """Half-plane offsets and their paths for one radius (see `path_index`).

    offsets: (D,) (dy, dx) pairs, the order of the D axis of every affinity
    and label tensor. paths[d]: the pixels of offset d's path. groups: offsets
    grouped by path length for vectorised maxima, each (offset ids (D_L,),
    path steps (D_L, L, 2)).
    """

    radius: int
    offsets: tuple[tuple[int, int], ...]
    paths: tuple[tuple[tuple[int, int], ...], ...]
    groups: tuple[tuple[np.ndarray, np.ndarray], ...] = field(repr=False, compare=False)

    @property
    def reach(self) -> int:
        """Largest |dy| or |dx| of any offset (radius - 1): the padding the maps need."""
        return self.radius - 1


@functools.lru_cache(maxsize=None)
def path_index(radius: int) -> PathIndex:
    """The (cached) PathIndex of a radius, shared by boundary training and the random walk."""
    offsets = half_offsets(radius)
    paths = tuple(path_pixels(dy, dx) for dy, dx in offsets)
    by_len: dict[int, list[int]] = {}
    for d, p in enumerate(paths):
        by_len.setdefault(len(p), []).append(d)
    groups = []
    for length in sorted(by_len):
        ids = np.asarray(by_len[length], dtype=np.int64)
        steps = np.asarray([paths[d] for d in ids], dtype=np.int64).reshape(len(ids), length, 2)
        ids.setflags(write=False)
        steps.setflags(write=False)
        groups.append((ids, steps))
    return PathIndex(int(radius), offsets, paths, tuple(groups))


# --------------------------------------------------------------------------- affinities
def path_max(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """max of the boundary on the path of every half-plane offset: (B, 1, H, W) -> (B, D, H, W).

    Entry [b, d, y, x] is the max over the path from (y, x) to (y, x) + offsets[d],
    with 1.0 outside the image. With autograd: gathers each group of
    equal-length paths at once and takes max(dim), so the gradient goes to the
    (first) maximising pixel of each path and the backward pass keeps only
    indices; without autograd: a running max over shifted views (less memory).
    """
    if boundary.dim() != 4 or boundary.shape[1] != 1:
        raise ValueError(f"boundary must be (B, 1, H, W), got {tuple(boundary.shape)}")
    pi = path_index(radius)
    b, _, h, w = boundary.shape
    p = pi.reach
    padded = F.pad(boundary, (p, p, 0, p), value=1.0)  # half-plane: dy >= 0, |dx| <= p
    if not (torch.is_grad_enabled() and boundary.requires_grad):
        # no autograd: running max over shifted views, no index tensors at all
        out = boundary.new_empty((b, len(pi.offsets), h, w))
        for d, path in enumerate(pi.paths):
            m = out[:, d]
            torch.maximum(padded[:, 0, 0:h, p:p + w], padded[:, 0, path[1][0]:path[1][0] + h,
                                                               p + path[1][1]:p + path[1][1] + w], out=m)
            for py, px in path[2:]:
                torch.maximum(m, padded[:, 0, py:py + h, p + px:p + px + w], out=m)
        return out
    wp = w + 2 * p
    flat = padded.reshape(b, -1)
    dev = boundary.device
    base = (torch.arange(h, device=dev)[:, None] * wp + torch.arange(w, device=dev)[None, :] + p).reshape(-1)
    out = boundary.new_empty((b, len(pi.offsets), h, w))
    hw = h * w
    for ids, steps in pi.groups:
        length = steps.shape[1]
        shift = torch.as_tensor(steps[..., 0] * wp + steps[..., 1], device=dev)  # (D_L, L)
        per_offset = max(1, _CHUNK_VALUES // max(1, b * length * hw))
        for s in range(0, len(ids), per_offset):
            sh = shift[s:s + per_offset]
            idx = (sh[:, :, None] + base[None, None, :]).reshape(-1)
            vals = flat.index_select(1, idx).view(b, sh.shape[0], length, h, w)
            sel = torch.tensor(ids[s:s + per_offset], device=dev)
            out[:, sel] = vals.max(dim=2).values
    return out


def affinity_from_boundary(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """a = 1 - path max of the boundary, (B, 1, H, W) -> (B, D, H, W) for `half_offsets(radius)`.

    Pairs whose destination is outside the image get exactly 0 (the boundary
    is 1.0 outside). Works with autograd (boundary training backpropagates).
    """
    return 1.0 - path_max(boundary, radius)


# --------------------------------------------------------------------------- labels
def downsize_labels(label_map: np.ndarray, stride: int = 4) -> np.ndarray:
    """Nearest-neighbour downsizing of a label map (H, W) to (ceil(H/s), ceil(W/s)).

    Cell (y, x) covers input rows s*y .. s*y+s-1 and takes the label at
    (min(s*y + s//2, H-1), min(s*x + s//2, W-1)): the pixel just after the
    cell centre, as PIL's nearest rescale by 1/s (IRNet) picks when H, W are
    multiples of s; the last, partial cell is clamped to the image. The size
    matches the stride-4 CAMs (`wsss_core.cam_maps.stride4_size`).
    """
    lab = np.asarray(label_map)
    if lab.ndim != 2:
        raise ValueError(f"label_map must be (H, W), got {lab.shape}")
    s = int(stride)
    h, w = lab.shape
    ys = np.minimum(np.arange(0, h, s) + s // 2, h - 1)
    xs = np.minimum(np.arange(0, w, s) + s // 2, w - 1)
    return np.ascontiguousarray(lab[ys[:, None], xs[None, :]])


def affinity_labels(label_map: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affinity targets from a stride-4 label map (h, w) (0 = background, 255 = unconfident).

    Returns boolean (D, h, w) arrays aligned with `half_offsets(radius)`, for
    the pair (y, x) -> (y, x) + offsets[d]:
    bg_pos: both pixels background; fg_pos: both the same foreground class;
    neg: both known (not 255) and different. All three are False when either
    pixel is 255 or the destination lies outside the map.
    """
    lab = np.asarray(label_map)
    if lab.ndim != 2:
        raise ValueError(f"label_map must be (h, w), got {lab.shape}")
    pi = path_index(radius)
    h, w = lab.shape
    p = pi.reach
    padded = np.full((h + p, w + 2 * p), IGNORE, dtype=np.int16)
    padded[:h, p:p + w] = lab
    src = lab.astype(np.int16)
    dst = np.stack([padded[dy:dy + h, p + dx:p + dx + w] for dy, dx in pi.offsets])
    valid = (src != IGNORE)[None] & (dst != IGNORE)
    same = dst == src[None]
    pos = same & valid
    bg_pos = pos & (src == 0)[None]
    fg_pos = pos & (src != 0)[None]
    neg = valid & ~same
    return bg_pos, fg_pos, neg


# --------------------------------------------------------------------------- loss
class AffinityLoss(NamedTuple):
    """IRNet's affinity loss and its parts (0-d tensors; `total` is what to backpropagate)."""

    total: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    bg_pos: torch.Tensor
    fg_pos: torch.Tensor


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor | np.ndarray, fg_pos: torch.Tensor | np.ndarray,
                  neg: torch.Tensor | np.ndarray) -> AffinityLoss:
    """IRNet's loss on affinities aff (B, D, h, w) (labels (B, D, h, w) or (D, h, w), bool or 0/1).

    Each term is averaged over its own pairs, sum / (count + 1e-5):
    bg_pos and fg_pos of -log(a + 1e-5), neg of -log(1 + 1e-5 - a);
    pos = (bg_pos + fg_pos) / 2, total = (pos + neg) / 2.
    """

    def mean_over(term: torch.Tensor, mask) -> torch.Tensor:
        m = torch.as_tensor(mask, device=aff.device).to(aff.dtype)
        return (term * m).sum() / (m.sum() + LOSS_EPS)

    pos_term = -torch.log(aff + LOSS_EPS)
    neg_term = -torch.log(1.0 + LOSS_EPS - aff)
    bg = mean_over(pos_term, bg_pos)
    fg = mean_over(pos_term, fg_pos)
    ng = mean_over(neg_term, neg)
    pos = bg / 2 + fg / 2
    return AffinityLoss(total=(pos + ng) / 2, pos=pos, neg=ng, bg_pos=bg, fg_pos=fg)


class AffinityTargets:
    """Augmented label crop (H, W) tensor -> IRNet's affinity targets (bg_pos, fg_pos, neg) at stride 4."""

    def __init__(self, radius: int):
        self.radius = radius

    def __call__(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        small = downsize_labels(labels.numpy().astype(np.uint8), 4)
        return tuple(torch.from_numpy(a) for a in affinity_labels(small, self.radius))  # type: ignore[return-value]


def affinity_training_loss(radius: int):
    """Batch loss `(model, (x, bg_pos, fg_pos, neg, index))` of the boundary net."""

    def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, bg_pos, fg_pos, neg = batch[:4]
        boundary = model(x).float()  # the logs in float32: in float16 (amp) 1 + 1e-5 - a rounds to 0
        return affinity_loss(affinity_from_boundary(boundary, radius), bg_pos, fg_pos, neg).total

    return loss
