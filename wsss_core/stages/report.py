"""Stage `report` (08_report): every stage's result in one place (report.json),
drawn by notebook 08_report, which `wsss run` exports to <run>/report.html
(self-contained, code hidden): the per-class IoU of every evaluation the
stages kept (CAMs, confident labels, pseudo masks, the segmenter and the fully
supervised bound, on each split) side by side, the lift from stage to stage
split by split, weak / bound, the classifier's AP, the label filter's effect,
timings, the parameters that differ from the defaults, the date and the
machine. Its upstream is every stage before it (`registry.EVERY`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from .. import runtime
from ..config import Config
from ..artifacts import REPORT_HTML, read_report, write_report, write_report_html
from ..store import Run, StageResult
from .inputs import dataset
from .registry import EVERY, register



def collect_report(cfg: Config, run: Run) -> dict[str, Any]:
    """The facts of a finished run, from its stages' kept evaluations and typed
    results (no recomputation): every evaluation any stage kept appears, in
    pipeline order, so a new stage that scores masks shows up by itself."""
    from ..artifacts import MissingResultError, read_result, scores_of
    from .classifier import ClassifierResult
    from .label_filter import LabelFilterResult
    from .predict import PredictResult

    upstream = run.spec("report").upstream
    rows = []
    for stage in upstream:
        for key, scores in scores_of(run, stage).items():
            rows.append({"stage": stage, "key": key, "label": f"{scores.what} ({scores.split})", **scores.summary()})

    def result(stage: str, cls: type) -> Any:
        try:
            return dataclasses.asdict(read_result(run, stage, cls)) if stage in upstream else None
        except MissingResultError:
            return None

    predict = result("predict", PredictResult) or {}
    timings = {name: (run.manifest(name) or {}).get("seconds") for name in upstream
               if (run.manifest(name) or {}).get("status") == "done"}
    return {
        "name": cfg.name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": runtime.machine(),
        "classes": list(dataset(cfg).classes),
        "scores": rows,  # one per kept evaluation: label, what, split, note, images, miou, iou per class, ...
        "miou": {r["label"]: r["miou"] for r in rows},
        # the lift from stage to stage, split by split (masks of one kind: confident labels leave pixels out)
        "lift": {split: {r["what"]: r["miou"] for r in rows if r["split"] == split and r["key"] != "confident_labels"}
                 for split in dict.fromkeys(r["split"] for r in rows)},
        "per_class_iou": {r["label"]: r["iou"] for r in rows},
        "weak_over_bound": predict.get("weak_over_bound"),
        "classifier": result("classifier", ClassifierResult),
        "label_filter": result("label_filter", LabelFilterResult),
        "timings": timings,
        "total_seconds": round(sum(v for v in timings.values() if v), 1),
        "config": config_summary(cfg),
    }


def config_summary(cfg: Config) -> dict[str, Any]:
    """The resolved config as {"changed": dotted key -> value where it differs from
    the defaults, "all": the whole config as YAML}."""
    from ..config import config_class, dump_config, plain
    from ..store import config_diff

    defaults = plain(config_class()())
    changed = {}
    for line in config_diff(defaults, plain(cfg)):
        key, values = line.split(": ", 1)
        changed[key] = values.split(" -> ", 1)[1]
    return {"changed": changed, "all": dump_config(cfg)}


def miou_table(report: dict[str, Any]) -> str:
    """The per-stage mIoU table printed at the end of `wsss run`."""
    w = max(len("weak / bound (val)"), *(len(k) for k in report["miou"]))
    rows = [f"  {k:<{w}}  {100 * v:5.1f}" for k, v in report["miou"].items() if v is not None]
    if report.get("weak_over_bound") is not None:
        rows.append(f"  {'weak / bound (val)':<{w}}  {report['weak_over_bound']:5.3f}")
    return "\n".join([f"  {'stage':<{w}}   mIoU", *rows])


def _headline(m: dict) -> str:
    return f"{len(m.get('miou', {}))} stages scored"


def export_report(notebook: Path, run: Run) -> None:
    """The executed report notebook as <run>/report.html (what `wsss run` does after it)."""
    from ..viz import notebook_html

    write_report_html(run, notebook_html(notebook))


def _summary(run: Run) -> list[str]:
    """The mIoU table and the report's path, printed at the end of `wsss run`."""
    report = read_report(run)
    if report is None:
        return []
    return [miou_table(report), f"[wsss] report: {run.root / REPORT_HTML}"]


@register("report", "08_report", sections=(), upstream=EVERY, notebook="08_report.ipynb", headline=_headline,
          reads_metrics=EVERY, after_notebook=export_report, summary=_summary)
def report_stage(cfg: Config, run: Run) -> StageResult:
    """Collect every stage's results into 08_report/report.json."""
    report = collect_report(cfg, run)
    path = write_report(run, report) if run.is_main else run.folder("report") / "report.json"
    return StageResult(metrics={"miou": report["miou"], "weak_over_bound": report["weak_over_bound"]},
                       paths={"report": str(path), "html": str(run.root / REPORT_HTML)})
