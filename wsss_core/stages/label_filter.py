"""Stage `label_filter` (01_label_filter): which train images later stages may
use (NoPeopleAllowed missing-label filter + excluded classes); kept.txt and
scores.csv."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import runtime
from ..artifacts import write_filter_scores, write_history, write_kept_ids, write_result
from ..config import Config, LabelFilterConfig
from ..store import Run, StageResult
from .inputs import dataset
from .registry import register


def check_label_filter(cfg: Config, ds: Any) -> None:
    from ..label_filter import check_label_filter_params
    from ..multilabel import check_classifier_params

    check_classifier_params(cfg.classifier, ds.classes)
    check_label_filter_params(cfg, ds)


@dataclass
class LabelFilterResult:
    """Which train images later stages use, and why the others were dropped."""

    enabled: bool
    images: int
    kept: int
    dropped_by_filter: int
    dropped_excluded_class: int
    unlabelled_recall: float | None  # share of unlabelled instances the filter dropped (masks; None: unknown)
    clean_drop_rate: float | None  # share of images without the class that it dropped anyway


def _headline(m: dict) -> str:
    return f"kept {m['kept']} of {m['images']} train images"


# the filter trains with the classifier's recipe but its own epochs, lr, backbone share and seed, unbalanced
_UNUSED_CLASSIFIER_FIELDS = ("classifier.epochs", "classifier.lr", "classifier.backbone_lr_mult", "classifier.balance",
                             "classifier.repeat_threshold", "classifier.recam_weight", "classifier.recam_epochs",
                             "classifier.recam_lr", "classifier.seed")


@register("label_filter", "01_label_filter", sections=("seed", "classifier", "label_filter"), upstream=("data",),
          config=LabelFilterConfig, notebook="01_label_filter.ipynb", check=check_label_filter, headline=_headline,
          ignore=_UNUSED_CLASSIFIER_FIELDS)
def label_filter_stage(cfg: Config, run: Run) -> StageResult:
    """Decide which train images later stages may use (NoPeopleAllowed filter).

    Dropped: images labelled with an excluded class, and (filter enabled)
    images where the filter class is probably present but not labelled.
    """
    from ..label_filter import filter_train_images

    ds = dataset(cfg)
    folder = run.make_folder("label_filter")
    table, metrics, history = filter_train_images(cfg, ds, folder, runtime.resolve_device(cfg.device))
    if run.is_main:
        if history:  # the filter's own classifier, epoch by epoch
            write_history(run, "label_filter", history)
        write_filter_scores(run, table)
        write_kept_ids(run, [i for i, k in zip(table["ids"], table["kept"]) if k])
        write_result(run, "label_filter", LabelFilterResult(
            metrics["enabled"], metrics["images"], metrics["kept"], metrics.get("dropped_by_filter", 0),
            metrics["dropped_excluded_class"], metrics.get("unlabelled_recall"), metrics.get("clean_drop_rate")))
    return StageResult(metrics=metrics, paths={"kept": str(folder / "kept.txt"), "scores": str(folder / "scores.csv")})
