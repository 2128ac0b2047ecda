"""Stages `segmentation` (06_segmentation) and `bound`
(06_bound): step 3's DeepLabV3+ (smp) trained on the pseudo masks
of the kept train images, and, when `segmentation.bound` is on, the same
network, settings and images trained on the real masks: the fully supervised
bound that says how close the weak labels come (weak / bound). The bound may
train longer (`segmentation.bound_epochs`): exact masks keep teaching
after pseudo masks stop.

Recipe: pixel cross-entropy ignoring 255, SGD with the head at 10x the
encoder's lr (backbone_lr_mult 0.1), poly schedule, joint image / mask
augmentation (rescale, flip, crop, colour), the one fit loop (resume, DDP,
AMP on CUDA). Val mIoU against the real masks after every `val_every`-th
epoch and the last (evaluation only); the last or the best evaluated epoch is
kept (`segmentation.checkpoint`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import runtime
from ..artifacts import (CONFIDENT_LABELS, PSEUDO_MASKS, WALK_MASKS, model_path, read_best_weights, read_history,
                         read_kept_ids, write_best_weights)
from ..config import Config, ConfigError, SegmentationConfig
from ..data.pairs import ImagesWithLabels
from ..metrics import ConfusionMatrix, segmentation_scores
from ..store import Run, StageResult
from ..trained import fit_or_load
from .inputs import check_split, dataset
from .registry import register

if TYPE_CHECKING:
    import torch

    from ..models.segmenter import Segmenter


def check_segmentation(cfg: Config, ds: Any) -> None:
    check_split(cfg, ds, "data.val_split", cfg.data.val_split)
    if cfg.segmentation.bound and not ds.has_masks(cfg.data.train_split):
        raise ConfigError(f"segmentation.bound: split {cfg.data.train_split!r} has no masks to train the "
                          "fully supervised bound on (set it to false)")


def val_miou(model: Segmenter, ds: Any, split: str, device: torch.device) -> dict[str, Any]:
    """Single-scale val scores against the real masks (evaluation only)."""
    from ..predict import segment

    masks = ds.masks(split)
    cm = ConfusionMatrix(ds.num_classes)
    model.eval()
    for i in ds.ids(split):
        cm.update(segment(model, masks.image(i), (1.0,), False, device), masks.mask(i))
    return segmentation_scores(cm, ds.classes)


class _MaskPairs:
    """(image, real mask) of the given ids: the upper bound's training labels."""

    def __init__(self, masks: Any, ids: list[str]):
        self.masks, self.ids = masks, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.masks.image(self.ids[i]), self.masks.mask(self.ids[i])


class _AgreedPseudoMasks(ImagesWithLabels):
    """(image, pseudo mask) with 255 where the walk's mask before the CRF (when
    a CRF refined it, pseudo_masks' own walk/) or the confident labels (crf,
    two stages up: a crf redone alone makes the stage refuse, `check_upstream`)
    disagree with the pseudo mask (`segmentation.ignore_disagreement`)."""

    def __init__(self, images: Any, ids: list[str], run: Run, refined: bool):
        super().__init__(images, ids, lambda sid: PSEUDO_MASKS.read(run, sid))
        self.run, self.refined = run, refined

    def labels(self, sid: str) -> np.ndarray:
        from ..random_walk import agreed_labels

        mask = PSEUDO_MASKS.read(self.run, sid)
        for art in (CONFIDENT_LABELS, WALK_MASKS) if self.refined else (CONFIDENT_LABELS,):
            other = art.read(self.run, sid)
            if other.shape != mask.shape:  # name the files
                raise ValueError(f"{art.path(self.run, sid)}: {other.shape[1]}x{other.shape[0]} label map, but the "
                                 f"pseudo mask {PSEUDO_MASKS.path(self.run, sid)} is {mask.shape[1]}x{mask.shape[0]}")
            mask = agreed_labels(mask, other)
        return mask

    def ignored_share(self) -> float:
        """Share of the training pixels left out (255) by the disagreement rule."""
        ignored = total = 0
        for sid in self.ids:
            lab = self.labels(sid)
            ignored += int((lab == 255).sum())
            total += lab.size
        return ignored / max(total, 1)


def weak_training_pairs(cfg: Config, run: Run, ids: list[str]) -> ImagesWithLabels:
    """(image, label map) the weak segmenter trains on: the pseudo masks, with
    the disagreement pixels ignored when `segmentation.ignore_disagreement`."""
    images = dataset(cfg).labelled(cfg.data.train_split)
    if cfg.segmentation.ignore_disagreement:
        return _AgreedPseudoMasks(images, ids, run, cfg.pseudo_masks.crf_gt_prob is not None)
    return ImagesWithLabels(images, ids, lambda sid: PSEUDO_MASKS.read(run, sid))


def weak_training_examples(cfg: Config, run: Run, ids: list[str]) -> list[list[tuple[str, np.ndarray]]]:
    """Per train image: the image, its pseudo mask and what the weak segmenter
    trains on (ignored pixels in the void colour), for pictures."""
    pairs = weak_training_pairs(cfg, run, ids)
    rows = []
    for i, sid in enumerate(ids):
        image, target = pairs[i]  # one read of the image and one agreement pass per row
        rows.append([(sid, image), ("pseudo mask", PSEUDO_MASKS.read(run, sid)), ("trained on", target)])
    return rows


def train_segmenter(cfg: Config, run: Run, stage: str, pairs: Any, desc: str, epochs: int) -> dict[str, Any]:
    """Train (or, when its model exists, re-evaluate) the segmenter of `stage` on `pairs` for `epochs`."""
    from ..data.transforms import JointTensors, joint_train_transform
    from ..models.segmenter import build_segmenter, load_segmenter, pixel_loss, save_segmenter
    from ..train import FitConfig, fit

    s = cfg.segmentation
    ds = dataset(cfg)
    device = runtime.resolve_device(cfg.device)
    model_file = model_path(run, stage)
    val = cfg.data.val_split if ds.has_masks(cfg.data.val_split) else None
    best = s.checkpoint == "best"

    def train() -> tuple[Any, list[dict], dict]:
        keep_best = _BestKeeper(run, stage, best)
        seed = cfg.seed_of("segmentation")
        runtime.seed_everything(seed)
        model = build_segmenter(s.backbone, ds.num_classes, s.output_stride, s.atrous_rates, s.weights)
        mean, std = model.normalization
        data = JointTensors(pairs, joint_train_transform(s.crop_size, s.augment, mean, std), seed)
        result = fit(model, data, pixel_loss, model.param_groups(s.lr, s.backbone_lr_mult, s.weight_decay),
                     s.optimizer, s.lr, s.weight_decay,
                     FitConfig(epochs=epochs, batch_size=s.batch_size, seed=seed,
                               num_workers=runtime.loader_workers(s.num_workers, device), amp=s.amp,
                               eval_every=s.val_every, schedule=s.schedule, desc=desc,
                               drop_single_last=True),
                     run.make_folder(stage), device, eval_fn=keep_best.evaluator(lambda m: val_miou(m, ds, val, device))
                     if val else None)
        keep_best.restore(model)
        return model, result.history, {"param_checksums": result.param_checksums}

    t = fit_or_load(run, stage, train,
                    lambda path, model, history: save_segmenter(
                        path, model, {"classes": list(ds.classes), "stage": stage,
                                      "epoch": _BestKeeper.chosen(history, best)}),
                    lambda path: load_segmenter(path, device))
    model, history = t.model, t.history
    checksums = t.fit.get("param_checksums", [])
    metrics: dict[str, Any] = {
        "epochs": len(history),
        "train_images": len(pairs),
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2) if history else None,
        "checkpoint": s.checkpoint,
        "kept_epoch": _BestKeeper.chosen(history, best),
        "world_size": len(checksums),
        "param_checksums": checksums,  # of the last epoch's weights on each process (DDP keeps them equal)
    }
    if run.is_main and val:
        q = val_miou(model, ds, val, device)
        metrics.update({"val_miou": q["miou"], "val_quality": q})
    return metrics


class _BestKeeper:
    """Keeps the weights of the epoch with the best val mIoU (checkpoint: best) in best.pt, with their score,
    so a resumed training knows its best so far."""

    def __init__(self, run: Run, stage: str, active: bool):
        self.run, self.stage, self.active = run, stage, active
        stored = read_best_weights(run, stage) if active else None
        self.best = stored[0] if stored else -1.0
        if stored and self.best < 0:  # a best.pt of before it held its score: the history written then has it
            self.best = max((h.get("val_miou", -1.0) for h in read_history(run, stage) or []), default=-1.0)

    def evaluator(self, score: Callable[[torch.nn.Module], dict]) -> Callable[[torch.nn.Module], dict]:
        def evaluate(model: torch.nn.Module) -> dict:
            miou = score(model)["miou"]
            if self.active and miou > self.best:
                self.best = miou
                write_best_weights(self.run, self.stage, miou, model.state_dict())
            return {"val_miou": miou}

        return evaluate

    def restore(self, model: torch.nn.Module) -> None:
        stored = read_best_weights(self.run, self.stage) if self.active else None
        if stored:
            model.load_state_dict(stored[1])

    @staticmethod
    def chosen(history: list[dict], best: bool) -> int | None:
        if not history:
            return None
        if best and any("val_miou" in h for h in history):
            return int(max(history, key=lambda h: h.get("val_miou", -1.0))["epoch"])
        return int(history[-1]["epoch"])


def _headline(m: dict) -> str:
    if not m.get("enabled", True):
        return "off (segmentation.bound: false)"
    return f"val mIoU {100 * m['val_miou']:.1f}, {m['epochs']} epochs" if "val_miou" in m else f"{m['epochs']} epochs"


@register("segmentation", "06_segmentation", sections=("seed", "segmentation"),
          upstream=("data", "label_filter", "pseudo_masks"), config=SegmentationConfig, notebook="06_segmentation.ipynb",
          check=check_segmentation, headline=_headline,
          ignore=("segmentation.bound", "segmentation.bound_epochs"))
def segmentation_stage(cfg: Config, run: Run) -> StageResult:
    """DeepLabV3+ on the pseudo masks of the kept train images."""
    pairs = weak_training_pairs(cfg, run, read_kept_ids(run))
    ignored = {"ignored_share": round(pairs.ignored_share(), 5)} if isinstance(pairs, _AgreedPseudoMasks) else {}
    metrics = {**train_segmenter(cfg, run, "segmentation", pairs, "segmenter",
                                  cfg.segmentation.epochs), **ignored}
    return StageResult(metrics=metrics, paths={"model": str(model_path(run, "segmentation"))})


@register("bound", "06_bound", sections=("seed", "segmentation"),
          upstream=("data", "label_filter"), notebook="06_segmentation.ipynb", check=check_segmentation,
          headline=_headline, ignore=("segmentation.ignore_disagreement",))
def bound_stage(cfg: Config, run: Run) -> StageResult:
    """The fully supervised bound: the same segmenter on the real masks of the same images."""
    if not cfg.segmentation.bound:
        return StageResult(metrics={"enabled": False})
    ds = dataset(cfg)
    split = cfg.data.train_split
    epochs = cfg.segmentation.bound_epochs or cfg.segmentation.epochs
    metrics = train_segmenter(cfg, run, "bound", _MaskPairs(ds.masks(split), read_kept_ids(run)),
                              "bound", epochs)
    return StageResult(metrics={"enabled": True, **metrics},
                       paths={"model": str(model_path(run, "bound"))})


def segmentation_examples(cfg: Config, run: Run, split: str, ids: list[str]) -> list[list[tuple[str, np.ndarray]]]:
    """Per image: the image, the weak segmenter's prediction (single scale), the
    bound's when trained, and the real mask (evaluation only), for pictures."""
    from ..models.segmenter import load_segmenter
    from ..predict import segment

    ds = dataset(cfg)
    device = runtime.resolve_device(cfg.device)
    nets = [("weak", load_segmenter(model_path(run, "segmentation"), device))]
    if cfg.segmentation.bound and model_path(run, "bound").is_file():
        nets.append(("bound", load_segmenter(model_path(run, "bound"), device)))
    masks = ds.masks(split) if ds.has_masks(split) else None
    images = ds.labelled(split)
    rows = []
    for sid in ids:
        image = images.image(sid)
        row = [(sid, image)] + [(f"{name} segmenter", segment(net, image, (1.0,), False, device))
                                for name, net in nets]
        if masks is not None:
            row.append(("ground truth", masks.mask(sid)))
        rows.append(row)
    return rows
