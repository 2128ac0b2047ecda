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

from .config import Config, ConfigError
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
    run.begin(name, fresh=force)
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
        "validation": report.as_dict(),
        "validation_text": str(report),
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


def _dataset(cfg: Config):
    """The dataset, already validated by the data stage (an upstream of every stage)."""
    from .data import open_dataset

    return open_dataset(cfg.data, validate=False)


# --------------------------------------------------------------------------- 01 classifier
@_register("classifier", "01_classifier", sections=("seed", "data", "classifier"), upstream=("data",))
def classifier_stage(cfg: Config, run: Run) -> StageResult:
    """Train the multi-label classifier; save model.pt, history and val metrics."""
    from .classifier import check_classifier_params, save_classifier, train_multilabel, trained_class_ids
    from .train import resolve_device

    ds = _dataset(cfg)
    check_classifier_params(cfg.classifier, ds.classes)
    class_ids = trained_class_ids(ds.classes, cfg.classifier.exclude_classes)
    names = [ds.classes[k] for k in class_ids]
    val = ds.labelled(cfg.data.val_split) if cfg.data.val_split in ds.splits else None
    folder = run.path("classifier")
    device = resolve_device(cfg.device)
    model, scores, history = train_multilabel(
        cfg.classifier, ds.labelled(cfg.data.train_split), val, [k - 1 for k in class_ids], names,
        folder, device, cfg.seed,
    )
    fit_info = scores.pop("fit")
    metrics: dict[str, Any] = {
        "classes": names,
        "epochs": len(history),
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "resumed_from_epoch": fit_info["resumed_from"],
        "world_size": len(fit_info["param_checksums"]),
        "param_checksums": fit_info["param_checksums"],
    }
    if run.is_main:
        save_classifier(folder / "model.pt", model, cfg.classifier, class_ids, ds.classes)
        if "val_scores" in scores:
            from .store import save_npz

            save_npz(folder / "val_scores.npz", scores=scores.pop("val_scores"), ids=np.array(val.ids),
                     labels=np.asarray(val.labels)[:, [k - 1 for k in class_ids]])
        metrics.update({f"val_{k}": v for k, v in scores.items()})
        if fit_info["samples_per_rank"] is not None and len(fit_info["samples_per_rank"]) > 1:
            write_json(folder / "samples_per_rank.json", fit_info["samples_per_rank"])
    return StageResult(metrics=metrics, paths={"model": str(folder / "model.pt"),
                                               "history": str(folder / "history.json")})


# --------------------------------------------------------------------------- 01 label filter
@_register("label_filter", "01_label_filter", sections=("seed", "data", "classifier", "label_filter"),
           upstream=("data",))
def label_filter_stage(cfg: Config, run: Run) -> StageResult:
    """Decide which train images later stages may use (NoPeopleAllowed filter).

    Dropped: images labelled with an excluded class, and (filter enabled)
    images where the filter class is probably present but not labelled.
    """
    import dataclasses

    from .classifier import (
        check_classifier_params,
        classifier_datasets,
        drop_decisions,
        train_multilabel,
        trusted_ids,
    )
    from .train import predict, resolve_device

    ds = _dataset(cfg)
    split = cfg.data.train_split
    images = ds.labelled(split)
    y = np.asarray(images.labels) > 0.5
    lf = cfg.label_filter
    folder = run.path("label_filter")
    excluded_cols = [ds.classes.index(c) - 1 for c in cfg.classifier.exclude_classes if c in ds.classes]
    drop_excluded = y[:, excluded_cols].any(1) if excluded_cols else np.zeros(len(images), bool)
    scores = np.full(len(images), np.nan)
    drop_filter = np.zeros(len(images), bool)
    metrics: dict[str, Any] = {"enabled": lf.enabled, "images": len(images)}
    if lf.enabled:
        if lf.class_name not in ds.classes[1:]:
            raise ConfigError(f"label_filter.class_name: {lf.class_name!r} is not a class ({', '.join(ds.classes[1:])})")
        col = ds.classes.index(lf.class_name) - 1
        ccfg = dataclasses.replace(cfg.classifier, exclude_classes=(), balance="none",
                                   backbone_lr_mult=lf.backbone_lr_mult)
        check_classifier_params(ccfg, ds.classes, key="label_filter")
        trusted = trusted_ids(cfg, ds)
        index = {i: n for n, i in enumerate(images.ids)}
        trusted_idx = [index[i] for i in trusted]
        device = resolve_device(cfg.device)
        model, _, history = train_multilabel(
            ccfg, images.subset(trusted_idx), None, [col], [lf.class_name], folder, device, cfg.seed,
            epochs=lf.epochs, lr=lf.lr, desc=f"filter[{lf.class_name}]",
        )
        _, all_ds = classifier_datasets(ccfg, model, images, images, [col], cfg.seed)
        scores = predict(model, all_ds, device, ccfg.batch_size, 0, desc="filter scores")[:, 0]
        untrusted = np.ones(len(images), bool)
        untrusted[trusted_idx] = False
        drop_filter = drop_decisions(scores, y[:, col], lf.threshold) & untrusted
        metrics.update({"trusted_images": len(trusted), "filter_epochs": len(history),
                        "dropped_by_filter": int(drop_filter.sum())})
        metrics.update(_filter_quality(ds, split, images.ids, col + 1, y[:, col], drop_filter, untrusted))
    keep = ~(drop_filter | drop_excluded)
    metrics.update({"dropped_excluded_class": int(drop_excluded.sum()), "kept": int(keep.sum())})
    if run.is_main:
        from .store import write_text

        rows = ["image_id,score,labelled,dropped_by_filter,dropped_excluded,kept"]
        col_lab = y[:, ds.classes.index(lf.class_name) - 1] if lf.class_name in ds.classes[1:] else np.zeros(len(y))
        for i, sid in enumerate(images.ids):
            rows.append(f"{sid},{scores[i]:.5f},{int(col_lab[i])},{int(drop_filter[i])},{int(drop_excluded[i])},{int(keep[i])}")
        write_text(folder / "scores.csv", "\n".join(rows) + "\n")
        write_text(folder / "kept.txt", "".join(f"{i}\n" for i, k in zip(images.ids, keep) if k))
    return StageResult(metrics=metrics, paths={"kept": str(folder / "kept.txt"), "scores": str(folder / "scores.csv")})


def _filter_quality(ds, split: str, ids: list[str], class_id: int, labelled: np.ndarray,
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


def kept_train_ids(run: Run) -> list[str]:
    """Train ids that later stages may use (written by the label_filter stage)."""
    p = run.root / STAGES["label_filter"].folder / "kept.txt"
    return [line for line in p.read_text().splitlines() if line]


def _shard(ids: list[str], run: Run) -> list[str]:
    """This process's share of the images when launched by torchrun."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return ids[run.rank :: world] if world > 1 else ids


def _wait_for_all_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stage_ids(cfg: Config, run: Run, split: str) -> list[str]:
    """The ids a stage works on: for the train split, those the label filter kept."""
    if split == cfg.data.train_split:
        return kept_train_ids(run)
    return _dataset(cfg).ids(split)


# --------------------------------------------------------------------------- 02 cams
@_register("cams", "02_cams", sections=("seed", "data", "cams"), upstream=("data", "classifier", "label_filter"))
def cams_stage(cfg: Config, run: Run) -> StageResult:
    """Multi-scale Grad-CAM / Grad-CAM++ for every image of the split, then a
    background-threshold sweep against the masks."""
    import torch

    from .cam import class_activation_maps, select_classes
    from .classifier import load_classifier
    from .data.transforms import to_normalized_tensor
    from .evaluate import cam_threshold_sweep
    from .store import save_npz
    from .train import init_distributed, progress, resolve_device

    c = cfg.cams
    device = resolve_device(cfg.device)
    init_distributed(device)
    trained = load_classifier(run.path("classifier") / "model.pt", device)
    cam_model = trained.model.at_layer(c.layer)  # a bad layer name fails here, before any work
    mean, std = trained.meta["normalization"]
    ds = _dataset(cfg)
    images = ds.labelled(c.split)
    index = {i: n for n, i in enumerate(images.ids)}
    ids = stage_ids(cfg, run, c.split)
    out = run.path("cams") / "cams"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    done = 0
    for sid in progress(_shard(ids, run), desc=f"CAMs ({c.method})", disable=not run.is_main):
        path = out / f"{sid}.npz"
        if path.exists():  # resume after an interruption
            continue
        image, labels = images[index[sid]]
        x = to_normalized_tensor(image, mean, std).to(device)
        if c.classes == "labels":
            class_ids = [k for k in trained.class_ids if labels[k - 1] > 0.5]
        else:
            with torch.inference_mode():
                logits = trained.model(x[None])[0]
            class_ids = select_classes(logits, "predicted", c.pred_threshold, head_class_ids=trained.class_ids)
        res = class_activation_maps(cam_model, x, class_ids, scales=c.scales, flip=c.flip,
                                    method=c.method, normalize=c.normalize, head_class_ids=trained.class_ids)
        save_npz(path, **res.to_npz_dict())
        done += 1
    seconds = time.perf_counter() - t0
    _wait_for_all_ranks()
    metrics: dict[str, Any] = {"images": len(ids), "computed_here": done,
                               "images_per_s": round(done / max(seconds, 1e-9), 3)}
    if run.is_main and ds.has_masks(c.split):
        masks = ds.masks(c.split)

        def items():
            for sid in ids:
                z = np.load(out / f"{sid}.npz")
                yield z["high_res"].astype(np.float32), z["keys"], masks.mask(sid)

        metrics["quality"] = cam_threshold_sweep(items(), c.bg_thresholds, ds.classes)
        metrics["miou_best"] = metrics["quality"]["best"]["miou"]
        metrics["best_threshold"] = metrics["quality"]["best_threshold"]
    return StageResult(metrics=metrics, paths={"cams": str(out)}, timings={"cams": round(seconds, 2)})


def read_cam(run: Run, image_id: str) -> dict[str, np.ndarray]:
    """One image's stored CAMs: keys (class ids), cam (stride 4), high_res (float32)."""
    z = np.load(run.root / STAGES["cams"].folder / "cams" / f"{image_id}.npz")
    return {k: (z[k].astype(np.float32) if z[k].dtype == np.float16 else z[k]) for k in z.files}


# --------------------------------------------------------------------------- 03 crf
@_register("crf", "03_crf", sections=("seed", "data", "cams", "crf"), upstream=("data", "cams"))
def crf_stage(cfg: Config, run: Run) -> StageResult:
    """Dense-CRF confident labels per image (0 bg, k class, 255 unconfident) for IRNet."""
    from .crf import confident_label_scores, confident_labels_many
    from .store import save_png
    from .train import progress
    from .viz import voc_palette

    ds = _dataset(cfg)
    split = cfg.cams.split
    images = ds.labelled(split)
    index = {i: n for n, i in enumerate(images.ids)}
    ids = stage_ids(cfg, run, split)
    out = run.path("crf") / "ir_labels"
    out.mkdir(exist_ok=True)
    todo = [i for i in _shard(ids, run) if not (out / f"{i}.png").exists()]

    def items():
        for sid in todo:
            cam = read_cam(run, sid)
            yield sid, images.image(index[sid]), cam["high_res"], cam["keys"]

    t0 = time.perf_counter()
    palette = voc_palette()
    for sid, labels in progress(confident_labels_many(items(), cfg.crf, cfg.crf.workers), total=len(todo),
                                desc="dense CRF", disable=not run.is_main):
        save_png(out / f"{sid}.png", labels, palette=palette)
    seconds = time.perf_counter() - t0
    _wait_for_all_ranks()
    metrics: dict[str, Any] = {"images": len(ids), "computed_here": len(todo),
                               "images_per_s": round(len(todo) / max(seconds, 1e-9), 3)}
    if run.is_main and ds.has_masks(split):
        from .evaluate import read_label_png

        masks = ds.masks(split)
        metrics["quality"] = confident_label_scores(
            (read_label_png(out / f"{sid}.png") for sid in ids), (masks.mask(sid) for sid in ids), ds.num_classes)
    return StageResult(metrics=metrics, paths={"ir_labels": str(out)}, timings={"crf": round(seconds, 2)})


def crf_breakdown(cfg: Config, run: Run, image_id: str) -> list[tuple[str, np.ndarray]]:
    """Image, strongest CAM, fg_conf, bg_conf and the final confident labels of one image."""
    from .crf import confident_label_parts

    ds = _dataset(cfg)
    images = ds.labelled(cfg.cams.split)
    image = images.image(images.ids.index(image_id))
    cam = read_cam(run, image_id)
    fg, bg, labels = confident_label_parts(image, cam["high_res"], cam["keys"], cfg.crf)
    from .viz import heat_overlay

    heat = cam["high_res"].max(0) if len(cam["keys"]) else np.zeros(image.shape[:2], np.float32)
    return [("image", image), ("CAM (max over classes)", heat_overlay(image, heat)),
            (f"fg_conf (thres {cfg.crf.conf_fg_thres})", fg), (f"bg_conf (thres {cfg.crf.conf_bg_thres})", bg),
            ("confident labels (white: 255)", labels)]


def crf_threshold_sweep(cfg: Config, run: Run, ids: list[str],
                        pairs: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Precision and coverage of confident labels for (conf_fg_thres, conf_bg_thres)
    pairs, on the images `ids` (evaluation: reads masks)."""
    import dataclasses

    from .crf import confident_label_scores, confident_labels

    ds = _dataset(cfg)
    images = ds.labelled(cfg.cams.split)
    masks = ds.masks(cfg.cams.split)
    index = {i: n for n, i in enumerate(images.ids)}
    cams = {i: read_cam(run, i) for i in ids}
    out = []
    for fg, bg in pairs:
        c = dataclasses.replace(cfg.crf, conf_fg_thres=fg, conf_bg_thres=min(bg, fg))
        maps = (confident_labels(images.image(index[i]), cams[i]["high_res"], cams[i]["keys"], c) for i in ids)
        s = confident_label_scores(maps, (masks.mask(i) for i in ids), ds.num_classes)
        out.append({"conf_fg_thres": fg, "conf_bg_thres": c.conf_bg_thres, "precision": s["precision"],
                    "coverage": s["coverage"], "miou": s["miou"]})
    return out
