"""The segmenter's speed levers as the pipeline runs them, measured alternately in one process.

Training: one optimizer step of `segmentation.batch_size` crops of
`segmentation.crop_size` cut from real msrc photos, with the config's model
(ImageNet encoder), optimizer, parameter groups and loss: what `train.fit`
does per step. Prediction: `predict.segment` with the config's TTA on a
real photo. Each lever is timed in turn, round after round, and the best
round of each is kept (2 cores drift: ratios, not absolute times, carry over):

- contiguous float32 (NCHW)
- channels-last float32 (what `fit` and `load_segmenter` use)
- channels-last with bfloat16 autocast on the CPU (not a setting: see docs/QUALITY.md)

    .venv/bin/python benchmarks/segmenter_levers.py --config params/msrc.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable

import numpy as np
import torch

from stage_costs import MSRC_PHOTOS as PHOTOS
from stage_costs import load_photo

LEVERS = ("contiguous", "channels-last", "channels-last + bfloat16")


def crops(n: int, size: int, mean: tuple, std: tuple, seed: int = 0) -> torch.Tensor:
    """`n` random `size`-px crops of real photos, normalised as the segmenter's input."""
    rng = np.random.default_rng(seed)
    files = sorted(PHOTOS.glob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"{PHOTOS}: needs {n} photos, found {len(files)}")
    out, side = [], max(320, size)
    for f in files:
        im = load_photo(str(f), (side, side))
        y, x = rng.integers(0, side - size + 1, 2)
        out.append(torch.from_numpy(im[y:y + size, x:x + size].copy()).permute(2, 0, 1).float().div(255))
    x = torch.stack(out)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="params/msrc.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="training steps per lever and round (best kept)")
    ap.add_argument("--image", default=str(PHOTOS / "10_10_s.jpg"), help="the photo predict segments")
    args = ap.parse_args()

    from wsss_core.config import load_config
    from wsss_core.models.segmenter import build_segmenter, pixel_loss
    from wsss_core.predict import segment
    from wsss_core.train import build_optimizer

    cfg = load_config(args.config, {"data.root": "."})
    s, q = cfg.segmentation, cfg.predict
    num_classes = 21  # VOC's: the head's width barely matters to the time
    steps, predicts = {}, {}
    for lever in LEVERS:
        torch.manual_seed(0)
        model = build_segmenter(s.backbone, num_classes, s.output_stride, s.atrous_rates, s.weights)
        mean, std = model.normalization
        layout = torch.contiguous_format if lever == "contiguous" else torch.channels_last
        model.to(memory_format=layout)
        x = crops(s.batch_size, s.crop_size, mean, std).contiguous(memory_format=layout)
        y = torch.randint(0, num_classes, (s.batch_size, s.crop_size, s.crop_size),
                          generator=torch.Generator().manual_seed(0))
        opt = build_optimizer(model.param_groups(s.lr, s.backbone_lr_mult, s.weight_decay), s.optimizer, s.lr,
                              s.weight_decay)

        def autocast(lever=lever):
            return torch.autocast("cpu", dtype=torch.bfloat16) if "bfloat16" in lever else contextlib.nullcontext()

        def step(model=model, opt=opt, x=x, y=y, autocast=autocast):
            model.train()
            with autocast():
                loss = pixel_loss(model, (x, y, None))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        image = load_photo(args.image, (375, 500))

        def predict(model=model, autocast=autocast, image=image):
            model.eval()
            with autocast():
                segment(model, image, q.tta_scales, q.tta_flip, "cpu", q.max_side)

        steps[lever], predicts[lever] = step, predict
        step(), predict()  # warm-up
    best = {k: [float("inf"), float("inf")] for k in LEVERS}
    for r in range(args.rounds):
        for lever in LEVERS:
            best[lever][0] = min(best[lever][0], min(timed(steps[lever]) for _ in range(args.steps)))
            best[lever][1] = min(best[lever][1], timed(predicts[lever]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"{args.config}: {s.backbone} DeepLabV3+, batch {s.batch_size} x {s.crop_size} px, {s.optimizer}; "
          f"predict TTA scales {list(q.tta_scales)} flip {q.tta_flip}; {torch.get_num_threads()} threads, cpu")
    print(f"  {'lever':<26} {'step s/image':>12} {'vs previous':>11} {'predict s/image':>15} {'vs previous':>11}")
    prev = None
    for lever in LEVERS:
        t, p = best[lever][0] / s.batch_size, best[lever][1]
        ratio = "" if prev is None else f"x{prev[0] / t:.2f}"
        pratio = "" if prev is None else f"x{prev[1] / p:.2f}"
        print(f"  {lever:<26} {t:12.4f} {ratio:>11} {p:15.3f} {pratio:>11}")
        prev = (t, p)


if __name__ == "__main__":
    main()
