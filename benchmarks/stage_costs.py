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
Best of `--repeats`, after one warm-up. `StageWork` builds each stage's work
(`benchmarks/pipeline_speed.py` times and counts the same callables).

    .venv/bin/python benchmarks/stage_costs.py --config params/voc2012.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STAGES = ("classifier", "cams", "crf", "boundary", "pseudo_masks", "segmentation", "predict")
TRAINED = ("classifier", "boundary", "segmentation")  # one optimizer step on a batch of crops


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocations, one-off initialisation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


MSRC_PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/msrc-voc/JPEGImages"  # the benchmarks' real photos


def add_arguments(ap: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """The options of the parameter file (required without a default), the photo, the
    classes, the training batch and the repeats."""
    ap.add_argument("--config", required=default_config is None, default=default_config)
    ap.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    ap.add_argument("--image", default=str(MSRC_PHOTOS / "10_10_s.jpg"),
                    help="a photo, resized to --size (default: an msrc photo)")
    ap.add_argument("--classes", type=int, default=2, help="labelled classes of the photo")
    ap.add_argument("--num-classes", type=int, default=21, help="classes of the dataset (with background)")
    ap.add_argument("--batch", type=int, default=2, help="crops per training step measured")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers here")


def load_photo(path: str, size: tuple[int, int]) -> np.ndarray:
    """The photo (H, W, 3) uint8 resized to `size` (H, W). A real photo: a random one would
    make the CRF's lattice, and its time, many times larger."""
    from PIL import Image

    h, w = size
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))


def label(name: str) -> str:
    """The stage's line in the output: 'classifier step per image', 'cams per image', ..."""
    return f"{name} step per image" if name in TRAINED else f"{name} per image"


class StageWork:
    """Each stage's real work on one photo with a config's models (random weights),
    built on first use; `work(name)` is the stage's callable and the images it does
    per call. Ask for the stages in pipeline order (`STAGES`): a stage's models are
    built when it is first asked for, the later stages reuse them."""

    def __init__(self, cfg: Any, image: np.ndarray, classes: int = 2, num_classes: int = 21, batch: int = 2,
                 device: torch.device | str = "cpu"):
        self.cfg, self.image, self.num_classes, self.batch = cfg, image, num_classes, batch
        self.device = torch.device(device)
        self.g = torch.Generator().manual_seed(0)
        self.x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).sub(0.45).div(0.225)
        self.keys = np.arange(1, classes + 1)
        self._built: dict[str, Any] = {}

    def _once(self, what: str, make: Callable[[], Any]) -> Any:
        if what not in self._built:
            self._built[what] = make()
        return self._built[what]

    def _step(self, model: torch.nn.Module, params, loss_fn, batch: tuple) -> Callable[[], object]:
        """One optimizer step (forward, backward, SGD) on `batch`, as `train.fit` takes it:
        channels-last model and image batches."""
        from wsss_core.train import FitConfig, to_device

        opt = torch.optim.SGD(params, lr=1e-6)
        model.train()
        channels_last = FitConfig(epochs=1, batch_size=1).channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        batch = to_device(batch, self.device, channels_last)

        def go() -> object:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            return loss
        return go

    @property
    def classifier(self) -> torch.nn.Module:
        from wsss_core.models.classifier import build_classifier

        c = self.cfg.classifier
        return self._once("classifier", lambda: build_classifier(dataclasses.replace(c, weights="random"),
                                                                 self.num_classes - 1).to(self.device))

    @property
    def cams(self) -> Any:
        """The photo's CAMs (`CamResult`), computed once: the CRF and the walk read them."""
        return self._once("cams", self._cams)

    def _cams(self) -> Any:
        from wsss_core.cam import class_activation_maps

        cm = self.cfg.cams
        self.classifier.eval()
        return class_activation_maps(self.classifier, self.x, self.keys.tolist(), scales=cm.scales, flip=cm.flip,
                                     method=cm.method, normalize=cm.normalize)

    @property
    def boundary_net(self) -> torch.nn.Module:
        from wsss_core.models.boundary import BoundaryNet
        from wsss_core.models.factory import build_backbone

        b = self.cfg.boundary
        return self._once("boundary", lambda: BoundaryNet(build_backbone(b.backbone, "random", b.output_stride),
                                                          stem_input=b.stem_input).to(self.device))

    @property
    def segmenter(self) -> torch.nn.Module:
        from wsss_core.models.segmenter import build_segmenter

        s = self.cfg.segmentation
        return self._once("segmentation", lambda: build_segmenter(s.backbone, self.num_classes, s.output_stride,
                                                                  s.atrous_rates, "random").to(self.device))

    def work(self, name: str) -> tuple[Callable[[], object], int]:
        """(the stage's work as a callable, images it does per call); CUDA work is synchronised."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
        fn, per_call = getattr(self, f"_work_{name}")()
        if self.device.type != "cuda":
            return fn, per_call

        def synced() -> object:
            out = fn()
            torch.cuda.synchronize(self.device)
            return out
        return synced, per_call

    def _work_classifier(self) -> tuple[Callable[[], object], int]:
        from wsss_core.multilabel import multilabel_loss

        c = self.cfg.classifier
        model = self.classifier
        crop = torch.randn(self.batch, 3, c.image_size, c.image_size, generator=self.g)
        labels = torch.zeros(self.batch, self.num_classes - 1)
        labels[:, : len(self.keys)] = 1
        return self._step(model, model.parameters(), multilabel_loss(c.loss), (crop, labels, None)), self.batch

    def _work_cams(self) -> tuple[Callable[[], object], int]:
        return lambda: self._cams().high_res, 1

    def _work_crf(self) -> tuple[Callable[[], object], int]:
        from wsss_core.crf import confident_labels

        cams = self.cams
        return lambda: confident_labels(self.image, cams.high_res, self.keys, self.cfg.crf), 1

    def _work_boundary(self) -> tuple[Callable[[], object], int]:
        from wsss_core.affinity import AffinityTargets, affinity_training_loss

        b = self.cfg.boundary
        model = self.boundary_net
        crop = torch.randn(self.batch, 3, b.crop_size, b.crop_size, generator=self.g)
        lab = torch.randint(0, 3, (b.crop_size, b.crop_size), generator=self.g, dtype=torch.uint8)
        targets = [torch.stack(t) for t in zip(*[AffinityTargets(b.radius)(lab) for _ in range(self.batch)])]
        return self._step(model, model.param_groups(1e-6, 0.0), affinity_training_loss(b.radius),
                          (crop, *targets, None)), self.batch

    def _work_pseudo_masks(self) -> tuple[Callable[[], object], int]:
        from wsss_core.models.boundary import boundary_map
        from wsss_core.stages.pseudo_masks import walk

        p, cams, model = self.cfg.pseudo_masks, self.cams, self.boundary_net
        model.eval()
        return lambda: walk(p, cams.cam, self.keys, boundary_map(model, self.image, self.device, p.flip),
                            self.image.shape[:2]), 1

    def _work_segmentation(self) -> tuple[Callable[[], object], int]:
        from wsss_core.models.segmenter import pixel_loss

        s = self.cfg.segmentation
        model = self.segmenter
        crop = torch.randn(self.batch, 3, s.crop_size, s.crop_size, generator=self.g)
        mask = torch.randint(0, self.num_classes, (self.batch, s.crop_size, s.crop_size), generator=self.g)
        return self._step(model, model.parameters(), pixel_loss, (crop, mask, None)), self.batch

    def _work_predict(self) -> tuple[Callable[[], object], int]:
        from wsss_core.predict import segment

        q, model = self.cfg.predict, self.segmenter
        model.to(memory_format=torch.channels_last).eval()  # as `load_segmenter` gives it
        return lambda: segment(model, self.image, q.tta_scales, q.tta_flip, self.device, q.max_side), 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args()

    from wsss_core.config import load_config

    cfg = load_config(args.config, {"data.root": "."})  # the data is not read: a preset's $ROOT may be unset
    h, w = args.size
    work = StageWork(cfg, load_photo(args.image, (h, w)), args.classes, args.num_classes, args.batch)
    out: dict[str, float] = {}
    for name in STAGES:
        fn, per_call = work.work(name)
        out[label(name)] = best_seconds(fn, args.repeats) / per_call
    print(f"{args.config}: {h}x{w} photo, {args.classes} classes, {torch.get_num_threads()} threads, cpu")
    for k, v in out.items():
        print(f"  {k:<30} {v:8.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
