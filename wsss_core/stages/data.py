"""Stage `data` (00_data): open or generate the dataset, validate every file,
record its statistics. Its fingerprint includes the dataset's content, so an
edited label or a replaced image makes everything downstream stale."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..config import Config, DataConfig
from ..data import DataError, open_dataset, validate_dataset
from ..data.content import content_changes, dataset_content
from ..artifacts import write_data_summary
from ..store import Run, StageResult
from .registry import register


def check_data(cfg: Config, ds: Any) -> None:
    """Splits that exist, are not empty and do not share images."""
    for split in ds.splits:
        if not ds.ids(split):
            raise DataError(f"{ds.root}: split {split!r} has no images (data.train_split / data.val_split)")
    train, val = cfg.data.train_split, cfg.data.val_split
    if train in ds.splits and ds.label_source(train) != "masks" and not ds.labelled(train).labels.any():
        raise DataError(f"{ds.root}: no image of split {train!r} has an image-level label; the classifier has "
                        "nothing to learn (check the labels file)")
    if train != val and train in ds.splits and val in ds.splits:
        shared = sorted(set(ds.ids(train)) & set(ds.ids(val)))
        if shared:
            raise DataError(f"{ds.root}: {len(shared)} image ids are in both {train!r} and {val!r}, "
                            f"e.g. {shared[0]!r}; evaluation on {val!r} would see training images")


def _content(cfg: Config) -> dict:
    return dataset_content(open_dataset(cfg.data, validate=False))


def _headline(m: dict) -> str:
    return ", ".join(f"{k.removesuffix('_images')} {v} images" for k, v in m.items() if k.endswith("_images")) + \
        f", {m['num_classes']} classes"


@register("data", "00_data", sections=("data",), config=DataConfig, notebook="00_data.ipynb",
          check=check_data, headline=_headline, content=_content, explain_content=content_changes)
def data_stage(cfg: Config, run: Run) -> StageResult:
    """Generate (synthetic) or open the dataset, validate it, record its statistics."""
    t0 = time.perf_counter()
    ds = open_dataset(cfg.data, validate=False)
    report = validate_dataset(ds)
    t_validate = time.perf_counter() - t0
    splits: dict[str, Any] = {}
    for split in ds.splits:
        stats = label_statistics(ds.labelled(split).labels)
        trusted = ds.trusted_ids(split)
        splits[split] = {
            "images": len(ds.ids(split)),
            "label_source": ds.label_source(split),
            "has_masks": ds.has_masks(split),
            "trusted_images": None if trusted is None else len(trusted),
            "class_counts": dict(zip(ds.fg_classes, stats["class_counts"])),
            "images_without_labels": stats["images_without_labels"],
            "labels_per_image": stats["labels_per_image"],
            "cooccurrence": stats["cooccurrence"],
        }
    summary = {
        "format": ds.format,
        "root": str(ds.root),
        "classes": list(ds.classes),
        "splits": splits,
        "validation": report.as_dict(),
        "validation_text": str(report),
    }
    path = write_data_summary(run, summary)
    metrics = {
        "num_classes": ds.num_classes,
        **{f"{s}_images": v["images"] for s, v in splits.items()},
    }
    return StageResult(
        metrics=metrics,
        paths={"summary": str(path), "dataset_root": str(ds.root)},
        timings={"validate": round(t_validate, 3)},
    )


def label_statistics(labels: np.ndarray) -> dict[str, Any]:
    """Class counts, co-occurrence and label-count histogram of a multi-hot matrix."""
    y = (np.asarray(labels) > 0.5).astype(np.int64)
    per_image = y.sum(1)
    hist = np.bincount(per_image, minlength=int(per_image.max(initial=0)) + 1)
    return {
        "class_counts": y.sum(0).tolist(),
        "cooccurrence": (y.T @ y).tolist(),
        "images_without_labels": int((per_image == 0).sum()),
        "labels_per_image": {str(k): int(v) for k, v in enumerate(hist)},
    }


def class_counts(summary: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{split: {class: images labelled with it}} from the data stage's summary (for `viz.plot_class_counts`)."""
    return {split: v["class_counts"] for split, v in summary["splits"].items()}


def split_with_masks(ds: Any) -> str | None:
    """The first split that has masks (None: none has)."""
    return next((s for s in ds.splits if ds.has_masks(s)), None)
