"""Seconds per image of each stage's work for a parameter file's models, on
this machine, without the dataset: the numbers `docs/SCALING.md` multiplies
out for VOC 2012 and LID.

Random weights and a real photo resized to 500x375 (`--size`) with `--classes`
labelled classes; the real code of every stage, one image at a time:
- classifier, boundary, segmentation(s): one optimizer step on a batch of
  `--batch` crops of the configured size (per image = step / batch);
  x epochs is that stage's training time per train image;
- cams: `class_activation_maps` at the configured scales, flip and method;
- crf: `confident_labels` (both CRFs of IRNet's confident labels);
- pseudo_masks: the boundary map (with flip) and the random walk;
- predict: `segment` with the configured test-time augmentation.
Best of `--repeats`, after one warm-up.

    .venv/bin/python benchmarks/stage_costs.py --config params/voc2012.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocations, one-off initialisation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    ap.add_argument("--image", default=str(Path(__file__).resolve().parents[2] / "shared/data/msrc-voc/JPEGImages/10_10_s.jpg"),
                    help="a photo, resized to --size (default: an msrc photo)")
    ap.add_argument("--classes", type=int, default=2, help="labelled classes of the photo")
    ap.add_argument("--num-classes", type=int, default=21, help="classes of the dataset (with background)")
    ap.add_argument("--batch", type=int, default=2, help="crops per training step measured")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    from wsss_core.affinity import AffinityTargets, affinity_training_loss
    from wsss_core.cam import class_activation_maps
    from wsss_core.config import load_config
    from wsss_core.crf import confident_labels
    from wsss_core.models.boundary import BoundaryNet, boundary_map
    from wsss_core.models.classifier import build_classifier
    from wsss_core.models.factory import build_backbone
    from wsss_core.models.segmenter import build_segmenter, pixel_loss
    from wsss_core.multilabel import multilabel_loss
    from wsss_core.predict import segment
    from wsss_core.stages.pseudo_masks import walk

    cfg = load_config(args.config, {"data.root": "."})  # the data is not read: a preset's $ROOT may be unset
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    from PIL import Image

    # a real photo (a random one would make the CRF's lattice, and its time, many times larger)
    with Image.open(args.image) as im:
        image = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).sub(0.45).div(0.225)
    keys = np.arange(1, args.classes + 1)
    cpu = torch.device("cpu")
    out: dict[str, float] = {}

    def train_step(model: torch.nn.Module, params, loss_fn, batch) -> Callable[[], object]:
        opt = torch.optim.SGD(params, lr=1e-6)
        model.train()

        def go() -> object:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            return loss
        return go

    c = cfg.classifier
    classifier = build_classifier(dataclasses.replace(c, weights="random"), args.num_classes - 1)
    crop = torch.randn(args.batch, 3, c.image_size, c.image_size, generator=g)
    labels = torch.zeros(args.batch, args.num_classes - 1)
    labels[:, : args.classes] = 1
    step = train_step(classifier, classifier.parameters(), multilabel_loss(c.loss), (crop, labels, None))
    out["classifier step per image"] = best_seconds(step, args.repeats) / args.batch
    classifier.eval()
    cm = cfg.cams
    cams = class_activation_maps(classifier, x, keys.tolist(), scales=cm.scales, flip=cm.flip, method=cm.method,
                                 normalize=cm.normalize)
    out["cams per image"] = best_seconds(lambda: class_activation_maps(
        classifier, x, keys.tolist(), scales=cm.scales, flip=cm.flip, method=cm.method, normalize=cm.normalize
    ).high_res, args.repeats)
    out["crf per image"] = best_seconds(lambda: confident_labels(image, cams.high_res, keys, cfg.crf), args.repeats)

    b = cfg.boundary
    bnet = BoundaryNet(build_backbone(b.backbone, "random", b.output_stride), stem_input=b.stem_input)
    bcrop = torch.randn(args.batch, 3, b.crop_size, b.crop_size, generator=g)
    lab = torch.randint(0, 3, (b.crop_size, b.crop_size), generator=g, dtype=torch.uint8)
    targets = [torch.stack(t) for t in zip(*[AffinityTargets(b.radius)(lab) for _ in range(args.batch)])]
    step = train_step(bnet, bnet.param_groups(1e-6, 0.0), affinity_training_loss(b.radius), (bcrop, *targets, None))
    out["boundary step per image"] = best_seconds(step, args.repeats) / args.batch
    bnet.eval()
    p = cfg.pseudo_masks

    def walked() -> object:
        return walk(p, cams.cam, keys, boundary_map(bnet, image, cpu, p.flip), (h, w))
    out["pseudo_masks per image"] = best_seconds(walked, args.repeats)

    s = cfg.segmentation
    seg = build_segmenter(s.backbone, args.num_classes, s.output_stride, s.atrous_rates, "random")
    scrop = torch.randn(args.batch, 3, s.crop_size, s.crop_size, generator=g)
    smask = torch.randint(0, args.num_classes, (args.batch, s.crop_size, s.crop_size), generator=g)
    step = train_step(seg, seg.parameters(), pixel_loss, (scrop, smask, None))
    out["segmentation step per image"] = best_seconds(step, args.repeats) / args.batch
    seg.eval()
    q = cfg.predict
    out["predict per image"] = best_seconds(lambda: segment(seg, image, q.tta_scales, q.tta_flip, cpu, q.max_side),
                                            args.repeats)
    print(f"{args.config}: {h}x{w} photo, {args.classes} classes, {torch.get_num_threads()} threads, cpu")
    for k, v in out.items():
        print(f"  {k:<30} {v:8.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
