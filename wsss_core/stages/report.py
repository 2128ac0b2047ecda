"""Stage `report` (08_report): every stage's result in one place (report.json),
drawn by notebook 08_report, which `wsss run` exports to <run>/report.html
with the code hidden: per-class IoU of CAMs, confident labels, pseudo masks,
final predictions and the fully supervised bound side by side, the lift from
stage to stage, weak / full, the classifier's AP, the label filter's effect,
timings, the config, the date and the machine."""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

from ..config import Config
from ..store import Run, StageResult, write_json
from . import STAGES, register

REPORT_HTML = "report.html"


def machine() -> dict[str, Any]:
    """CPU, GPU, torch version: what the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def _named(iou: Any, classes: list[str]) -> dict[str, float | None]:
    """Per-class IoU as {class: value}, whether stored as a dict or a list."""
    if isinstance(iou, dict):
        return dict(iou)
    return {c: (None if v is None or v != v else float(v)) for c, v in zip(classes, iou)}


def collect_report(cfg: Config, run: Run) -> dict[str, Any]:
    """The facts of a finished run, read from its manifests (no recomputation)."""
    m = {name: (run.manifest(name) or {}) for name in STAGES if name != "report"}
    metrics = {name: x.get("metrics", {}) for name, x in m.items()}
    from . import dataset

    classes = list(dataset(cfg).classes)
    train, val_split = cfg.data.train_split, cfg.data.val_split
    per_class: dict[str, dict[str, float | None]] = {}
    miou: dict[str, float] = {}
    cams = metrics.get("cams", {})
    if "quality" in cams:  # its threshold was chosen on these masks: an oracle, as IRNet reports CAMs
        per_class[f"CAM ({train}, threshold {cams['best_threshold']})"] = _named(cams["quality"]["best"]["iou"],
                                                                                 classes)
        miou[f"CAM ({train})"] = cams["miou_best"]
    crf = metrics.get("crf", {}).get("quality")
    if crf:
        per_class[f"confident labels ({train}, 255 void)"] = _named(crf["iou"], classes)
        miou[f"confident labels ({train}, 255 void)"] = crf["miou"]
    pm = metrics.get("pseudo_masks", {})
    if "quality" in pm:
        per_class[f"pseudo masks ({train})"] = _named(pm["quality"]["pseudo_masks"]["iou"], classes)
        miou[f"pseudo masks ({train})"] = pm["miou"]
    pred = metrics.get("predict", {})
    val = pred.get("splits", {}).get(val_split, {})
    if "quality" in val.get("weak", {}):
        per_class[f"segmenter ({val_split})"] = _named(val["weak"]["quality"]["iou"], classes)
        miou[f"segmenter ({val_split})"] = val["weak"]["quality"]["miou"]
    if "quality" in val.get("full", {}):
        per_class[f"fully supervised ({val_split})"] = _named(val["full"]["quality"]["iou"], classes)
        miou[f"fully supervised ({val_split})"] = val["full"]["quality"]["miou"]
    timings = {name: x.get("seconds") for name, x in m.items() if x.get("status") == "done"}
    return {
        "name": cfg.name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "classes": classes,
        "miou": miou,
        # the lift from stage to stage: masks of the same kind (confident labels leave pixels out)
        "lift": {k: v for k, v in miou.items() if not k.startswith("confident")},
        "per_class_iou": per_class,
        "weak_over_full": pred.get("weak_over_full"),
        "val_miou": pred.get("val_miou"),
        "full_val_miou": pred.get("full_val_miou"),
        "classifier": {k: metrics.get("classifier", {}).get(k) for k in ("val_map", "val_ap", "epochs")},
        "label_filter": metrics.get("label_filter", {}),
        "timings": timings,
        "total_seconds": round(sum(v for v in timings.values() if v), 1),
        "config": (run.root / "config.yaml").read_text() if (run.root / "config.yaml").is_file() else "",
    }


def miou_table(report: dict[str, Any]) -> str:
    """The per-stage mIoU table printed at the end of `wsss run`."""
    w = max(len("weak / full"), *(len(k) for k in report["miou"]))
    rows = [f"  {k:<{w}}  {100 * v:5.1f}" for k, v in report["miou"].items() if v is not None]
    if report.get("weak_over_full") is not None:
        rows.append(f"  {'weak / full':<{w}}  {report['weak_over_full']:5.3f}")
    return "\n".join([f"  {'stage':<{w}}   mIoU", *rows])


def _headline(m: dict) -> str:
    return f"{len(m.get('miou', {}))} stages scored"


_EVERY_STAGE = ("data", "classifier", "label_filter", "cams", "crf", "boundary", "pseudo_masks", "segmentation",
                "segmentation_full", "predict")


@register("report", "08_report", sections=(), upstream=_EVERY_STAGE, notebook="08_report.ipynb",
          headline=_headline, reads_metrics=_EVERY_STAGE)
def report_stage(cfg: Config, run: Run) -> StageResult:
    """Collect every stage's results into 08_report/report.json."""
    report = collect_report(cfg, run)
    path = run.path("report") / "report.json"
    if run.is_main:
        write_json(path, report)
    return StageResult(metrics={"miou": report["miou"], "weak_over_full": report["weak_over_full"]},
                       paths={"report": str(path), "html": str(run.root / REPORT_HTML)})
