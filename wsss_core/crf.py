"""Dense CRF (pydensecrf) and the IRNet / NoPeopleAllowed confident labels.

Step 2b of the method: CAMs are turned into two label maps, one with a high
background threshold (`conf_fg_thres`, only strong foreground survives) and
one with a low one (`conf_bg_thres`, only clear background survives), each
refined by a dense CRF. Pixels that are background in the first map but
foreground in the second are unconfident (255) and are ignored when IRNet's
affinity labels are built.

Only numpy and pydensecrf are used here (no torch), so the worker processes of
`crf_many` start quickly.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from .config import CrfConfig

UNCONFIDENT = 255

__all__ = [
    "UNCONFIDENT",
    "dense_crf",
    "dense_crf_labels",
    "cam_label_indices",
    "confident_labels",
    "confident_label_parts",
    "confident_labels_many",
    "crf_many",
    "refined_mask",
    "refined_prediction",
    "with_label_trust",
    "confident_label_scores",
]


# --------------------------------------------------------------------------- checks
def _check_image(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8, returned C-contiguous (pydensecrf rejects strided views)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _check_gt_prob(cfg: CrfConfig) -> None:
    if not 0.0 < cfg.gt_prob < 1.0:
        raise ValueError(f"crf.gt_prob must be strictly between 0 and 1 for a label unary, got {cfg.gt_prob}")


# --------------------------------------------------------------------------- CRF
def _inference(image: np.ndarray, unary: np.ndarray, n_labels: int, cfg: CrfConfig) -> np.ndarray:
    """Run mean-field inference; `unary` is (n_labels, H*W) energies. Returns (n, H, W) float32."""
    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=float(cfg.gauss_sxy), compat=float(cfg.gauss_compat))
    crf.addPairwiseBilateral(
        sxy=float(cfg.bilateral_sxy),
        srgb=float(cfg.bilateral_srgb),
        rgbim=np.require(image, np.uint8, ["C", "W"]),  # pydensecrf needs a writable buffer (np.asarray(PIL) is not)
        compat=float(cfg.bilateral_compat),
    )
    q = crf.inference(int(cfg.iterations))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Refine class probabilities (n, H, W) with a dense CRF; returns (n, H, W) float32.

    The unary is -log(probs) (clipped at 1e-5); `probs` should sum to 1 over axis 0.
    """
    image = _check_image(image)
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (n, H, W) with H, W of the image {image.shape[:2]}, got {probs.shape}")
    if probs.shape[0] < 1:
        raise ValueError("probs must have at least one class plane")
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    return _inference(image, unary_from_softmax(probs), probs.shape[0], cfg)


def dense_crf_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, cfg: CrfConfig) -> np.ndarray:
    """Refine a label-index map (values 0..n_labels-1) with a dense CRF; returns HxW int64.

    Unary from the labels: the given label has probability `cfg.gt_prob`, the
    rest share 1 - gt_prob (no label is treated as "unsure"). The argmax of the
    CRF marginals is returned. With a single label there is nothing to decide.
    """
    image = _check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match image height x width {image.shape[:2]}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_labels:
        raise ValueError(f"labels must be in 0..{n_labels - 1}, found values in {lo}..{hi}")
    if n_labels == 1:
        return np.zeros(labels.shape, np.int64)
    _check_gt_prob(cfg)
    unary = unary_from_labels(labels.astype(np.intp), n_labels, gt_prob=float(cfg.gt_prob), zero_unsure=False)
    q = _inference(image, unary, n_labels, cfg)
    return q.argmax(axis=0).astype(np.int64)


# --------------------------------------------------------------------------- confident labels
def cam_label_indices(cams: np.ndarray, threshold: float) -> np.ndarray:
    """Argmax over [background plane = threshold, cams...]: 0 = background, i = cams[i-1].

    Padding semantics: the background plane is a constant equal to `threshold`,
    so a pixel is foreground only where some CAM is strictly above it (ties go
    to background, the first plane, as np.argmax returns the first maximum).
    """
    k, h, w = cams.shape
    stack = np.concatenate([np.full((1, h, w), threshold, np.float32), cams.astype(np.float32, copy=False)])
    return stack.argmax(axis=0)


def _check_keys(keys: np.ndarray) -> np.ndarray:
    """An image's class ids: 1-D, integer, distinct, in 1..254 (0 is background, 255 void)."""
    keys = np.asarray(keys)
    if keys.ndim != 1 or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise ValueError(f"keys must be a 1-D array of integer class ids, got {keys.dtype} of shape {keys.shape}")
    if keys.size and (int(keys.min()) < 1 or int(keys.max()) > 254 or np.unique(keys).size != keys.size):
        raise ValueError(f"keys must be distinct class ids in 1..254 (0 is background, 255 void), got {keys.tolist()}")
    return keys


def _check_cams(image: np.ndarray, cams: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = _check_image(image)
    cams = np.asarray(cams)
    keys = _check_keys(keys)
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, H, W), got shape {cams.shape}")
    if cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams height x width {cams.shape[1:]} does not match image height x width {image.shape[:2]}")
    if cams.shape[0] != keys.shape[0]:
        raise ValueError(f"cams have {cams.shape[0]} class planes but keys has {keys.shape[0]} class ids")
    cams = np.ascontiguousarray(cams, dtype=np.float32)
    if not np.isfinite(cams).all():
        raise ValueError("cams contain NaN or infinite values")
    return image, cams, keys


def confident_label_parts(
    image: np.ndarray, cams: np.ndarray, keys: np.ndarray, cfg: CrfConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fg_conf, bg_conf, labels): the two CRF label maps and the confident labels.

    `cams` (K, H, W) are normalised CAMs (about [0, 1]) of the classes `keys`
    (K,) (1-based class ids). fg_conf = CRF(argmax([conf_fg_thres, cams])),
    bg_conf = CRF(argmax([conf_bg_thres, cams])); labels = fg_conf, except
    that pixels that fg_conf calls background but bg_conf calls foreground are
    255 (unconfident). With no classes (K == 0) everything is background.
    """
    image, cams, keys = _check_cams(image, cams, keys)
    h, w = image.shape[:2]
    if keys.size == 0:
        zeros = np.zeros((h, w), np.uint8)
        return zeros, zeros, zeros
    _check_gt_prob(cfg)
    lut = np.concatenate([[0], keys]).astype(np.uint8)
    n = keys.size + 1
    fg_conf = lut[dense_crf_labels(image, cam_label_indices(cams, cfg.conf_fg_thres), n, cfg)]
    if cfg.conf_bg_thres == cfg.conf_fg_thres:
        bg_conf = fg_conf  # same input, same (deterministic) CRF: no band
    else:
        bg_conf = lut[dense_crf_labels(image, cam_label_indices(cams, cfg.conf_bg_thres), n, cfg)]
    out = fg_conf.copy()
    out[(fg_conf == 0) & (bg_conf != 0)] = UNCONFIDENT
    return fg_conf, bg_conf, out


def confident_labels(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """IRNet confident labels: HxW uint8 with 0 background, class ids from `keys`,
    255 unconfident (see `confident_label_parts`)."""
    return confident_label_parts(image, cams, keys, cfg)[2]


def refined_mask(image: np.ndarray, mask: np.ndarray, keys: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """A pseudo mask (0 background, class ids from `keys`) refined by a dense CRF
    whose unary trusts each pixel's label with probability `cfg.gt_prob`: edges
    snap to the image's colour edges. HxW uint8 with the same label set."""
    image, mask, keys = _check_image(image), np.asarray(mask), _check_keys(keys)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image height x width {image.shape[:2]}")
    lut = np.concatenate([[0], keys]).astype(np.uint8)  # local label -> class id
    local = np.full(256, -1, np.int64)
    local[lut] = np.arange(lut.size)
    indices = local[mask.astype(np.uint8)]
    if (indices < 0).any() or not np.array_equal(mask, lut[np.maximum(indices, 0)]):
        raise ValueError(f"mask holds labels {sorted(set(np.unique(mask).tolist()) - set(lut.tolist()))} "
                         f"that are neither background nor the image's classes {keys.tolist()}")
    return lut[dense_crf_labels(image, indices, lut.size, cfg)]


def refined_prediction(image: np.ndarray, labels: np.ndarray, cfg: CrfConfig | None) -> np.ndarray:
    """A segmenter's class-id map refined by a dense CRF over the classes it holds
    (background always one of them; no other class can appear), trusting each
    label with probability `cfg.gt_prob`; `cfg` None, or background alone:
    the map as it is. For images without labels (new photos)."""
    labels = np.asarray(labels)
    if cfg is None:
        return labels
    keys = np.unique(labels)
    keys = keys[keys != 0]
    return labels if keys.size == 0 else refined_mask(image, labels, keys, cfg)


def with_label_trust(cfg: CrfConfig, gt_prob: float | None) -> CrfConfig | None:
    """The crf section's pairwise terms with a label trust of `gt_prob` (a CRF that
    refines a label map); None when `gt_prob` is None (no refinement)."""
    return None if gt_prob is None else dataclasses.replace(cfg, gt_prob=gt_prob)


def _job(fn: Callable[..., np.ndarray], image_id: str, args: tuple, cfg: CrfConfig) -> tuple[str, np.ndarray]:
    """One image; top level so 'spawn' workers can import it. Input errors name the image."""
    try:
        return image_id, fn(*args, cfg)
    except ValueError as e:
        raise ValueError(f"{image_id}: {e}") from None


def crf_many(
    fn: Callable[..., np.ndarray],
    items: Iterable[tuple],
    cfg: CrfConfig,
    workers: int,
    on_result: Callable[[str, np.ndarray], Any] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """`fn(*args, cfg)` for many images, yielded as (id, result) as they finish.

    `items` yields (id, *args) and is read lazily: at most 2 * workers images
    are in flight, so a whole split is never in memory. `fn` must be a module's
    top-level function. workers == 0 runs in this process, in input order;
    otherwise results come in completion order from 'spawn' worker processes
    (safe next to torch and CUDA). `on_result(id, result)` is called for each
    result before it is yielded.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        for image_id, *args in items:
            result = _job(fn, image_id, tuple(args), cfg)
            if on_result is not None:
                on_result(*result)
            yield result
        return

    window = 2 * workers
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending: set[Future] = set()
    try:
        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    image_id, *args = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.add(pool.submit(_job, fn, image_id, tuple(args), cfg))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                result = fut.result()  # re-raises a worker's error (ValueError names the id)
                if on_result is not None:
                    on_result(*result)
                yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def confident_labels_many(
    items: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    cfg: CrfConfig,
    workers: int,
    on_result: Callable[[str, np.ndarray], Any] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Confident labels of many (id, image, cams, keys) items (see `crf_many`)."""
    return crf_many(confident_labels, items, cfg, workers, on_result)


# --------------------------------------------------------------------------- metrics
def _confusion(num_classes: int) -> Any:
    from .metrics import ConfusionMatrix

    return ConfusionMatrix(num_classes, ignore_index=UNCONFIDENT)


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def confident_label_scores(
    label_maps: Iterable[np.ndarray], gt_masks: Iterable[np.ndarray], num_classes: int
) -> dict[str, Any]:
    """Quality of confident label maps (0 bg, k class, 255 unconfident) against GT masks (255 void).

    Streams over both iterables (pairs in order). GT-void pixels are ignored
    everywhere. Returns
    - fg_precision: share of confident foreground pixels whose GT is that class,
    - bg_precision: share of confident background pixels whose GT is background,
    - precision: share of all confident pixels labelled correctly,
    - coverage: share of (non-void GT) pixels that are confident (not 255),
    - miou / iou: IoU of the label map with 255 treated as void (NaN: class absent),
    plus pixel counts. Ratios with an empty denominator are NaN.
    """
    cm = _confusion(num_classes)
    n_images = pixels = confident = fg = fg_ok = bg = bg_ok = 0
    sentinel = object()
    labels_it, gts_it = iter(label_maps), iter(gt_masks)
    while True:
        label = next(labels_it, sentinel)
        gt = next(gts_it, sentinel)
        if label is sentinel and gt is sentinel:
            break
        if label is sentinel or gt is sentinel:
            short = "label_maps" if label is sentinel else "gt_masks"
            raise ValueError(f"{short} ended after {n_images} items, before the other iterable")
        label, gt = np.asarray(label), np.asarray(gt)
        if label.shape != gt.shape or label.ndim != 2:
            raise ValueError(f"item {n_images}: label map shape {label.shape} does not match GT mask shape {gt.shape}")
        bad = (label != UNCONFIDENT) & (label >= num_classes)
        if bad.any():
            raise ValueError(f"item {n_images}: label value {int(label[bad][0])} is not a class id "
                             f"(0..{num_classes - 1}) or {UNCONFIDENT}")
        bad = (gt != UNCONFIDENT) & (gt >= num_classes)
        if bad.any():
            raise ValueError(f"item {n_images}: GT mask value {int(gt[bad][0])} is not a class id "
                             f"(0..{num_classes - 1}) or {UNCONFIDENT}")
        n_images += 1
        known = gt != UNCONFIDENT
        conf = known & (label != UNCONFIDENT)
        is_fg = conf & (label != 0)
        is_bg = conf & (label == 0)
        pixels += int(known.sum())
        confident += int(conf.sum())
        fg += int(is_fg.sum())
        fg_ok += int((is_fg & (gt == label)).sum())
        bg += int(is_bg.sum())
        bg_ok += int((is_bg & (gt == 0)).sum())
        # unconfident pixels become void for the IoU
        cm.update(label, np.where(conf, gt, UNCONFIDENT).astype(np.uint8))
    iou = np.asarray(cm.iou(), dtype=np.float64)
    return {
        "images": n_images,
        "fg_precision": _ratio(fg_ok, fg),
        "bg_precision": _ratio(bg_ok, bg),
        "precision": _ratio(fg_ok + bg_ok, confident),
        "coverage": _ratio(confident, pixels),
        "miou": float(cm.miou()),
        "iou": [float(v) for v in iou],
        "pixels": pixels,
        "confident_pixels": confident,
        "fg_pixels": fg,
        "bg_pixels": bg,
    }
