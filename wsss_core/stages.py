"""One function per pipeline stage: `stage(cfg, run) -> StageResult`.

Notebooks and the CLI call `run_stage(name, cfg, run)`, which checks the
upstream stages, skips a stage that is already done with the same inputs, and
records the manifest. Stage bodies only read earlier stages' folders and
write their own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import Config
from .store import Run, StageResult, StageSpec, now_iso, write_json

StageFn = Callable[[Config, Run], StageResult]

STAGES: dict[str, StageSpec] = {}
_FUNCS: dict[str, StageFn] = {}


def _register(name: str, folder: str, sections: tuple[str, ...], upstream: tuple[str, ...] = ()):
    def deco(fn: StageFn) -> StageFn:
        STAGES[name] = StageSpec(name, folder, sections, upstream)
        _FUNCS[name] = fn
        return fn

    return deco


def open_run(run_dir: str | Path, cfg: Config) -> Run:
    """The run directory for `cfg` (created if needed; resolved config saved)."""
    run = Run(run_dir, cfg, STAGES)
    run.save_config()
    return run


def stage_names() -> list[str]:
    return list(STAGES)


def run_stage(name: str, cfg: Config, run: Run, force: bool = False) -> StageResult:
    """Run one stage unless it is already done with the same inputs.

    Refuses (StaleUpstreamError) when an upstream stage is missing or stale.
    """
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    run.check_upstream(name)
    if not force and run.is_done(name):
        print(f"[wsss] {STAGES[name].folder}: already done with these parameters, skipped")
        return run.result(name)
    started = now_iso()
    t0 = time.perf_counter()
    run.save_config()
    run.begin(name)
    print(f"[wsss] {STAGES[name].folder}: running")
    try:
        result = _FUNCS[name](cfg, run)
    except BaseException as e:
        run.fail(name, e, started)
        raise
    result.seconds = time.perf_counter() - t0
    run.finish(name, result, started)
    print(f"[wsss] {STAGES[name].folder}: done in {result.seconds:.1f} s -> {run.path(name)}")
    return result


# --------------------------------------------------------------------------- 00 data
@_register("data", "00_data", sections=("data",))
def data_stage(cfg: Config, run: Run) -> StageResult:
    """Generate (synthetic) or open the dataset, validate it, record its statistics."""
    from .data import open_dataset

    t0 = time.perf_counter()
    ds = open_dataset(cfg.data, validate=False)
    report = ds.validate()
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
        "validation": report.as_dict() if hasattr(report, "as_dict") else str(report),
    }
    folder = run.path("data")
    write_json(folder / "summary.json", summary)
    metrics = {
        "num_classes": ds.num_classes,
        **{f"{s}_images": v["images"] for s, v in splits.items()},
    }
    return StageResult(
        metrics=metrics,
        paths={"summary": str(folder / "summary.json"), "dataset_root": str(ds.root)},
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
