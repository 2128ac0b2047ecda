"""Stage `predict` (07_predict): the trained segmenter on every image of the
`predict.splits`, with test-time augmentation (and, with `predict.crf_gt_prob`,
a dense CRF over the classes each prediction holds) -> <split>/<id>.png (class
ids at the input's size); per-class IoU, mIoU and the confusion matrix where
masks exist. With the fully supervised bound trained, the same TTA and CRF
score it (bound/<split>/<id>.png) and the report states weak / bound.

The CRF's pairwise terms are the crf section's; the stage's fingerprint
already holds them (through the pseudo masks upstream of the segmenter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .. import runtime
from ..artifacts import LabelMaps, model_path, predictions, write_result, write_scores
from ..config import Config, ConfigError, PredictConfig
from ..crf import with_label_trust
from ..metrics import ImageScores
from ..store import Run, StageResult
from .inputs import check_split, dataset, stage_ids
from .per_image import for_each_image
from .registry import register


def check_predict(cfg: Config, ds: Any) -> None:
    for split in cfg.predict.splits:
        check_split(cfg, ds, "predict.splits", split)


def prediction_artifact(cfg: Config, split: str, model: str = "segmentation") -> LabelMaps:
    """Where the predictions of one split live (the bound's under bound/)."""
    return predictions(split if model == "segmentation" else f"bound/{split}", cfg.predict.layout)


def score_key(split: str, model: str = "segmentation") -> str:
    """The kept evaluation of one split's predictions, named as their folder: `val`, `val_bound`
    (so the weak segmenter's come before the bound's, split by split, wherever scores are listed)."""
    return split if model == "segmentation" else f"{split}_bound"


@dataclass
class PredictResult:
    """The segmenters' scores on the predict splits (evaluation only; None where a split has no masks)."""

    tta_scales: list[float]
    tta_flip: bool
    miou: dict[str, float | None]  # split -> mIoU of the segmenter trained on the pseudo masks
    bound_miou: dict[str, float | None]  # split -> mIoU of the fully supervised bound (None: not trained)
    weak_over_bound: float | None  # on data.val_split


_MODELS = {"segmentation": ("weak", "segmenter"), "bound": ("bound", "bound")}


def _headline(m: dict) -> str:
    if "val_miou" not in m:
        return f"{m.get('images', 0)} images"
    bound = f", bound {m['bound_val_miou']:.1f}, weak/bound {m['weak_over_bound']:.3f}" if "bound_val_miou" in m else ""
    return f"val mIoU {m['val_miou']:.1f}{bound}"


@register("predict", "07_predict", sections=("predict",), upstream=("data", "segmentation", "bound"),
          config=PredictConfig, notebook="07_predict.ipynb", check=check_predict, headline=_headline)
def predict_stage(cfg: Config, run: Run) -> StageResult:
    """Segment the predict splits with TTA and score them (the train split: the
    kept images, the ones the pseudo masks were made for)."""
    from ..models.segmenter import load_segmenter
    from ..predict import segment

    p = cfg.predict
    ds = dataset(cfg)
    device = runtime.resolve_device(cfg.device)
    crf = with_label_trust(cfg.crf, p.crf_gt_prob)
    models = ["segmentation"] + (["bound"] if cfg.segmentation.bound else [])
    metrics: dict[str, Any] = {"tta_scales": list(p.tta_scales), "tta_flip": p.tta_flip, "crf_gt_prob": p.crf_gt_prob,
                               "precision": p.precision, "splits": {}}
    miou: dict[str, dict[str, float | None]] = {"weak": {}, "bound": {}}
    for which in models:
        net = load_segmenter(model_path(run, which), device)
        short, what = _MODELS[which]
        for split in p.splits:
            ids = stage_ids(cfg, run, split)
            art = prediction_artifact(cfg, split, which)
            images = ds.labelled(split)

            def compute(todo: list[str]) -> Iterator[tuple[str, np.ndarray]]:
                for sid in todo:
                    yield sid, segment(net, images.image(sid), p.tta_scales, p.tta_flip, device,
                                       p.max_side, crf, p.precision)

            def evaluate() -> dict[str, Any]:
                if not ds.has_masks(split):
                    return {}
                masks = ds.masks(split)
                scores = ImageScores(what, split, ds.classes, _tta_note(p))
                for sid in ids:
                    scores.add(sid, art.read(run, sid), masks.mask(sid))
                write_scores(run, "predict", score_key(split, which), scores)
                return {"miou": scores.miou()}

            desc = f"predict {split}" + (" (bound)" if which != "segmentation" else "")
            m = for_each_image(run, art, ids, compute, desc, device, evaluate)
            metrics["splits"].setdefault(split, {})[short] = m
            miou[short][split] = m.get("miou")
    val = cfg.data.val_split
    weak, bound = miou["weak"].get(val), miou["bound"].get(val)
    ratio = round(weak / bound, 4) if weak is not None and bound else None
    if run.is_main:
        write_result(run, "predict", PredictResult(list(p.tta_scales), p.tta_flip, miou["weak"], miou["bound"], ratio))
    if weak is not None:
        metrics.update({"val_miou": round(100 * weak, 2), "images": len(ds.ids(val))})
    if bound is not None:
        metrics.update({"bound_val_miou": round(100 * bound, 2), "weak_over_bound": ratio})
    return StageResult(metrics=metrics, paths={s: str(prediction_artifact(cfg, s).dir(run)) for s in p.splits})


def _tta_note(p: PredictConfig) -> str:
    scales = "/".join(f"{s:g}" for s in p.tta_scales)
    crf = "" if p.crf_gt_prob is None else f", dense CRF (label trust {p.crf_gt_prob:g})"
    return f"TTA scales {scales}" + (" + flip" if p.tta_flip else "") + crf


def ranked_images(scores: ImageScores, n: int = 3) -> tuple[list[str], list[str]]:
    """The n best and n worst images by their own mIoU."""
    order = sorted((v, k) for k, v in scores.per_image_miou().items())
    return [k for _, k in order[::-1][:n]], [k for _, k in order[:n]]


def prediction_panels(cfg: Config, run: Run, split: str, image_id: str,
                      scores: ImageScores | None = None) -> list[tuple[str, np.ndarray]]:
    """Image, stored prediction (and the bound's), ground truth of one image."""
    ds = dataset(cfg)
    images = ds.labelled(split)
    per = scores.per_image_miou() if scores is not None else {}
    title = f"{image_id}" + (f" (mIoU {per[image_id]:.2f})" if image_id in per else "")
    panels = [(title, images.image(image_id)),
              ("prediction", prediction_artifact(cfg, split).read(run, image_id))]
    bound = prediction_artifact(cfg, split, "bound")
    if bound.exists(run, image_id):
        panels.append(("bound", bound.read(run, image_id)))
    if ds.has_masks(split):
        panels.append(("ground truth", ds.masks(split).mask(image_id)))
    return panels


def prediction_ious(kept: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per-class IoU of each kept prediction score ("segmentation (val)": ..., the bound's too)."""
    return {f"{s.what} ({s.split})": s.summary()["iou"] for s in kept.values()}
