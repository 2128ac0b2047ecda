"""CAM files before and after they held the per-scale maps.

Until cams stage version 2 a CAM file held the stride-4 and the full-size maps
as float16; now it holds the per-scale maps at feature resolution (float32)
and the reader makes both maps from them. The old files' maps were exactly
the new maps rounded to float16 (the same float32 sums), so this script
rebuilds them from a finished run and redoes, for every train image, the
confident CRF labels and the pseudo masks from the old maps (with the stored
boundary maps), then prints: bytes per image of both formats (and for a
500x375 photo), the pixels that differ, and mIoU of both against the masks.

    .venv/bin/python benchmarks/cam_storage.py --config params/msrc.yaml --run-dir runs/msrc
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np


def npz_bytes(arrays: dict[str, np.ndarray]) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer().nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args()

    from wsss_core.artifacts import BOUNDARY_MAPS, CAMS, IR_LABELS, PSEUDO_MASKS
    from wsss_core.config import load_config
    from wsss_core.crf import confident_labels
    from wsss_core.metrics import ConfusionMatrix
    from wsss_core.random_walk import pseudo_mask, random_walk
    from wsss_core.stages import open_run
    from wsss_core.stages.inputs import dataset, stage_images

    cfg = load_config(args.config)
    run = open_run(args.run_dir, cfg)
    for name in ("crf", "pseudo_masks"):
        if not run.is_done(name):
            sys.exit(f"cam_storage: {run.folder(name)} is not done: {run.why_not_done(name)}")
    ds = dataset(cfg)
    images, ids = stage_images(cfg, run, cfg.cams.split)
    masks = ds.masks(cfg.cams.split)
    p = cfg.pseudo_masks
    old_bytes = new_bytes = 0
    crf_diff = pm_diff = pixels = 0
    labelled = ConfusionMatrix(ds.num_classes), ConfusionMatrix(ds.num_classes)  # confident labels: new, old
    pm = ConfusionMatrix(ds.num_classes), ConfusionMatrix(ds.num_classes)  # pseudo masks: new, old
    for n, sid in enumerate(ids, 1):
        cam = CAMS.read(run, sid)
        old = {"keys": cam.keys, "cam": cam.cam.astype(np.float16), "high_res": cam.high_res.astype(np.float16)}
        old_bytes += npz_bytes(old)
        new_bytes += CAMS.path(run, sid).stat().st_size
        image, gt = images.image(images.position(sid)), masks.mask(sid)
        new_labels = IR_LABELS.read(run, sid)
        old_labels = confident_labels(image, old["high_res"].astype(np.float32), cam.keys, cfg.crf)
        crf_diff += int((new_labels != old_labels).sum())
        for cm, lab in zip(labelled, (new_labels, old_labels)):
            cm.update(lab, np.where(lab == 255, 255, gt).astype(np.uint8))
        rw = random_walk(old["cam"].astype(np.float32), BOUNDARY_MAPS.read(run, sid), p.radius, p.beta, p.exp_times)
        old_mask = pseudo_mask(rw, cam.keys, gt.shape, p.sem_seg_bg_thres)
        new_mask = PSEUDO_MASKS.read(run, sid)
        pm_diff += int((new_mask != old_mask).sum())
        for cm, m in zip(pm, (new_mask, old_mask)):
            cm.update(m, gt)
        pixels += gt.size
        if n % 50 == 0:
            print(f"  {n}/{len(ids)}", file=sys.stderr, flush=True)
    k = len(ids)
    print(f"images: {k}, pixels: {pixels}")
    print(f"CAM file bytes per image: before {old_bytes / k:,.0f}, after {new_bytes / k:,.0f} "
          f"(x{old_bytes / new_bytes:.1f} smaller)")
    h, w, classes = 375, 500, 2
    before = npz_bytes({"keys": np.zeros(classes, np.int64), "cam": np.zeros((classes, 94, 125), np.float16),
                        "high_res": np.zeros((classes, h, w), np.float16)})
    print(f"a 500x375 photo with {classes} classes: before {before:,} bytes (see tests/test_cam.py for after)")
    print(f"confident CRF labels: {crf_diff} of {pixels} pixels differ; mIoU on labelled pixels "
          f"before {100 * labelled[1].miou():.2f}, after {100 * labelled[0].miou():.2f}")
    print(f"pseudo masks: {pm_diff} of {pixels} pixels differ; mIoU before {100 * pm[1].miou():.2f}, "
          f"after {100 * pm[0].miou():.2f}")


if __name__ == "__main__":
    main()
