"""Do the training loaders keep up with the models? (msrc photos, this machine)

For the classifier and the segmenter of a parameter file, measured in one
process, alternately, best of --repeats:
- decoding: PIL (what the image reader uses) against torchvision.io.decode_jpeg,
  one image at a time and as one batched call;
- the loader: training items per second from one process (the dataset's
  read + decode + augment + to-tensor, as a loader worker does it);
- the model: images per second of forward + backward + optimizer step at the
  configured batch and crop.
The last lines give loader / model for each: above 1 the loader keeps up
with one worker; below 1, num_workers of about model / loader are needed.

    .venv/bin/python benchmarks/loader.py --config params/msrc.yaml
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Callable

import numpy as np
import torch


def best_rate(fn: Callable[[], int], repeats: int) -> float:
    """Items per second of `fn` (which returns how many it did), best of `repeats`."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="params/msrc.yaml")
    ap.add_argument("--items", type=int, default=64, help="loader items per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from wsss_core.config import load_config
    from wsss_core.data import open_dataset
    from wsss_core.data.transforms import JointTensors, LabelledTensors, joint_train_transform, train_transform
    from wsss_core.models.classifier import build_classifier
    from wsss_core.models.segmenter import build_segmenter, pixel_loss
    from wsss_core.multilabel import multilabel_loss
    from wsss_core.stages.segmentation import _MaskPairs

    cfg = load_config(args.config)
    ds = open_dataset(cfg.data, validate=False)
    split = cfg.data.train_split
    images = ds.labelled(split)
    files = [images.image_path(i) for i in images.ids[:100]]
    raw = [open(f, "rb").read() for f in files]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]

    def pil() -> int:
        for b in raw:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        return len(raw)

    def tv_one() -> int:
        for t in tensors:
            decode_jpeg(t, mode=ImageReadMode.RGB)
        return len(tensors)

    def tv_batch() -> int:
        decode_jpeg(tensors, mode=ImageReadMode.RGB)
        return len(tensors)

    c, s = cfg.classifier, cfg.segmentation
    classifier = build_classifier(c, ds.num_classes - 1)
    segmenter = build_segmenter(s.backbone, ds.num_classes, s.output_stride, s.atrous_rates, "random")
    cls_items = LabelledTensors(images, train_transform(c.image_size, c.augment, *classifier.backbone.normalization))
    seg_items = JointTensors(_MaskPairs(ds.masks(split), ds.ids(split)),
                             joint_train_transform(s.crop_size, s.augment, *segmenter.normalization))

    def loader(items) -> Callable[[], int]:
        def go() -> int:
            n = min(args.items, len(items))
            for i in range(n):
                items[i]
            return n
        return go

    def step(model, items, batch: int, loss_fn) -> Callable[[], int]:
        data = torch.utils.data.default_collate([items[i] for i in range(batch)])
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        model.train()

        def go() -> int:
            opt.zero_grad()
            loss_fn(model, data).backward()
            opt.step()
            return batch
        return go

    measures = {
        "decode PIL": pil, "decode torchvision": tv_one, "decode torchvision batched": tv_batch,
        "classifier loader": loader(cls_items),
        "classifier step": step(classifier, cls_items, c.batch_size, multilabel_loss(c.loss)),
        "segmenter loader": loader(seg_items),
        "segmenter step": step(segmenter, seg_items, s.batch_size, pixel_loss),
    }
    rates = {k: 0.0 for k in measures}
    for _ in range(args.repeats):  # alternately: drift on a shared machine hits every measure alike
        for k, fn in measures.items():
            rates[k] = max(rates[k], best_rate(fn, 1))
    print(f"threads: {torch.get_num_threads()}, device: cpu, {len(raw)} photos of {args.config} for decoding")
    for k, r in rates.items():
        print(f"{k:<28} {r:9.1f} images/s")
    print(f"decode: torchvision / PIL x{rates['decode torchvision'] / rates['decode PIL']:.2f} "
          f"(batched x{rates['decode torchvision batched'] / rates['decode PIL']:.2f})")
    for what in ("classifier", "segmenter"):
        print(f"{what}: loader / model x{rates[f'{what} loader'] / rates[f'{what} step']:.1f} "
              f"(one loader process per {rates[f'{what} loader'] / rates[f'{what} step']:.0f} of this machine's "
              "training throughput)")


if __name__ == "__main__":
    main()
