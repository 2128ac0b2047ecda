"""Stage `pseudo_masks` (05_pseudo_masks): IRNet's random walk. For every kept
train image: the boundary map (with flip), the stride-4 CAMs times
(1 - boundary) propagated by the sparse random walk, upsampled, background
at `sem_seg_bg_thres` (or, with `bg_power`, a background score walked with
the classes), argmax; then (`crf_gt_prob`) a dense CRF snaps the
walk's mask to the image's edges -> masks/<id>.png (and boundary/<id>.png,
walk/<id>.png: the mask before the CRF). Scored against the masks
(evaluation only), beside the CAMs and the confident labels of the same images."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from .. import runtime
from ..artifacts import BOUNDARY_MAPS, CAMS, CONFIDENT_LABELS, PSEUDO_MASKS, WALK_MASKS, model_path, read_scores, write_scores
from ..config import Config, CrfConfig, PseudoMasksConfig
from ..crf import crf_many, refined_mask, with_label_trust
from ..metrics import ConfusionMatrix, ImageScores, segmentation_scores
from ..store import Run, StageResult
from .inputs import dataset, stage_images
from .per_image import for_each_image
from .registry import register


def walk(p: PseudoMasksConfig, cams: np.ndarray, keys: Sequence[int], boundary: np.ndarray,
         image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(the classes' random-walk scores (K, h, w), the walk's mask (H, W)) of one image's
    stride-4 CAMs (K, h, w) of classes `keys`, by the pseudo_masks section's rule."""
    from ..random_walk import cams_with_background, pseudo_mask, random_walk

    if p.bg_power is None:
        rw = random_walk(cams, boundary, p.radius, p.beta, p.exp_times)
        return rw, pseudo_mask(rw, keys, image_size, p.sem_seg_bg_thres)
    rw = random_walk(cams_with_background(cams, p.bg_power), boundary, p.radius, p.beta, p.exp_times)
    return rw[1:], pseudo_mask(rw, keys, image_size, None)


def refine_crf(cfg: Config) -> CrfConfig | None:
    """The dense CRF that refines the walk's masks (the crf section's pairwise
    terms, the label trust `pseudo_masks.crf_gt_prob`); None: no refinement."""
    return with_label_trust(cfg.crf, cfg.pseudo_masks.crf_gt_prob)


def _headline(m: dict) -> str:
    walked = f"walk {100 * m['walk_miou']:.1f}, " if "walk_miou" in m else ""
    return f"pseudo-mask mIoU {100 * m['miou']:.1f} ({walked}CAM {100 * m['cam_miou']:.1f})" if "miou" in m else \
        f"{m['images']} images"


@register("pseudo_masks", "05_pseudo_masks", sections=("pseudo_masks", "crf"), upstream=("data", "cams", "boundary"),
          config=PseudoMasksConfig, notebook="05_pseudo_masks.ipynb", headline=_headline, reads_metrics=("cams",),
          version=2)  # 2: boundary maps of odd-sized images no longer shifted by TF-SAME padding
def pseudo_masks_stage(cfg: Config, run: Run) -> StageResult:
    """Random-walk pseudo masks for every kept train image."""
    from ..models.boundary import boundary_map, load_boundary

    device = runtime.resolve_device(cfg.device)
    model = load_boundary(model_path(run, "boundary"), device)
    ds = dataset(cfg)
    split = cfg.cams.split
    images, ids = stage_images(cfg, run, split)
    crf = refine_crf(cfg)

    def walked(todo: list[str]) -> Iterator[tuple[Any, ...]]:
        for sid in todo:
            image = images.image(sid)
            # the walk uses the boundary map as stored (8 bits), so the notebook's sweeps repeat it exactly
            b = BOUNDARY_MAPS.quantize(boundary_map(model, image, device, cfg.pseudo_masks.flip))
            BOUNDARY_MAPS.write(run, sid, b)
            cam = CAMS.read(run, sid)
            try:
                mask = walk(cfg.pseudo_masks, cam.cam, cam.keys, b, image.shape[:2])[1]
            except ValueError as e:  # name the image
                raise ValueError(f"{sid}: {e}") from None
            if crf is None:
                yield sid, mask
            else:
                WALK_MASKS.write(run, sid, mask)
                yield sid, image, mask, cam.keys

    def compute(todo: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        # the CRF runs in worker processes while the walk goes on here
        return walked(todo) if crf is None else crf_many(refined_mask, walked(todo), crf, cfg.crf.workers)

    def evaluate() -> dict[str, Any]:
        if not ds.has_masks(split):
            return {}
        masks = ds.masks(split)
        scores = ImageScores("pseudo masks", split, ds.classes)
        for sid in ids:
            scores.add(sid, PSEUDO_MASKS.read(run, sid), masks.mask(sid))
        write_scores(run, "pseudo_masks", "pseudo_masks", scores)
        walk_miou = {}
        if crf is not None:  # the masks before the CRF, on the same images
            walked_scores = ImageScores("random-walk masks", split, ds.classes)
            for sid in ids:
                walked_scores.add(sid, WALK_MASKS.read(run, sid), masks.mask(sid))
            write_scores(run, "pseudo_masks", "before_crf", walked_scores)  # sorts before pseudo_masks in the report
            walk_miou = {"walk_miou": walked_scores.miou()}
        p = cfg.pseudo_masks  # the sweep always holds the configured values, so the chart shows where the run stands
        n = min(p.sweep_images, len(ids))
        backgrounds = {*p.sweep_bg_thresholds, p.sem_seg_bg_thres} if p.bg_power is None else \
            {*p.sweep_bg_powers, p.bg_power}
        sweep = pseudo_mask_sweep(cfg, run, ids[:n], sorted(backgrounds), sorted({*p.sweep_betas, p.beta})) if n else []
        # the masks the walk started from, on the same images (their stages' own evaluations)
        return {"miou": scores.miou(), **walk_miou, "cam_miou": read_scores(run, "cams", "cam").miou(),
                "confident_labels_miou": read_scores(run, "crf", "confident_labels").miou(),
                "quality": segmentation_scores(scores.confusion, ds.classes), "sweep": sweep, "sweep_images": n}

    metrics = for_each_image(run, PSEUDO_MASKS, ids, compute, "random walk" if crf is None else "random walk + CRF",
                             device, evaluate)
    paths = {"masks": str(PSEUDO_MASKS.dir(run)), "boundary": str(BOUNDARY_MAPS.dir(run))}
    return StageResult(metrics=metrics, paths=paths if crf is None else {**paths, "walk": str(WALK_MASKS.dir(run))})


def pseudo_mask_sweep(cfg: Config, run: Run, ids: Sequence[str], backgrounds: Sequence[float],
                      betas: Sequence[float]) -> list[dict[str, Any]]:
    """mIoU of the walk's masks (before any CRF) for every (beta, background) on
    the images `ids`, from their stored boundary maps (evaluation: reads masks).
    The backgrounds are sem_seg_bg_thres values, or bg_power values when the
    config walks the background (all powers in one walk: it is linear)."""
    from ..random_walk import background_score, pseudo_mask, random_walk

    p = cfg.pseudo_masks
    key = "sem_seg_bg_thres" if p.bg_power is None else "bg_power"
    ds = dataset(cfg)
    masks = ds.masks(cfg.cams.split)
    gts = {i: masks.mask(i) for i in ids}
    cams = {i: CAMS.read(run, i) for i in ids}
    bounds = {i: BOUNDARY_MAPS.read(run, i) for i in ids}
    out = []
    for beta in betas:
        cms = [ConfusionMatrix(ds.num_classes) for _ in backgrounds]
        for i in ids:
            cam = cams[i].cam
            if p.bg_power is None:
                rw = random_walk(cam, bounds[i], p.radius, beta, p.exp_times)
                for cm, t in zip(cms, backgrounds):
                    cm.update(pseudo_mask(rw, cams[i].keys, gts[i].shape, t), gts[i])
                continue
            walked_bgs = np.stack([background_score(cam, a) for a in backgrounds])
            rw = random_walk(np.concatenate([walked_bgs, np.asarray(cam, walked_bgs.dtype)]), bounds[i], p.radius,
                             beta, p.exp_times)
            for j, cm in enumerate(cms):
                cm.update(pseudo_mask(np.concatenate([rw[j:j + 1], rw[len(cms):]]), cams[i].keys, gts[i].shape,
                                      None), gts[i])
        out += [{"beta": float(beta), key: float(t), "miou": float(cm.miou())} for t, cm in zip(backgrounds, cms)]
    return out


def second_half_maps(cfg: Config, run: Run, image_id: str) -> dict[str, np.ndarray]:
    """The second half's maps of one image, from the stored outputs: image, CAM
    (stride 4, max over classes), confident labels, boundary map, random-walk
    scores (max over classes, scaled to 1), the walk's mask where a CRF refines
    it, the pseudo mask (as stored), and the ground truth
    where the split has masks (evaluation only). Drawn by `viz.second_half_panels`."""
    ds = dataset(cfg)
    images = ds.labelled(cfg.cams.split)
    image = images.image(image_id)
    cam = CAMS.read(run, image_id)
    b = BOUNDARY_MAPS.read(run, image_id)
    rw, mask = walk(cfg.pseudo_masks, cam.cam, cam.keys, b, image.shape[:2])
    zeros = np.zeros(b.shape, np.float32)
    maps = {"image": image,
            "cam": (cam.cam.max(0) if len(cam.keys) else zeros).astype(np.float32),
            "confident_labels": CONFIDENT_LABELS.read(run, image_id),
            "boundary": b,
            "walk": (rw.max(0) / max(float(rw.max()), 1e-12) if len(cam.keys) else zeros).astype(np.float32),
            **({"walk_mask": mask} if refine_crf(cfg) is not None else {}),
            "pseudo_mask": PSEUDO_MASKS.read(run, image_id)}
    if ds.has_masks(cfg.cams.split):
        maps["ground_truth"] = ds.masks(cfg.cams.split).mask(image_id)
    return maps


def stage_ious(run: Run, with_walk: bool) -> dict[str, dict[str, float]]:
    """Per-class IoU of the same train images at each step of the second half (CAM, confident labels, the
    walk's masks when the pseudo masks are refined, pseudo masks), from the scores each stage kept."""
    kept = {"CAM": ("cams", "cam"), "confident labels": ("crf", "confident_labels"),
            **({"walk's masks": ("pseudo_masks", "before_crf")} if with_walk else {}),
            "pseudo masks": ("pseudo_masks", "pseudo_masks")}
    return {name: read_scores(run, *where).summary()["iou"] for name, where in kept.items()}


def sweep_axis(p: PseudoMasksConfig) -> str:
    """The background parameter a pseudo-mask sweep moves: the constant threshold, or the walked power."""
    return "sem_seg_bg_thres" if p.bg_power is None else "bg_power"
