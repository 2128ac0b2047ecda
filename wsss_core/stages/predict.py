"""Stage `predict` (07_predict): the trained segmenter on every image of the
`predict.splits`, with test-time augmentation -> <split>/<id>.png (class ids
at the input's size); per-class IoU, mIoU and the confusion matrix where
masks exist. With the fully supervised bound trained, the same TTA scores it
(full/<split>/<id>.png) and the report states weak / full."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .. import runtime
from ..artifacts import LabelMaps, model_path, predictions
from ..config import Config
from ..metrics import ConfusionMatrix, segmentation_scores
from ..store import Run, StageResult
from . import check_split, dataset, register
from .per_image import for_each_image


def check_predict(cfg: Config, ds: Any) -> None:
    for split in cfg.predict.splits:
        check_split(cfg, ds, "predict.splits", split)


def prediction_artifact(cfg: Config, split: str, model: str = "segmentation") -> LabelMaps:
    """Where the predictions of one split live (the bound's under full/)."""
    return predictions(split if model == "segmentation" else f"full/{split}", cfg.predict.layout)


def _headline(m: dict) -> str:
    if "val_miou" not in m:
        return f"{m.get('images', 0)} images"
    full = f", full {m['full_val_miou']:.1f}, weak/full {m['weak_over_full']:.3f}" if "full_val_miou" in m else ""
    return f"val mIoU {m['val_miou']:.1f}{full}"


@register("predict", "07_predict", sections=("predict",), upstream=("data", "segmentation", "segmentation_full"),
          notebook="07_predict.ipynb", check=check_predict, headline=_headline)
def predict_stage(cfg: Config, run: Run) -> StageResult:
    """Segment the predict splits with TTA and score them."""
    from ..models.segmenter import load_segmenter
    from ..predict import segment

    p = cfg.predict
    ds = dataset(cfg)
    device = runtime.resolve_device(cfg.device)
    models = ["segmentation"] + (["segmentation_full"] if cfg.segmentation.upper_bound else [])
    metrics: dict[str, Any] = {"tta_scales": list(p.tta_scales), "tta_flip": p.tta_flip, "splits": {}}
    for which in models:
        net = load_segmenter(model_path(run, which), device)
        for split in p.splits:
            ids = ds.ids(split)
            art = prediction_artifact(cfg, split, which)
            images = ds.labelled(split)

            def compute(todo: list[str]) -> Iterator[tuple[str, np.ndarray]]:
                for sid in todo:
                    yield sid, segment(net, images.image(images.position(sid)), p.tta_scales, p.tta_flip, device)

            def evaluate() -> dict[str, Any]:
                return prediction_scores(cfg, run, split, which) if ds.has_masks(split) else {}

            desc = f"predict {split}" + (" (full)" if which != "segmentation" else "")
            m = for_each_image(run, art, ids, compute, desc, device, evaluate)
            metrics["splits"].setdefault(split, {})["full" if which != "segmentation" else "weak"] = m
    val = metrics["splits"].get(cfg.data.val_split, {})
    if "quality" in val.get("weak", {}):
        metrics["val_miou"] = round(100 * val["weak"]["quality"]["miou"], 2)
        metrics["images"] = val["weak"]["images"]
        full = val.get("full", {}).get("quality", {}).get("miou")
        if full is not None and full == full:
            metrics["full_val_miou"] = round(100 * full, 2)
            metrics["weak_over_full"] = round(val["weak"]["quality"]["miou"] / full, 4) if full > 0 else None
    return StageResult(metrics=metrics, paths={s: str(prediction_artifact(cfg, s).dir(run)) for s in p.splits})


def prediction_scores(cfg: Config, run: Run, split: str, which: str = "segmentation") -> dict[str, Any]:
    """Per-class IoU, mIoU and the confusion matrix of stored predictions (evaluation: masks)."""
    ds = dataset(cfg)
    masks = ds.masks(split)
    art = prediction_artifact(cfg, split, which)
    cm = ConfusionMatrix(ds.num_classes)
    per_image = {}
    for sid in ds.ids(split):
        pred, gt = art.read(run, sid), masks.mask(sid)
        one = ConfusionMatrix(ds.num_classes).update(pred, gt)
        per_image[sid] = float(one.miou())
        cm.merge(one)
    q = segmentation_scores(cm, ds.classes)
    return {"quality": q, "confusion": cm.matrix.tolist(), "per_image_miou": per_image}


def ranked_images(metrics: dict[str, Any], split: str, n: int = 3) -> tuple[list[str], list[str]]:
    """The n best and n worst images of a split by their own mIoU (weak segmenter)."""
    per = metrics["splits"][split]["weak"].get("per_image_miou", {})
    order = sorted((v, k) for k, v in per.items() if v == v)
    return [k for _, k in order[::-1][:n]], [k for _, k in order[:n]]


def prediction_panels(cfg: Config, run: Run, split: str, image_id: str,
                      metrics: dict[str, Any] | None = None) -> list[tuple[str, np.ndarray]]:
    """Image, stored prediction (and the bound's), ground truth of one image."""
    ds = dataset(cfg)
    images = ds.labelled(split)
    per = ((metrics or {}).get("splits", {}).get(split, {}).get("weak", {}).get("per_image_miou", {}))
    title = f"{image_id}" + (f" (mIoU {per[image_id]:.2f})" if image_id in per else "")
    panels = [(title, images.image(images.ids.index(image_id))),
              ("prediction", prediction_artifact(cfg, split).read(run, image_id))]
    full = prediction_artifact(cfg, split, "segmentation_full")
    if full.exists(run, image_id):
        panels.append(("fully supervised", full.read(run, image_id)))
    if ds.has_masks(split):
        panels.append(("ground truth", ds.masks(split).mask(image_id)))
    return panels
