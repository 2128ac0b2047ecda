"""Training, saving and loading a multi-label image classifier: the recipe
shared by step 1's classifier and the missing-label filter (`label_filter`).

Trained on image-level labels only, optionally without some classes
(`exclude_classes`) and with balanced sampling, by the one fit loop.
The network itself is `models.MultiLabelClassifier`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ClassifierConfig, ConfigError
from .data.sampling import sample_weights
from .data.transforms import LabelledTensors, eval_transform, train_transform
from .metrics import classification_scores
from .runtime import loader_workers, seed_everything
from .store import FileError, read_torch, save_torch
from .train import FitConfig, FitResult, fit, predict


# --------------------------------------------------------------------------- checks
def check_classifier_params(cfg: ClassifierConfig, classes: Sequence[str], key: str = "classifier") -> None:
    """Fail before any work on an unknown backbone, a missing weights file or an
    excluded class that is not in the class list."""
    from .models import BACKBONES

    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"{key}.backbone: unknown backbone {cfg.backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    unknown = [c for c in cfg.exclude_classes if c not in classes[1:]]
    if unknown:
        raise ConfigError(
            f"{key}.exclude_classes: {', '.join(map(repr, unknown))} not in the class list ({', '.join(classes[1:])})"
        )
    if len(cfg.exclude_classes) >= len(classes) - 1:
        raise ConfigError(f"{key}.exclude_classes: excludes every class; nothing left to train")


def trained_class_ids(classes: Sequence[str], exclude: Sequence[str]) -> list[int]:
    """1-based dataset class ids the classifier predicts, in head order."""
    return [k for k in range(1, len(classes)) if classes[k] not in set(exclude)]


def multilabel_loss(kind: str, recam_weight: float = 0.0):
    """Batch loss `(model, (x, y, idx)) -> scalar` for multi-label targets, plus
    `recam_weight` times ReCAM's `recam_loss` when it is > 0."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if recam_weight > 0:
            logits, reactivated = model(x, recam=True)
        else:
            logits, reactivated = model(x), None
        logits = logits.float()
        if kind == "bce":
            total = F.binary_cross_entropy_with_logits(logits, y)
        else:
            total = F.multilabel_soft_margin_loss(logits, y)
        if reactivated is not None:
            total = total + recam_weight * recam_loss(reactivated.float(), y)
        return total

    return loss


def recam_loss(reactivated: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ReCAM's softmax cross-entropy: for each image, the mean over its labelled
    classes k of CE(row k of `reactivated` (B, N, N), target k), summed over the
    batch and divided by its size (an image without labels adds 0)."""
    per_class = -torch.diagonal(F.log_softmax(reactivated, dim=-1), dim1=1, dim2=2)  # (B, N): -log p_k(row k)
    positive = (y > 0.5).to(per_class.dtype)
    per_image = (per_class * positive).sum(1) / positive.sum(1).clamp(min=1)
    return per_image.sum() / y.shape[0]


# --------------------------------------------------------------------------- classifier
@dataclass
class TrainedClassifier:
    model: nn.Module
    class_ids: list[int]
    meta: dict[str, Any]


def classifier_datasets(cfg: ClassifierConfig, model: nn.Module, images, val_images, columns, seed: int):
    """Training (augmented) and evaluation tensors for `images` / `val_images`,
    normalised the way the model's backbone expects."""
    mean, std = model.backbone.normalization
    train = LabelledTensors(images, train_transform(cfg.image_size, cfg.augment, mean, std), columns, seed)
    val = None
    if val_images is not None and len(val_images):
        val = LabelledTensors(val_images, eval_transform(cfg.image_size, mean, std), columns, seed)
    return train, val


def train_multilabel(
    cfg: ClassifierConfig,
    images,
    val_images,
    columns: Sequence[int],
    class_names: Sequence[str],
    out_dir: Path,
    device: torch.device,
    seed: int,
    epochs: int | None = None,
    lr: float | None = None,
    desc: str = "classifier",
    stop_after_epochs: int | None = None,
) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """Train a GAP + linear multi-label classifier on `images` (LabelledImages)
    predicting the label `columns`; returns (model, val scores, history)."""
    from .models import build_classifier, param_groups

    seed_everything(seed)  # the new head's initialisation is part of the run
    model = build_classifier(cfg, len(columns))
    train_ds, val_ds = classifier_datasets(cfg, model, images, val_images, columns, seed)
    weights = sample_weights(np.asarray(images.labels)[:, list(columns)], cfg.balance, cfg.repeat_threshold)

    def evaluate(m: nn.Module) -> dict[str, Any]:
        if val_ds is None:
            return {}
        scores = predict(m, val_ds, device, cfg.batch_size, 0, desc="val")
        s = classification_scores(scores, _labels(val_ds), class_names, cfg.eval_threshold)
        return {"val_map": s["map"], "val_f1_macro": s["f1_macro"]}

    lr = cfg.lr if lr is None else lr
    epochs = cfg.epochs if epochs is None else epochs
    recam_after = cfg.recam_weight > 0 and cfg.recam_epochs > 0  # ReCAM: fine-tune a trained classifier

    def phase(loss, phase_lr: float, phase_epochs: int, schedule: str, phase_desc: str, folder: Path,
              stop_after: int | None):
        return fit(
            model, train_ds, loss, param_groups(model, phase_lr, cfg.backbone_lr_mult, cfg.weight_decay),
            cfg.optimizer, phase_lr, cfg.weight_decay,
            FitConfig(epochs=phase_epochs, batch_size=cfg.batch_size, seed=seed,
                      num_workers=loader_workers(cfg.num_workers, device), amp=cfg.amp, schedule=schedule,
                      step_size=cfg.step_size, gamma=cfg.gamma, desc=phase_desc, stop_after_epochs=stop_after),
            folder, device, sample_weights=weights, eval_fn=evaluate,
        )

    if recam_after:  # unused until the fine-tuning (DistributedDataParallel wants every trained parameter used)
        model.recam_head.requires_grad_(False)
    result = phase(multilabel_loss(cfg.loss, 0.0 if recam_after else cfg.recam_weight), lr, epochs, cfg.schedule,
                   desc, out_dir, stop_after_epochs)
    history = result.history
    if recam_after and (stop_after_epochs is None or stop_after_epochs > epochs):
        model.recam_head.requires_grad_(True)
        stop = None if stop_after_epochs is None else stop_after_epochs - epochs
        tuned = phase(multilabel_loss(cfg.loss, cfg.recam_weight), cfg.recam_lr, cfg.recam_epochs, "poly",
                      f"{desc} (ReCAM)", out_dir / "recam", stop)
        history = history + [h | {"epoch": epochs + h["epoch"], "phase": "recam"} for h in tuned.history]
        resumed = epochs + tuned.resumed_from if tuned.resumed_from else result.resumed_from
        result = FitResult(history, resumed, tuned.samples_per_rank, tuned.param_checksums)
    scores = evaluate_multilabel(cfg, model, val_images, columns, class_names, device, seed)
    extra = {"samples_per_rank": result.samples_per_rank, "param_checksums": result.param_checksums,
             "resumed_from": result.resumed_from}
    return model, scores | {"fit": extra}, history


def evaluate_multilabel(cfg: ClassifierConfig, model: nn.Module, val_images, columns: Sequence[int],
                        class_names: Sequence[str], device: torch.device, seed: int = 0) -> dict[str, Any]:
    """AP / F1 of `model` on `val_images` (plus the raw `val_scores`); {} without val images."""
    _, val_ds = classifier_datasets(cfg, model, [], val_images, columns, seed)
    if val_ds is None:
        return {}
    val_scores = predict(model, val_ds, device, cfg.batch_size, 0, desc="val")
    scores = classification_scores(val_scores, _labels(val_ds), class_names, cfg.eval_threshold)
    scores["val_scores"] = val_scores
    return scores


def _labels(ds: LabelledTensors) -> np.ndarray:
    y = np.asarray(ds.items.labels)
    return y if ds.columns is None else y[:, ds.columns]


def save_classifier(path: Path, model: nn.Module, cfg: ClassifierConfig, class_ids: Sequence[int],
                    classes: Sequence[str]) -> Path:
    """model.pt: weights plus what is needed to rebuild and use the model."""
    return save_torch(path, {
        "state_dict": model.state_dict(),
        "classifier": {"backbone": cfg.backbone, "output_stride": cfg.output_stride, "image_size": cfg.image_size,
                       "recam": getattr(model, "recam_head", None) is not None},
        "class_ids": list(class_ids),
        "classes": list(classes),
        "normalization": [list(v) for v in model.backbone.normalization],
    })


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> TrainedClassifier:
    """Rebuild a saved classifier (no ImageNet weights needed: the state dict has all)."""
    from .models import build_classifier
    from .models.backbone import rebuilding

    blob = read_torch(path, "classifier model")
    if not isinstance(blob, dict) or not {"state_dict", "classifier", "class_ids"} <= set(blob):
        raise FileError(f"{path}: not a saved classifier (rerun the classifier stage)")
    with rebuilding(path, "classifier"):
        c = blob["classifier"]
        cfg = ClassifierConfig(backbone=c["backbone"], output_stride=c["output_stride"], image_size=c["image_size"],
                               weights="random", recam_weight=1.0 if c.get("recam") else 0.0)
        model = build_classifier(cfg, len(blob["class_ids"]))
        model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return TrainedClassifier(model, list(blob["class_ids"]), blob)
