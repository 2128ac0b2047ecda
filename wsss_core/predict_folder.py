"""`wsss predict`: segment a folder of new images with a finished run's segmenter
(or its fully supervised bound), one class-id PNG per image; every input checked
before any work, outputs never replaced unless asked, one writer per folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .artifacts import model_path
from .config import ConfigError
from .crf import with_label_trust


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PREDICT_LOCK = ".wsss-predict.lock"


def check_output_folder(images: Path, out: Path) -> None:
    """`out` may not be the image folder or inside it (masks would mix with the
    photos, and could replace them), and must be a folder this process can write."""
    from .data import DataError
    from .store import check_writable_folder

    src, dst = os.path.realpath(images), os.path.realpath(out)
    if dst == src or dst.startswith(src.rstrip(os.sep) + os.sep):
        raise DataError(f"--out {out}: is the image folder {images} or inside it; masks would mix with the "
                        "photos (and PNG photos would be replaced): choose another folder")
    check_writable_folder(out, "the output folder")


def list_files(folder: Path) -> list[Path]:
    """The (non-hidden) entries directly in `folder` that are not folders, sorted: a FIFO or a device
    named like an image is listed (and refused as not a regular file), never silently left out."""
    return sorted(p for p in folder.iterdir() if not p.is_dir() and not p.name.startswith("."))


PREDICT_MODELS = {"weak": "segmentation", "bound": "bound"}  # `wsss predict --model` -> its stage


def predict_folder(run_dir: str | Path, images: str | Path, out: str | Path, tta: bool = True,
                   skip_bad: bool = False, overwrite: bool = False, device: str | None = None,
                   layout: str | None = None, model: str = "weak") -> list[Path]:
    """Segment every image of a folder with a finished run's segmenter (`model` 'weak'; 'bound': its
    fully supervised bound, so weak / bound can be measured on images outside the run): one class-id PNG
    per image (`<stem>.png`, the input's size) in `out`.

    Checked before any work: the run's segmenter is finished; the folder has
    images; every file decodes (the unreadable ones are listed; with
    `skip_bad` they are left out and the rest is processed); existing outputs
    are never replaced unless `overwrite`. TTA and the CRF as the run's `predict`
    section (or a single pass with `tta=False`; the CRF still applies); `layout` 'voc' (palette PNG) or 'lid'
    (grayscale PNG), default the run's.
    """
    from .artifacts import write_label_png
    from .config import load_config
    from .data import DataError, read_image
    from .data.ids import path_inside
    from .data.images import check_image_file
    from .models.segmenter import load_segmenter
    from .predict import segment
    from .runtime import progress, resolve_device
    from .store import FileError, FolderLock, Run, file_errors
    from .stages.registry import specs

    run_dir, images, out = Path(run_dir), Path(images), Path(out)
    if model not in PREDICT_MODELS:
        raise ConfigError(f"--model {model}: unknown; one of {', '.join(PREDICT_MODELS)}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    check_output_folder(images, out)
    cfg = load_config(run_dir / "config.yaml")
    run = Run(run_dir, cfg, specs())
    run.refuse_archive("wsss predict")
    stage = PREDICT_MODELS[model]
    m = run.manifest(stage)
    if not m or m.get("status") != "done" or not model_path(run, stage).is_file():
        hint = " (segmentation.bound: true trains it)" if model == "bound" else ""
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
