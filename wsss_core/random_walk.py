"""IRNet's semantic propagation by random walk, without the dense N x N matrix.

On the stride-4 grid (N = h * w pixels), with affinities a_ij = a_ji = 1 - max
boundary on the segment i -> j (`wsss_core.affinity`, same paths and padding
as training) for every pair within `radius`, and a self-loop a_ii = 1:

    W = A ** beta,   T[i, j] = W[i, j] / sum_i W[i, j]   (column-normalised),
    rw = x @ T ** (2 ** exp_times),   x = cam * (1 - boundary)

IRNet squares the dense T exp_times times (0.55 GB and ~2.6e13 FLOP for a
500 x 375 image). Here T is a sparse matrix with at most 1 + (number of
offsets) entries per row, and x is multiplied by it 2 ** exp_times times, all
K classes at once: the same product, in a few MB. Since W is symmetric,
x @ T = (M @ x^T)^T with M = W row-normalised, which is stored as a CSR
matrix (`torch.sparse_csr_tensor`; on this 2-core CPU the CSR product beat a
shifted-view stencil sum, 0.20 s against 0.32 s for 125 x 94 x 21 classes).
Neighbours outside the image do not exist (IRNet pads the boundary with 1.0,
which gives them affinity 0): they are not stored in the matrix.

`pseudo_mask` turns the walk's scores into IRNet's semantic pseudo label, with
IRNet's constant background score or, from `cams_with_background`, a background
channel walked with the classes (AffinityNet's rule).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .affinity import affinity_from_boundary, full_offsets

__all__ = ["transition_matrix", "random_walk", "background_score", "cams_with_background", "pseudo_mask"]


def _to_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def transition_matrix(boundary: torch.Tensor, radius: int = 5, beta: float = 10.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sparse CSR M (N, N) = row-normalised A ** beta (= T transposed) for a boundary map (h, w).

    Row p holds p itself (weight 1) and every neighbour q = p + o inside the
    image for o in `full_offsets(radius)`, weight a_pq ** beta, divided by the
    row sum. Values below the smallest normal float of `dtype` are set to 0
    (no denormals; this cannot change the result measurably).
    The boundary is expected in [0, 1] (negative affinities are clamped to 0).
    """
    if boundary.dim() != 2:
        raise ValueError(f"boundary must be (h, w), got {tuple(boundary.shape)}")
    h, w = boundary.shape
    n = h * w
    dev = boundary.device
    with torch.no_grad():
        half = affinity_from_boundary(boundary.to(dtype)[None, None], radius)[0]  # (D, h, w)
        weight_half = half.clamp_min(0).pow(beta).reshape(len(half), n)
        offsets = [(0, 0)] + list(full_offsets(radius))
        d_half = len(half)
        # in one row the column p + dy*w + dx grows with dy*w + dx (ties only between offsets of
        # which at most one lands inside the image), so this slot order keeps each row sorted
        order = sorted(range(len(offsets)), key=lambda s: offsets[s][0] * w + offsets[s][1])
        ys = torch.arange(h, device=dev, dtype=torch.int32).repeat_interleave(w)
        xs = torch.arange(w, device=dev, dtype=torch.int32).repeat(h)

        pix = torch.arange(n, device=dev, dtype=torch.int64)

        def slot(s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Offset s for every pixel p: neighbour inside?, its index q, weight W[p, q]."""
            dy, dx = offsets[s]
            ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            q = pix + (dy * w + dx)
            if s == 0:  # self-loop
                v = torch.ones(n, dtype=dtype, device=dev)
            elif s <= d_half:  # forward pair p -> p + o: stored at p
                v = weight_half[s - 1]
            else:  # backward pair p -> p - o: the pair (p - o) -> p, stored at q = p - o
                v = weight_half[s - 1 - d_half].gather(0, q.clamp(0, n - 1))
            return ok, q, v * ok

        # two passes over the slots (row sizes and sums, then the entries) so that the CSR
        # arrays are the only N x S-sized memory; row p lists its in-image neighbours in `order`
        counts = torch.zeros(n, dtype=torch.int64, device=dev)
        row_sum = torch.zeros(n, dtype=dtype, device=dev)  # includes the self-loop, so >= 1
        for s in order:
            ok, _, v = slot(s)
            counts += ok
            row_sum += v
        crow = F.pad(counts.cumsum(0), (1, 0))
        nnz = int(crow[-1])
        index_dtype = torch.int32 if n + radius * (w + 1) < 2 ** 31 and nnz < 2 ** 31 else torch.int64
        col = torch.empty(nnz, dtype=index_dtype, device=dev)
        val = torch.empty(nnz, dtype=dtype, device=dev)
        pos = crow[:-1].clone()  # next free entry of each row
        tiny = torch.finfo(dtype).tiny
        for s in order:
            ok, q, v = slot(s)
            v = v / row_sum
            v[v < tiny] = 0  # flush would-be denormals (kept as explicit zeros)
            at = pos[ok]
            col[at] = q[ok].to(index_dtype)
            val[at] = v[ok]
            pos += ok
        del pos, counts, row_sum
        with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul is all we use
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
            return torch.sparse_csr_tensor(crow.to(index_dtype), col, val, size=(n, n), check_invariants=False)


def random_walk(cams: torch.Tensor | np.ndarray, boundary: torch.Tensor | np.ndarray, radius: int = 5,
                beta: float = 10.0, exp_times: int = 8) -> torch.Tensor | np.ndarray:
    """rw = (cams * (1 - boundary)) @ T ** (2 ** exp_times): (K, h, w) scores propagated within regions.

    cams (K, h, w) and boundary (h, w) on the stride-4 grid; numpy in -> numpy
    out, tensors in -> tensors out (on their device, e.g. CUDA). Computes in
    float64 when cams are float64, else float32.
    """
    is_np = not isinstance(cams, torch.Tensor)
    x = _to_tensor(cams)
    b = _to_tensor(boundary).to(x.device)
    if x.dim() != 3 or b.shape != x.shape[1:]:
        raise ValueError(f"cams must be (K, h, w) and boundary (h, w), got {tuple(x.shape)} and {tuple(b.shape)}")
    if exp_times < 0:
        raise ValueError(f"exp_times must be >= 0, got {exp_times}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    k, h, w = x.shape
    with torch.no_grad():
        b = b.to(dtype)
        if k == 0:
            out = x.to(dtype).clone()
        else:
            m = transition_matrix(b, radius, beta, dtype)
            y = (x.to(dtype) * (1 - b)).reshape(k, h * w).t().contiguous()  # (N, K)
            for _ in range(2 ** exp_times):
                y = m @ y
            out = y.t().reshape(k, h, w).contiguous()
    return out.cpu().numpy() if is_np else out


def background_score(cams: np.ndarray, power: float) -> np.ndarray:
    """AffinityNet's background score (h, w) = (1 - max over classes of the CAMs (K, h, w),
    expected in [0, 1]) ** power; 1 everywhere without classes. float64 in: float64 out,
    else float32 (float16 would underflow at high powers)."""
    cams = np.asarray(cams)
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, h, w), got {cams.shape}")
    cams = cams.astype(np.float64 if cams.dtype == np.float64 else np.float32, copy=False)
    top = cams.max(0) if len(cams) else np.zeros(cams.shape[1:], cams.dtype)
    return np.clip(1 - top, 0, 1) ** cams.dtype.type(power)


def cams_with_background(cams: np.ndarray, power: float) -> np.ndarray:
    """(1 + K, h, w): `background_score` first, then the K CAMs as given. Walked with the
    classes, the background spreads inside its own regions as they do, so each image gets
    its own background level where IRNet's constant threshold sets one for all (a higher
    power: less background)."""
    background = background_score(cams, power)
    return np.concatenate([background[None], np.asarray(cams, background.dtype)])


def pseudo_mask(rw: torch.Tensor | np.ndarray, keys: Sequence[int] | np.ndarray | torch.Tensor,
                image_size: tuple[int, int], bg_threshold: float | None = 0.25) -> np.ndarray:
    """IRNet's semantic pseudo label (H, W) uint8 from random-walk scores rw (K, h, w).

    Upsampled x4 (bilinear, align_corners=False), cropped to (H, W), divided by
    its global max (skipped when the max is <= 0), a background channel of
    value bg_threshold put first, argmax (ties go to the earlier channel, so
    to background), channel c -> keys[c - 1] (1-based class ids), 0 = background.
    bg_threshold None: rw is (1 + K, h, w) with a walked background first
    (`cams_with_background`), and the argmax is taken over it as it is.
    """
    height, width = int(image_size[0]), int(image_size[1])
    ids = np.asarray(keys.cpu() if isinstance(keys, torch.Tensor) else keys, dtype=np.int64).reshape(-1)
    x = _to_tensor(rw)
    walked = bg_threshold is None
    if x.dim() != 3 or x.shape[0] != len(ids) + walked:
        want = f"(1 + K, h, w) with 1 + K = {len(ids) + 1} (a walked background, then the classes)" if walked \
            else f"(K, h, w) with K = len(keys) = {len(ids)}"
        raise ValueError(f"rw must be {want}, got {tuple(x.shape)}")
    if np.any((ids < 1) | (ids > 255)):
        raise ValueError(f"keys must be 1-based class ids in 1..255, got {ids.tolist()}")
    if height > 4 * x.shape[1] or width > 4 * x.shape[2]:
        raise ValueError(f"image_size {(height, width)} is larger than 4 x the map size {tuple(x.shape[1:])}")
    if len(ids) == 0:
        return np.zeros((height, width), np.uint8)
    with torch.no_grad():
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        up = F.interpolate(x[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
        up = up[:, :height, :width]
        if walked:
            scores = up
        else:
            top = up.max()
            if top > 0:
                up = up / top
            scores = torch.cat([torch.full_like(up[:1], float(bg_threshold)), up])
        idx = scores.argmax(0).cpu().numpy()
    lut = np.concatenate([[0], ids]).astype(np.uint8)
    return lut[idx]


def agreed_labels(mask: np.ndarray, *others: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """`mask` with `ignore_index` wherever another labelling of the same image
    disagrees with it (a pixel `ignore_index` in another says nothing there):
    the pixels the walk, its CRF and the confident labels agree on, for training
    a segmenter that should not fit the least certain borders (#19 item 4)."""
    out = np.array(mask, dtype=np.uint8, copy=True)
    for other in others:
        if other.shape != out.shape:
            raise ValueError(f"label maps differ in size: {other.shape} against {out.shape}")
        out[(other != ignore_index) & (other != mask)] = ignore_index
    return out
