"""Stage `predict` (07_predict): the trained segmenter on every image of the
`predict.splits`, with test-time augmentation (and, with `predict.crf_gt_prob`,
a dense CRF over the classes each prediction holds) -> <split>/<id>.png (class
ids at the input's size); per-class IoU, mIoU and the confusion matrix where
masks exist. With the fully supervised bound trained, the same TTA and CRF
score it (full/<split>/<id>.png) and the report states weak / full.

The CRF's pairwise terms are the crf section's; the stage's fingerprint
already holds them (through the pseudo masks upstream of the segmenter)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
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
    """Where the predictions of one split live (the bound's under full/)."""
    return predictions(split if model == "segmentation" else f"full/{split}", cfg.predict.layout)


@dataclass
class PredictResult:
    """The segmenters' scores on the predict splits (evaluation only; None where a split has no masks)."""

    tta_scales: list[float]
    tta_flip: bool
    miou: dict[str, float | None]  # split -> mIoU of the segmenter trained on the pseudo masks
    full_miou: dict[str, float | None]  # split -> mIoU of the fully supervised bound (None: not trained)
    weak_over_full: float | None  # on data.val_split


_MODELS = {"segmentation": ("weak", "segmenter"), "segmentation_full": ("full", "fully supervised")}


def _headline(m: dict) -> str:
    if "val_miou" not in m:
        return f"{m.get('images', 0)} images"
    full = f", full {m['full_val_miou']:.1f}, weak/full {m['weak_over_full']:.3f}" if "full_val_miou" in m else ""
    return f"val mIoU {m['val_miou']:.1f}{full}"


@register("predict", "07_predict", sections=("predict",), upstream=("data", "segmentation", "segmentation_full"),
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
    models = ["segmentation"] + (["segmentation_full"] if cfg.segmentation.upper_bound else [])
    metrics: dict[str, Any] = {"tta_scales": list(p.tta_scales), "tta_flip": p.tta_flip, "crf_gt_prob": p.crf_gt_prob,
                               "precision": p.precision, "splits": {}}
    miou: dict[str, dict[str, float | None]] = {"weak": {}, "full": {}}
    for which in models:
        net = load_segmenter(model_path(run, which), device)
        short, what = _MODELS[which]
        for split in p.splits:
            ids = stage_ids(cfg, run, split)
            art = prediction_artifact(cfg, split, which)
            images = ds.labelled(split)

            def compute(todo: list[str]) -> Iterator[tuple[str, np.ndarray]]:
                for sid in todo:
                    yield sid, segment(net, images.image(images.position(sid)), p.tta_scales, p.tta_flip, device,
                                       p.max_side, crf, p.precision)

            def evaluate() -> dict[str, Any]:
                if not ds.has_masks(split):
                    return {}
                masks = ds.masks(split)
                scores = ImageScores(what, split, ds.classes, _tta_note(p))
                for sid in ids:
                    scores.add(sid, art.read(run, sid), masks.mask(sid))
                write_scores(run, "predict", f"{split}_{which}", scores)  # val_segmentation, val_segmentation_full
                return {"miou": scores.miou()}

            desc = f"predict {split}" + (" (full)" if which != "segmentation" else "")
            m = for_each_image(run, art, ids, compute, desc, device, evaluate)
            metrics["splits"].setdefault(split, {})[short] = m
            miou[short][split] = m.get("miou")
    val = cfg.data.val_split
    weak, full = miou["weak"].get(val), miou["full"].get(val)
    ratio = round(weak / full, 4) if weak is not None and full else None
    if run.is_main:
        write_result(run, "predict", PredictResult(list(p.tta_scales), p.tta_flip, miou["weak"], miou["full"], ratio))
    if weak is not None:
        metrics.update({"val_miou": round(100 * weak, 2), "images": len(ds.ids(val))})
    if full is not None:
        metrics.update({"full_val_miou": round(100 * full, 2), "weak_over_full": ratio})
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
    panels = [(title, images.image(images.ids.index(image_id))),
              ("prediction", prediction_artifact(cfg, split).read(run, image_id))]
    full = prediction_artifact(cfg, split, "segmentation_full")
    if full.exists(run, image_id):
        panels.append(("fully supervised", full.read(run, image_id)))
    if ds.has_masks(split):
        panels.append(("ground truth", ds.masks(split).mask(image_id)))
    return panels


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PREDICT_LOCK = ".wsss-predict.lock"


# --------------------------------------------------------------------------- new images (`wsss predict`)
def check_output_folder(images: Path, out: Path) -> None:
    """`out` may not be the image folder or inside it (masks would mix with the
    photos, and could replace them), and must be a folder this process can write."""
    from ..data import DataError
    from ..store import check_writable_folder

    src, dst = os.path.realpath(images), os.path.realpath(out)
    if dst == src or dst.startswith(src.rstrip(os.sep) + os.sep):
        raise DataError(f"--out {out}: is the image folder {images} or inside it; masks would mix with the "
                        "photos (and PNG photos would be replaced): choose another folder")
    check_writable_folder(out, "the output folder")


def list_files(folder: Path) -> list[Path]:
    """The (non-hidden) entries directly in `folder` that are not folders, sorted: a FIFO or a device
    named like an image is listed (and refused as not a regular file), never silently left out."""
    return sorted(p for p in folder.iterdir() if not p.is_dir() and not p.name.startswith("."))


PREDICT_MODELS = {"weak": "segmentation", "bound": "segmentation_full"}  # `wsss predict --model` -> its stage


def predict_folder(run_dir: str | Path, images: str | Path, out: str | Path, tta: bool = True,
                   skip_bad: bool = False, overwrite: bool = False, device: str | None = None,
                   layout: str | None = None, model: str = "weak") -> list[Path]:
    """Segment every image of a folder with a finished run's segmenter (`model` 'weak'; 'bound': its
    fully supervised bound, so weak / full can be measured on images outside the run): one class-id PNG
    per image (`<stem>.png`, the input's size) in `out`.

    Checked before any work: the run's segmenter is finished; the folder has
    images; every file decodes (the unreadable ones are listed; with
    `skip_bad` they are left out and the rest is processed); existing outputs
    are never replaced unless `overwrite`. TTA and the CRF as the run's `predict`
    section (or a single pass with `tta=False`; the CRF still applies); `layout` 'voc' (palette PNG) or 'lid'
    (grayscale PNG), default the run's.
    """
    from ..artifacts import write_label_png
    from ..config import load_config
    from ..data import DataError, read_image
    from ..data.ids import path_inside
    from ..data.images import check_image_file
    from ..models.segmenter import load_segmenter
    from ..predict import segment
    from ..runtime import progress, resolve_device
    from ..store import FileError, FolderLock, Run, file_errors
    from .registry import specs

    run_dir, images, out = Path(run_dir), Path(images), Path(out)
    if model not in PREDICT_MODELS:
        raise ConfigError(f"--model {model}: unknown; one of {', '.join(PREDICT_MODELS)}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    check_output_folder(images, out)
    cfg = load_config(run_dir / "config.yaml")
    run = Run(run_dir, cfg, specs())
    stage = PREDICT_MODELS[model]
    m = run.manifest(stage)
    if not m or m.get("status") != "done" or not model_path(run, stage).is_file():
        hint = " (segmentation.upper_bound: true trains it)" if model == "bound" else ""
        raise ConfigError(f"{run_dir}: the {stage} stage has not finished "
                          f"({run.why_not_done(stage) or 'no model'}){hint}; run it first")
    if images.exists() and not images.is_dir():
        raise DataError(f"{images}: is a file, not a folder of images (--images)")
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    with file_errors(images, "reading"):
        files = list_files(images)
    if not files:
        raise DataError(f"{images}: the folder has no files (subfolders and hidden files are not read)")
    bad: dict[Path, str] = {}
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            bad[p] = f"format {p.suffix or '(no extension)'} not supported ({', '.join(IMAGE_SUFFIXES)})"
            continue
        try:
            check_image_file(p)
        except DataError as e:
            bad[p] = str(e).split(": ", 1)[-1]
    listing = "; ".join(f"{p.name} ({why})" for p, why in list(bad.items())[:5]) + ("; ..." if len(bad) > 5 else "")
    if bad and not skip_bad:
        raise DataError(f"{images}: {len(bad)} unreadable image file(s): {listing} (--skip-bad to segment the others)")
    good = [p for p in files if p not in bad]
    if not good:
        raise DataError(f"{images}: no readable image among {len(files)} file(s): {listing}")
    stems = [p.stem for p in good]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise DataError(f"{images}: several images share the name {dupes[0]!r} (one output {dupes[0]}.png each)")
    targets = [path_inside(out, p.stem, ".png") for p in good]
    inputs = {os.path.realpath(p) for p in files}
    clash = [t for t in targets if os.path.realpath(t) in inputs]
    if clash:  # never, not even with --overwrite
        raise DataError(f"{clash[0]}: is one of the input images; refusing to replace it with a mask "
                        "(choose another --out)")
    lock = FolderLock(out, PREDICT_LOCK)

    def check_free() -> None:
        existing = [t for t in targets if os.path.lexists(t)]  # a dangling link too: it is in the way
        if existing and not overwrite:
            if not lock.token:
                lock.refuse_if_held()  # another `wsss predict` is writing them: say that, not "n exist"
                existing = [t for t in targets if os.path.lexists(t)]  # it may have finished just now
            raise DataError(f"{out}: {len(existing)} output file(s) exist, e.g. {existing[0].name} "
                            "(--overwrite to replace them)")

    check_free()
    layout = layout or cfg.predict.layout
    dev = resolve_device(device or cfg.device)
    net = load_segmenter(model_path(run, stage), dev)
    scales, flip = (cfg.predict.tta_scales, cfg.predict.tta_flip) if tta else ((1.0,), False)
    crf = with_label_trust(cfg.crf, cfg.predict.crf_gt_prob)
    # One `wsss predict` per output folder; each mask is created only if absent (unless --overwrite),
    # so a clash with another writer is reported, never a silently lost mask.
    with lock.hold("wsss predict"):
        check_free()  # again: another `wsss predict` may have written them and left since the first look
        for done, (p, t) in enumerate(progress(list(zip(good, targets)), desc="segmenting", disable=False)):
            labels = segment(net, read_image(p), scales, flip, dev, cfg.predict.max_side, crf, cfg.predict.precision)
            try:
                write_label_png(t, labels, layout, exclusive=not overwrite)
            except FileError as e:
                if isinstance(e.__cause__, OSError) and e.__cause__.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise FileError(f"disk full while writing {t} after {done} of {len(good)} masks; free space "
                                    "and rerun with --overwrite (the masks written are complete)") from None
                raise
    if bad:
        print(f"[wsss] skipped {len(bad)} unreadable file(s): {listing}")
    return targets
