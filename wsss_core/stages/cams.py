"""Stage `cams` (02_cams): multi-scale Grad-CAM / Grad-CAM++ of every kept
image's classes (cams/<id>.npz), and the CAM mIoU as the background
threshold moves (evaluation only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .. import runtime
from ..artifacts import CAMS, model_path, write_result, write_scores
from ..config import CamsConfig, Config, ConfigError
from ..evaluate import cam_threshold_sweep, labels_from_cams
from ..metrics import ImageScores
from ..store import Run, StageResult
from .inputs import check_split, dataset, stage_images
from .per_image import for_each_image
from .registry import register


def check_cams(cfg: Config, ds: Any) -> None:
    """The split exists, the CAM layer is a layer of the classifier's backbone, and
    the head can score it (ReCAM's needs classifier.recam_weight > 0 and the last layer)."""
    from ..models.classifier import check_cam_head

    check_split(cfg, ds, "cams.split", cfg.cams.split)
    last_layer = None
    if cfg.cams.layer is not None:
        from ..models import build_backbone

        names = build_backbone(cfg.classifier.backbone, "random", cfg.classifier.output_stride).layer_names
        if cfg.cams.layer not in names:
            raise ConfigError(f"cams.layer: {cfg.cams.layer!r} is not a layer of {cfg.classifier.backbone}; "
                              f"choose one of: {', '.join(names)}")
        last_layer = names[-1]
    check_cam_head(cfg.cams.head, cfg.cams.layer, cfg.classifier.recam_weight > 0, last_layer)


@dataclass
class CamsResult:
    """What the cams stage found on the masks of its split (evaluation only)."""

    split: str
    best_threshold: float | None  # background threshold with the best CAM mIoU; None: the split has no masks
    thresholds: list[float]  # the sweep (cams.bg_thresholds)
    miou: list[float | None]  # CAM mIoU at each threshold


def _headline(m: dict) -> str:
    return f"CAM mIoU {100 * m['miou_best']:.1f} at threshold {m['best_threshold']}" if "miou_best" in m else \
        f"{m['images']} images"


@register("cams", "02_cams", sections=("cams",), upstream=("data", "classifier", "label_filter"),
          config=CamsConfig, notebook="02_cams.ipynb", check=check_cams, headline=_headline,
          version=2)  # 2: CAM files hold the per-scale maps (float32), not float16 full-size maps
def cams_stage(cfg: Config, run: Run) -> StageResult:
    """Multi-scale Grad-CAM / Grad-CAM++ for every image of the split, then a
    background-threshold sweep against the masks."""
    import torch

    from ..cam import class_activation_maps, select_classes
    from ..data.transforms import to_normalized_tensor
    from ..multilabel import load_classifier

    c = cfg.cams
    device = runtime.resolve_device(cfg.device)
    trained = load_classifier(model_path(run, "classifier"), device)
    cam_model = trained.model.cam_model(c.layer, c.head)
    mean, std = trained.meta["normalization"]
    ds = dataset(cfg)
    images, ids = stage_images(cfg, run, c.split)

    def compute(todo: list[str]) -> Iterator[tuple[str, Any]]:
        for sid in todo:
            image, labels = images[images.position(sid)]
            x = to_normalized_tensor(image, mean, std).to(device)
            if c.classes == "labels":  # an empty label set means no object: no fallback to predictions
                class_ids = select_classes(labels, "labels", head_class_ids=trained.class_ids)
            else:
                with torch.inference_mode():
                    logits = trained.model(x[None])[0]
                class_ids = select_classes(logits, "predicted", c.pred_threshold, head_class_ids=trained.class_ids)
            yield sid, class_activation_maps(cam_model, x, class_ids, scales=c.scales, flip=c.flip, method=c.method,
                                             normalize=c.normalize, head_class_ids=trained.class_ids).stored(c.storage)

    def evaluate() -> dict[str, Any]:
        if not ds.has_masks(c.split):
            write_result(run, "cams", CamsResult(c.split, None, list(c.bg_thresholds), [None] * len(c.bg_thresholds)))
            return {}
        masks = ds.masks(c.split)
        items = ((r.high_res, r.keys, masks.mask(sid)) for sid in ids for r in [CAMS.read(run, sid)])
        quality = cam_threshold_sweep(items, c.bg_thresholds, ds.classes)
        best = quality["best_threshold"]
        scores = ImageScores("CAM", c.split, ds.classes, f"background threshold {best}, chosen on these masks")
        for sid in ids:
            cam = CAMS.read(run, sid)
            scores.add(sid, labels_from_cams(cam.high_res, cam.keys, best), masks.mask(sid))
        write_scores(run, "cams", "cam", scores)
        write_result(run, "cams", CamsResult(c.split, best, quality["thresholds"], quality["miou"]))
        return {"quality": quality, "miou_best": quality["best"]["miou"], "best_threshold": best}

    metrics = for_each_image(run, CAMS, ids, compute, f"CAMs ({c.method})", device, evaluate)
    return StageResult(metrics=metrics, paths={"cams": str(CAMS.dir(run))})
