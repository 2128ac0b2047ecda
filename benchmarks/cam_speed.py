"""CAM extraction speed: ours against pytorch-grad-cam, in one process, on the
same classifier and the same MSRC images, 4 scales x flip.

Settings: the classes each image is labelled with, and all classes. The
peer needs one call per class, scale and flip; we do one batched pass per
scale. The floor is the bare forward passes (same scales and flips, no CAM
work). Outputs are checked equal: each of the peer's maps against our
single-scale map after the peer's own resize + min-max normalisation.

    .venv/bin/python benchmarks/cam_speed.py [--model runs/msrc/01_classifier/model.pt] [--images 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.cam import class_activation_maps, raw_cams, scaled_size
from wsss_core.multilabel import load_classifier
from wsss_core.config import ClassifierConfig, DataConfig
from wsss_core.data import open_dataset
from wsss_core.data.transforms import to_normalized_tensor
from wsss_core.models import build_classifier

REPO = Path(__file__).resolve().parent.parent  # for the default --data folder (../shared next to the repository)
SCALES = (1.0, 0.5, 0.75, 2.0)


def scaled_inputs(x: torch.Tensor, flip: bool = True) -> list[torch.Tensor]:
    """The (1,3,h,w) inputs the peer is called on: every scale, then its flip."""
    h, w = x.shape[-2:]
    out = []
    for s in SCALES:
        xs = F.interpolate(x[None], size=scaled_size(h, w, s), mode="bilinear", align_corners=False)
        out += [xs, xs.flip(-1)] if flip else [xs]
    return out


def run_ours(model, xs, classes, head_ids) -> float:
    t0 = time.perf_counter()
    for x, ids in zip(xs, classes):
        class_activation_maps(model, x, ids, scales=SCALES, flip=True, method="gradcam", head_class_ids=head_ids)
    return time.perf_counter() - t0


def run_floor(model, xs) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in xs:
            h, w = x.shape[-2:]
            for s in SCALES:
                xs_ = F.interpolate(x[None], size=scaled_size(h, w, s), mode="bilinear", align_corners=False)
                model(torch.cat([xs_, xs_.flip(-1)]))
    return time.perf_counter() - t0


def run_peer(model, xs, classes, head_ids, keep: list | None = None) -> float:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[model.cam_layer])
    t0 = time.perf_counter()
    for n, (x, ids) in enumerate(zip(xs, classes)):
        for inp in scaled_inputs(x):
            for k in ids:
                out = cam(input_tensor=inp, targets=[ClassifierOutputTarget(head_ids.index(k))])
                if keep is not None:
                    keep.append((n, inp, k, out[0]))
    return time.perf_counter() - t0


def max_difference(model, peer_maps, head_ids) -> float:
    """Largest |ours - peer| over all the peer's maps, after the peer's own post-processing."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    worst = 0.0
    for _, inp, k, peer in peer_maps:
        ours = raw_cams(model, inp, [k], head_class_ids=head_ids)[0].detach().cpu().numpy()
        h, w = inp.shape[-2:]
        ours = scale_cam_image(np.maximum(scale_cam_image(ours, (w, h)), 0))[0]
        worst = max(worst, float(np.abs(ours - peer).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a trained model.pt (default: ImageNet backbone + new head)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "msrc-voc"))
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ds = open_dataset(DataConfig(format="voc", root=args.data), validate=False)
    images = ds.labelled("train")
    if args.model:
        trained = load_classifier(args.model)
        model, head_ids = trained.model, trained.class_ids
        mean, std = trained.meta["normalization"]
    else:
        model = build_classifier(ClassifierConfig(), ds.num_classes - 1).eval()
        head_ids = list(range(1, ds.num_classes))
        mean, std = model.backbone.normalization
    labelled = [i for i in range(len(images)) if images.labels[i].any()][: args.images]
    xs = [to_normalized_tensor(images[i][0], mean, std) for i in labelled]
    settings = {
        "labelled classes": [[k for k in head_ids if images.labels[i][k - 1] > 0.5] for i in labelled],
        f"all {len(head_ids)} classes": [list(head_ids)] * len(labelled),
    }
    n = len(xs)
    print(f"{n} MSRC images (about {xs[0].shape[-1]}x{xs[0].shape[-2]}), scales {SCALES} x flip, "
          f"{torch.get_num_threads()} threads, model {'trained' if args.model else 'ImageNet backbone + new head'}")
    run_ours(model, xs[:2], settings["labelled classes"][:2], head_ids)  # warm-up
    run_floor(model, xs[:2])
    for name, classes in settings.items():
        # floor and ours alternate, best of 3 each: both see the same machine state
        floor, ours = float("inf"), float("inf")
        for _ in range(3):
            floor = min(floor, run_floor(model, xs))
            ours = min(ours, run_ours(model, xs, classes, head_ids))
        kept: list = []
        peer_n = 5 if name.startswith("all") else n  # the peer needs minutes for all classes
        peer_per_image = run_peer(model, xs[:peer_n], classes, head_ids, kept) / peer_n
        diff = max_difference(model, kept, head_ids)
        print(f"[{name}] floor {n / floor:6.2f} images/s | ours {n / ours:6.2f} images/s | "
              f"pytorch-grad-cam {1 / peer_per_image:6.3f} images/s (on {peer_n} images) | "
              f"ours / peer speed {peer_per_image / (ours / n):5.1f}x | ours / floor time {ours / floor:4.2f}x | "
              f"max |ours - peer| {diff:.2e} over {len(kept)} maps")


if __name__ == "__main__":
    main()
