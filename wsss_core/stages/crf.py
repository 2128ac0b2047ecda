"""Stage `crf` (03_crf): dense-CRF confident labels per image for IRNet
(confident_labels/<id>.png: 0 background, k class, 255 unconfident), scored by
precision and coverage against the masks (evaluation only)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from ..artifacts import CAMS, CONFIDENT_LABELS, write_scores
from ..config import Config, CrfConfig
from ..crf import confident_label_parts, confident_label_scores, confident_labels, confident_labels_many
from ..metrics import ImageScores
from ..store import Run, StageResult
from ..viz import heat_overlay
from .inputs import dataset, stage_images
from .per_image import for_each_image
from .registry import register


def _headline(m: dict) -> str:
    q = m.get("quality")
    return f"precision {100 * q['precision']:.1f}%, coverage {100 * q['coverage']:.1f}%" if q else \
        f"{m['images']} images"


@register("crf", "03_crf", sections=("crf",), upstream=("data", "cams"), config=CrfConfig,
          notebook="03_crf.ipynb", headline=_headline,
          version=2)  # 2: the labels' folder is confident_labels/ (was ir_labels/): a run made before redoes them
def crf_stage(cfg: Config, run: Run) -> StageResult:
    """Dense-CRF confident labels per image (0 bg, k class, 255 unconfident) for IRNet."""
    ds = dataset(cfg)
    split = cfg.cams.split
    images, ids = stage_images(cfg, run, split)

    def compute(todo: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        def items():
            for sid in todo:
                cam = CAMS.read(run, sid)
                yield sid, images.image(sid), cam.high_res, cam.keys

        return confident_labels_many(items(), cfg.crf, cfg.crf.workers)

    def evaluate() -> dict[str, Any]:
        if not ds.has_masks(split):
            return {}
        masks = ds.masks(split)
        scores = ImageScores("confident labels", split, ds.classes, "unconfident pixels (255) left out")
        for sid in ids:
            labels, gt = CONFIDENT_LABELS.read(run, sid), masks.mask(sid)
            scores.add(sid, labels, np.where(labels == 255, 255, gt).astype(np.uint8))
        write_scores(run, "crf", "confident_labels", scores)
        c = cfg.crf  # the sweep always holds the configured pair, so the chart shows where the run stands
        pairs = sorted({(f, c.conf_bg_thres) for f in (*c.sweep_fg_thresholds, c.conf_fg_thres)} |
                       {(c.conf_fg_thres, b) for b in (*c.sweep_bg_thresholds, c.conf_bg_thres)})
        sweep = crf_threshold_sweep(cfg, run, ids[: c.sweep_images], pairs) if c.sweep_images else []
        return {"quality": confident_label_scores((CONFIDENT_LABELS.read(run, sid) for sid in ids),
                                                  (masks.mask(sid) for sid in ids), ds.num_classes),
                "sweep": sweep, "sweep_images": min(c.sweep_images, len(ids))}

    metrics = for_each_image(run, CONFIDENT_LABELS, ids, compute, "dense CRF", None, evaluate)
    return StageResult(metrics=metrics, paths={"confident_labels": str(CONFIDENT_LABELS.dir(run))})


def crf_breakdown(cfg: Config, run: Run, image_id: str) -> list[tuple[str, np.ndarray]]:
    """Image, strongest CAM, fg_conf, bg_conf and the final confident labels of one image."""
    images = dataset(cfg).labelled(cfg.cams.split)
    image = images.image(image_id)
    cam = CAMS.read(run, image_id)
    fg, bg, labels = confident_label_parts(image, cam.high_res, cam.keys, cfg.crf)
    heat = cam.high_res.max(0) if len(cam.keys) else np.zeros(image.shape[:2], np.float32)
    return [("image", image), ("CAM (max over classes)", heat_overlay(image, heat)),
            (f"fg_conf (thres {cfg.crf.conf_fg_thres})", fg), (f"bg_conf (thres {cfg.crf.conf_bg_thres})", bg),
            ("confident labels (white: 255)", labels)]


def crf_threshold_sweep(cfg: Config, run: Run, ids: list[str],
                        pairs: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Precision and coverage of confident labels for (conf_fg_thres, conf_bg_thres)
    pairs, on the images `ids` (evaluation: reads masks)."""
    ds = dataset(cfg)
    images = ds.labelled(cfg.cams.split)
    masks = ds.masks(cfg.cams.split)
    cams = {i: CAMS.read(run, i) for i in ids}
    out = []
    for fg, bg in pairs:
        c = dataclasses.replace(cfg.crf, conf_fg_thres=fg, conf_bg_thres=min(bg, fg))
        maps = (confident_labels(images.image(i), cams[i].high_res, cams[i].keys, c) for i in ids)
        s = confident_label_scores(maps, (masks.mask(i) for i in ids), ds.num_classes)
        out.append({"conf_fg_thres": fg, "conf_bg_thres": c.conf_bg_thres, "precision": s["precision"],
                    "coverage": s["coverage"], "miou": s["miou"]})
    return out
