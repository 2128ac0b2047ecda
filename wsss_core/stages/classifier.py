"""Stage `classifier` (01_classifier): step 1's multi-label classifier, trained
on image-level labels; model.pt, history.json, val_scores.npz, metrics.

A model.pt made with the current output parameters is kept: a rerun caused by
an evaluation parameter only re-evaluates it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import runtime
from ..artifacts import history_path, model_path, read_result, read_val_scores, write_result, write_val_scores
from ..config import ClassifierConfig, Config
from ..store import Run, StageResult
from ..trained import fit_or_load
from .inputs import dataset
from .registry import register


def check_classifier(cfg: Config, ds: Any) -> None:
    from ..multilabel import check_classifier_params

    check_classifier_params(cfg.classifier, ds.classes)


@dataclass
class ClassifierResult:
    """The trained classifier: its classes (head order) and its val scores (None without val labels)."""

    classes: list[str]
    epochs: int
    val_map: float | None
    val_ap: dict[str, float | None] | None  # class -> average precision on data.val_split


def _headline(m: dict) -> str:
    return f"val mAP {m['val_map']:.3f}, {m['epochs']} epochs" if m.get("val_map") is not None else \
        f"{m['epochs']} epochs"


@register("classifier", "01_classifier", sections=("seed", "classifier"), upstream=("data",),
          config=ClassifierConfig, notebook="01_classifier.ipynb", check=check_classifier, headline=_headline)
def classifier_stage(cfg: Config, run: Run) -> StageResult:
    """Train the multi-label classifier; save model.pt, history and val metrics."""
    from ..multilabel import evaluate_multilabel, load_classifier, save_classifier, train_multilabel, trained_class_ids

    ds = dataset(cfg)
    class_ids = trained_class_ids(ds.classes, cfg.classifier.exclude_classes)
    columns = [k - 1 for k in class_ids]
    names = [ds.classes[k] for k in class_ids]
    val = ds.labelled(cfg.data.val_split) if cfg.data.val_split in ds.splits else None
    folder = run.make_folder("classifier")
    device = runtime.resolve_device(cfg.device)
    model_file = model_path(run, "classifier")
    seed = cfg.seed_of("classifier")
    scores: dict[str, Any] = {}

    def train() -> tuple[Any, list[dict], dict]:
        model, fitted, history = train_multilabel(
            cfg.classifier, ds.labelled(cfg.data.train_split), val, columns, names, folder, device, seed,
        )
        scores.update(fitted)
        return model, history, scores.pop("fit")

    t = fit_or_load(run, "classifier", train,
                    lambda path, model, _: save_classifier(path, model, cfg.classifier, class_ids, ds.classes),
                    lambda path: load_classifier(path, device).model)
    if not t.trained_now:  # trained with these parameters: evaluate only
        scores = evaluate_multilabel(cfg.classifier, t.model, val, columns, names, device, seed)
    history = t.history
    metrics: dict[str, Any] = {
        "classes": names,
        "epochs": len(history),
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "resumed_from_epoch": t.fit.get("resumed_from"),
        "world_size": len(t.fit.get("param_checksums", [])),
        "param_checksums": t.fit.get("param_checksums", []),
    }
    if run.is_main:
        if "val_scores" in scores:
            write_val_scores(run, scores.pop("val_scores"), val.ids, np.asarray(val.labels)[:, columns])
        metrics.update({f"val_{k}": v for k, v in scores.items()})
        write_result(run, "classifier", ClassifierResult(names, len(history), scores.get("map"), scores.get("ap")))
    return StageResult(metrics=metrics, paths={"model": str(model_file), "history": str(history_path(run, "classifier"))})


def val_predictions(cfg: Config, run: Run, n: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, list[str]]:
    """The first n val images with their labels, the classifier's scores for
    them and the class names (head order), for pictures."""
    z = read_val_scores(run)
    names = read_result(run, "classifier", ClassifierResult).classes
    images = dataset(cfg).labelled(cfg.data.val_split)
    pairs = [(images.image(str(i)), z["labels"][k]) for k, i in enumerate(z["ids"][:n])]
    return pairs, z["scores"][:n], names
