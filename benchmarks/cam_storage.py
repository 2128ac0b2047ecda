"""What a CAM file's form changes downstream: the run's confident labels and
pseudo masks against those made from the same CAMs held another way.

`--against uint8`: the maps as `cams.storage: uint8` stores them (8-bit codes,
a range per class and scale). `--against float16-full`: the format before cams
stage version 2 (the stride-4 and full-size maps as float16; those were exactly
today's float32 maps rounded). For every train image of a finished run (its
CAMs stored as float32), this redoes the confident CRF labels and the pseudo
masks (the stored boundary maps, the walk, and the CRF refinement when the run
has one) from the other form, then prints: bytes per image of both forms, the
pixels that differ, and mIoU of both against the masks.

    .venv/bin/python benchmarks/cam_storage.py --config params/msrc.yaml --run-dir runs/msrc --against uint8
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wsss_core.cam_maps import CamResult


def npz_bytes(arrays: dict[str, np.ndarray]) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer().nbytes


def other_form(cam: "CamResult", against: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(full-size maps, stride-4 maps, file bytes) of `cam` held the other way."""
    if against == "uint8":
        small = cam.stored("uint8")
        return small.high_res, small.cam, npz_bytes(small.to_npz_dict())
    old = {"keys": cam.keys, "cam": cam.cam.astype(np.float16), "high_res": cam.high_res.astype(np.float16)}
    return old["high_res"].astype(np.float32), old["cam"].astype(np.float32), npz_bytes(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--against", choices=("uint8", "float16-full"), default="uint8")
    args = ap.parse_args()

    from wsss_core.artifacts import BOUNDARY_MAPS, CAMS, CONFIDENT_LABELS, PSEUDO_MASKS
    from wsss_core.config import load_config
    from wsss_core.crf import confident_labels, refined_mask
    from wsss_core.metrics import ConfusionMatrix
    from wsss_core.stages import open_run
    from wsss_core.stages.inputs import dataset, stage_images
    from wsss_core.stages.pseudo_masks import refine_crf, walk

    cfg = load_config(args.config)
    run = open_run(args.run_dir, cfg)
    for name in ("crf", "pseudo_masks"):
        if not run.is_done(name):
            sys.exit(f"cam_storage: {run.folder(name)} is not done: {run.why_not_done(name)}")
    if cfg.cams.storage != "float32":
        sys.exit(f"cam_storage: {args.run_dir} stores its CAMs as {cfg.cams.storage}; compare from a float32 run")
    ds = dataset(cfg)
    images, ids = stage_images(cfg, run, cfg.cams.split)
    masks = ds.masks(cfg.cams.split)
    p, refine = cfg.pseudo_masks, refine_crf(cfg)
    run_bytes = other_bytes = 0
    crf_diff = pm_diff = pixels = 0
    labelled = ConfusionMatrix(ds.num_classes), ConfusionMatrix(ds.num_classes)  # confident labels: run, other
    pm = ConfusionMatrix(ds.num_classes), ConfusionMatrix(ds.num_classes)  # pseudo masks: run, other
    for n, sid in enumerate(ids, 1):
        cam = CAMS.read(run, sid)
        high_res, stride4, size = other_form(cam, args.against)
        other_bytes += size
        run_bytes += CAMS.path(run, sid).stat().st_size
        image, gt = images.image(sid), masks.mask(sid)
        run_labels = CONFIDENT_LABELS.read(run, sid)
        other_labels = confident_labels(image, high_res, cam.keys, cfg.crf)
        crf_diff += int((run_labels != other_labels).sum())
        for cm, lab in zip(labelled, (run_labels, other_labels)):
            cm.update(lab, np.where(lab == 255, 255, gt).astype(np.uint8))
        other_mask = walk(p, stride4, cam.keys, BOUNDARY_MAPS.read(run, sid), gt.shape)[1]
        if refine is not None:
            other_mask = refined_mask(image, other_mask, cam.keys, refine)
        run_mask = PSEUDO_MASKS.read(run, sid)
        pm_diff += int((run_mask != other_mask).sum())
        for cm, m in zip(pm, (run_mask, other_mask)):
            cm.update(m, gt)
        pixels += gt.size
        if n % 50 == 0:
            print(f"  {n}/{len(ids)}", file=sys.stderr, flush=True)
    k = len(ids)
    print(f"images: {k}, pixels: {pixels}, against: {args.against}")
    print(f"CAM file bytes per image: run (float32) {run_bytes / k:,.0f}, {args.against} {other_bytes / k:,.0f}")
    print(f"confident CRF labels: {crf_diff} of {pixels} pixels differ; mIoU on labelled pixels "
          f"run {100 * labelled[0].miou():.2f}, {args.against} {100 * labelled[1].miou():.2f}")
    print(f"pseudo masks{' (CRF-refined)' if refine else ''}: {pm_diff} of {pixels} pixels differ; "
          f"mIoU run {100 * pm[0].miou():.2f}, {args.against} {100 * pm[1].miou():.2f}")


if __name__ == "__main__":
    main()
