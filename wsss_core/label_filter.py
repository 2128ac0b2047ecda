"""The NoPeopleAllowed missing-label filter.

Image-level labels miss objects (people present but unlabelled). If such an
image reaches the CAM and pseudo-mask stages, the unlabelled object becomes
background in its pseudo mask. The filter is a binary classifier for one
class, trained only on the images whose labels for it are trusted; it scores
every train image, and an image that is not labelled with the class is kept
only if the filter is confident the class is absent (P(absent) >= threshold).
Images labelled with an excluded class are dropped too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, ConfigError
from .data import Dataset
from .multilabel import check_classifier_params, classifier_datasets, train_multilabel
from .train import predict


def trusted_ids(cfg: Config, ds: Dataset) -> list[str]:
    """Ids of train images whose labels for the filter class are trusted."""
    split = cfg.data.train_split
    lf = cfg.label_filter
    if lf.trusted_list:
        p = Path(lf.trusted_list)
        if not p.is_file():
            raise ConfigError(f"label_filter.trusted_list: file not found: {p}")
        wanted = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        t = ds.trusted_ids(split)
        if t is None:
            raise ConfigError(
                f"label_filter.trusted_list: the dataset has no trusted subset for split {split!r}; "
                "name a file of trusted ids"
            )
        wanted = sorted(t)
    have = set(ds.ids(split))
    missing = [i for i in wanted if i not in have]
    if missing:
        raise ConfigError(f"label_filter.trusted_list: {len(missing)} ids not in split {split!r}, e.g. {missing[0]!r}")
    return wanted


def check_label_filter_params(cfg: Config, ds: Dataset) -> None:
    """Everything about the filter that can fail, checked before any work."""
    lf = cfg.label_filter
    if not lf.enabled:
        return
    if lf.class_name not in ds.classes[1:]:
        raise ConfigError(f"label_filter.class_name: {lf.class_name!r} is not a class ({', '.join(ds.classes[1:])})")
    check_classifier_params(_filter_classifier_config(cfg), ds.classes, key="label_filter")
    if not trusted_ids(cfg, ds):
        raise ConfigError("label_filter.trusted_list: no trusted images to train the filter on")


def _filter_classifier_config(cfg: Config):
    """The classifier recipe, for one class, all classes kept, no balancing, no
    ReCAM head (a softmax over one class has nothing to learn)."""
    return dataclasses.replace(cfg.classifier, exclude_classes=(), balance="none", recam_weight=0.0,
                               backbone_lr_mult=cfg.label_filter.backbone_lr_mult)


def drop_decisions(scores: np.ndarray, labelled: np.ndarray, threshold: float) -> np.ndarray:
    """True where an image is dropped: the class is not labelled and the filter is
    not confident enough that it is absent (P(absent) = 1 - score < threshold)."""
    return (~np.asarray(labelled, bool)) & ((1.0 - np.asarray(scores)) < threshold)


def filter_train_images(cfg: Config, ds: Dataset, out_dir: Path,
                        device: torch.device) -> tuple[dict, dict, list[dict[str, Any]]]:
    """Decide which train images later stages may use.

    Returns (table, metrics, the filter classifier's history): table has one entry per train image (ids, score,
    labelled, dropped_by_filter, dropped_excluded, kept), as `artifacts.write_filter_scores`
    stores it. The filter's checkpoint goes to `out_dir`.
    """
    split = cfg.data.train_split
    images = ds.labelled(split)
    y = np.asarray(images.labels) > 0.5
    lf = cfg.label_filter
    excluded_cols = [ds.classes.index(c) - 1 for c in cfg.classifier.exclude_classes if c in ds.classes]
    drop_excluded = y[:, excluded_cols].any(1) if excluded_cols else np.zeros(len(images), bool)
    scores = np.full(len(images), np.nan)
    drop_filter = np.zeros(len(images), bool)
    metrics: dict[str, Any] = {"enabled": lf.enabled, "images": len(images)}
    history: list[dict[str, Any]] = []
    if lf.enabled:
        check_label_filter_params(cfg, ds)
        col = ds.classes.index(lf.class_name) - 1
        ccfg = _filter_classifier_config(cfg)
        trusted = trusted_ids(cfg, ds)
        trusted_idx = [images.position(i) for i in trusted]
        seed = cfg.seed_of("label_filter")
        model, _, history = train_multilabel(
            ccfg, images.subset(trusted_idx), None, [col], [lf.class_name], out_dir, device, seed,
            epochs=lf.epochs, lr=lf.lr, desc=f"filter[{lf.class_name}]",
        )
        _, all_ds = classifier_datasets(ccfg, model, images, images, [col], seed)
        scores = predict(model, all_ds, device, ccfg.batch_size, 0, desc="filter scores")[:, 0]
        untrusted = np.ones(len(images), bool)
        untrusted[trusted_idx] = False
        drop_filter = drop_decisions(scores, y[:, col], lf.threshold) & untrusted
        metrics.update({"trusted_images": len(trusted), "filter_epochs": len(history),
                        "dropped_by_filter": int(drop_filter.sum())})
        metrics.update(filter_quality(ds, split, images.ids, col + 1, y[:, col], drop_filter, untrusted))
    keep = ~(drop_filter | drop_excluded)
    metrics.update({"dropped_excluded_class": int(drop_excluded.sum()), "kept": int(keep.sum())})
    labelled = y[:, ds.classes.index(lf.class_name) - 1] if lf.class_name in ds.classes[1:] else np.zeros(len(y), bool)
    table = {"ids": np.array(images.ids), "score": scores, "labelled": labelled,
             "dropped_by_filter": drop_filter, "dropped_excluded": drop_excluded, "kept": keep}
    return table, metrics, history


def filter_quality(ds: Dataset, split: str, ids: list[str], class_id: int, labelled: np.ndarray,
                   dropped: np.ndarray, untrusted: np.ndarray) -> dict[str, Any]:
    """How well the filter finds unlabelled instances, judged with the masks
    (evaluation only; no decision above used them)."""
    if not ds.has_masks(split):
        return {}
    masks = ds.masks(split)
    present = np.array([bool((masks.mask(i) == class_id).any()) for i in ids])
    missing = present & ~labelled & untrusted
    clean = ~present & untrusted
    return {
        "images_with_unlabelled_class": int(missing.sum()),
        "unlabelled_dropped": int((dropped & missing).sum()),
        "unlabelled_recall": float((dropped & missing).sum() / missing.sum()) if missing.any() else None,
        "images_without_class": int(clean.sum()),
        "clean_dropped": int((dropped & clean).sum()),
        "clean_drop_rate": float((dropped & clean).sum() / clean.sum()) if clean.any() else None,
    }
