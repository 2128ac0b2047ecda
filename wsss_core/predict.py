"""Segmenting images with a trained segmenter: test-time augmentation, and a
folder of new images (`wsss predict`).

TTA (the reference: scales 0.5 / 1 / 2 with flips): the normalised image is
resized bilinearly to round(H s) x round(W s) for each scale, it and its
horizontal flip go through the network in one batch, the flipped logits are
flipped back, every logit map is resized bilinearly to (H, W) and they are
averaged; the argmax is the class id (0 = background).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cam import scaled_size
from .data.transforms import to_normalized_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PREDICT_LOCK = ".wsss-predict.lock"


@torch.inference_mode()
def tta_logits(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Averaged logits (C, H, W) of one HxWx3 uint8 image over scales (and flips)."""
    mean, std = model.normalization
    x = to_normalized_tensor(image, mean, std)[None].to(device)
    h, w = image.shape[:2]
    total = None
    n = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=scaled_size(h, w, s), mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        out = model(batch).float()
        if flip:
            out = torch.cat([out[:1], out[1:].flip(-1)])
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        total = out.sum(0) if total is None else total + out.sum(0)
        n += out.shape[0]
    return total / n  # type: ignore[operator]


def segment(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Class ids (H, W) uint8 of one image, with test-time augmentation."""
    return tta_logits(model, image, scales, flip, device).argmax(0).to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------- new images
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
    """The (non-hidden) files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def predict_folder(run_dir: str | Path, images: str | Path, out: str | Path, tta: bool = True,
                   skip_bad: bool = False, overwrite: bool = False, device: str | None = None,
                   layout: str | None = None) -> list[Path]:
    """Segment every image of a folder with a finished run's segmenter: one
    class-id PNG per image (`<stem>.png`, the input's size) in `out`.

    Checked before any work: the run's segmenter is finished; the folder has
    images; every file decodes (the unreadable ones are listed; with
    `skip_bad` they are left out and the rest is processed); existing outputs
    are never replaced unless `overwrite`. TTA as the run's `predict` section
    (or a single pass with `tta=False`); `layout` 'voc' (palette PNG) or 'lid'
    (grayscale PNG), default the run's.
    """
    from .artifacts import model_path, write_label_png
    from .config import ConfigError, load_config
    from .data import DataError, read_image
    from .data.ids import path_inside
    from .data.images import check_image_file
    from .models.segmenter import load_segmenter
    from .runtime import progress, resolve_device
    from .stages import open_run
    from .store import FileError, FolderLock, file_errors

    run_dir, images, out = Path(run_dir), Path(images), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    check_output_folder(images, out)
    cfg = load_config(run_dir / "config.yaml")
    run = open_run(run_dir, cfg)
    m = run.manifest("segmentation")
    if not m or m.get("status") != "done" or not model_path(run, "segmentation").is_file():
        raise ConfigError(f"{run_dir}: the segmentation stage has not finished "
                          f"({run.why_not_done('segmentation') or 'no model'}); run it first")
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    with file_errors(images, "reading"):
        files = list_files(images)
    if not files:
        raise DataError(f"{images}: the folder has no files")
    bad: dict[Path, str] = {}
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            bad[p] = f"not an image file ({', '.join(IMAGE_SUFFIXES)})"
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
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise DataError(f"{out}: {len(existing)} output file(s) exist, e.g. {existing[0].name} "
                        "(--overwrite to replace them)")
    layout = layout or cfg.predict.layout
    dev = resolve_device(device or cfg.device)
    model = load_segmenter(model_path(run, "segmentation"), dev)
    scales, flip = (cfg.predict.tta_scales, cfg.predict.tta_flip) if tta else ((1.0,), False)
    # One `wsss predict` per output folder; each mask is created only if absent (unless --overwrite),
    # so a clash with another writer is reported, never a silently lost mask.
    with FolderLock(out, PREDICT_LOCK).hold("wsss predict"):
        for done, (p, t) in enumerate(progress(list(zip(good, targets)), desc="segmenting", disable=False)):
            labels = segment(model, read_image(p), scales, flip, dev)
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
