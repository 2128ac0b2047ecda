"""One reader/writer pair per on-disk artifact of a run.

Stages and notebooks reach upstream outputs only through these, so each
format is written and read in exactly one place:

| artifact | file | writer / reader |
| --- | --- | --- |
| classifier val scores | 01_classifier/val_scores.npz | write_val_scores / read_val_scores |
| kept train ids | 01_label_filter/kept.txt | write_kept_ids / read_kept_ids |
| filter scores | 01_label_filter/scores.csv | write_filter_scores / read_filter_scores |
| CAMs | 02_cams/cams/<id>.npz | CAMS.write / CAMS.read (CamResult: per-scale maps at feature resolution, float32 or uint8 + range) |
| confident labels | 03_crf/confident_labels/<id>.png | CONFIDENT_LABELS (0 bg, k class, 255 unconfident) |
| boundary maps | 05_pseudo_masks/boundary/<id>.png | BOUNDARY_MAPS (uint8 = round(255 b)) |
| pseudo masks | 05_pseudo_masks/masks/<id>.png | PSEUDO_MASKS (class ids, palette PNG) |
| predictions | 07_predict/<split>/<id>.png | predictions(split) |
| scores kept per image | <stage>/scores/<key>.npz | write_scores / read_scores / scores_of (ImageScores) |
| a stage's typed result | <stage>/result.json | write_result / read_result (the stage's dataclass) |
| models | <stage>/model.pt | model_path(run, stage) (saved and loaded by the model's module) |
| training history | <stage>/history.json | write_history / read_history (one record per epoch) |
| how a model was fit | <stage>/fit.json | write_fit_info / read_fit_info (checksums per process, resume epoch) |
| samples each process saw | <stage>/samples_per_rank.json | write_samples_per_rank (torchrun only) |
| best-epoch weights | <stage>/best.pt | write_best_weights / read_best_weights (checkpoint: best) |
| the dataset's summary | 00_data/summary.json | write_data_summary / read_data_summary |
| the report | 08_report/report.json, report.html | write_report / read_report, write_report_html |
| a per-image loop's speed | <stage>/throughput_<subdir>.json | add_throughput (images and seconds, resumes added) |

A model file's format belongs to its model's module (`save_segmenter` /
`load_segmenter`, ...), written at `model_path`; the fit loop's
`checkpoint.pt` (its resume state) to `train.py`; manifests, the run's
config and executed notebooks to `store/` and `pipeline.py`.

Ground-truth masks are not artifacts: only evaluation code reads them
(`Dataset.masks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

from .data.ids import path_inside
from .store import (
    FileError, Run, StaleUpstreamError, file_errors, read_json, read_npz, read_torch, save_npz, save_png, save_torch,
    write_json, write_text,
)

T = TypeVar("T")


# --------------------------------------------------------------------------- label PNGs
def write_label_png(path: str | Path, labels: np.ndarray, layout: str = "voc", exclusive: bool = False) -> Path:
    """A uint8 class-id map as a PNG: a palette PNG with the VOC colours
    ("voc"), or plain grayscale ("lid", the LID submission format, which
    readers like OpenCV decode to the ids themselves). `exclusive`: fail
    rather than replace an existing file."""
    from .data.images import voc_palette

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"{path}: label maps are 2-D uint8, got {labels.dtype} {labels.shape}")
    return save_png(path, labels, palette=voc_palette() if layout == "voc" else None, exclusive=exclusive)


def read_png(path: str | Path, what: str, modes: tuple[str, ...] = ("P", "L")) -> np.ndarray:
    """The pixels of a single-channel PNG of a run (FileError naming it when it
    is missing, unreadable or of another mode)."""
    from PIL import Image

    try:
        with file_errors(path, "reading"), Image.open(path) as im:
            if im.mode not in modes:
                raise FileError(f"{path}: expected a {what} PNG of mode {' or '.join(modes)}, got mode {im.mode}")
            return np.array(im)
    except FileError:
        raise
    except (ValueError, SyntaxError, EOFError) as e:  # PIL's decoding errors that are not OSErrors
        raise FileError(f"{path}: cannot read this {what} ({e}); rerun the stage that wrote it") from None


def read_label_png(path: str | Path) -> np.ndarray:
    """A class-id map (HxW uint8) from a palette or grayscale PNG."""
    return read_png(path, "label map")


# --------------------------------------------------------------------------- per-image files
@dataclass(frozen=True)
class PerImage:
    """One file per image id in a subfolder of a stage's folder."""

    stage: str
    subdir: str
    suffix: str

    def dir(self, run: Run) -> Path:
        return run.inside(run.folder(self.stage) / self.subdir)

    def path(self, run: Run, image_id: str) -> Path:
        """`<dir>/<id><suffix>`; an id that would lead outside the folder is refused."""
        return path_inside(self.dir(run), image_id, self.suffix)

    def exists(self, run: Run, image_id: str) -> bool:
        return self.path(run, image_id).is_file()

    def ids(self, run: Run) -> list[str]:
        """Ids that have a finished file, sorted."""
        d = self.dir(run)
        return sorted(p.name[: -len(self.suffix)] for p in d.glob(f"*{self.suffix}") if not p.name.startswith(".")) \
            if d.is_dir() else []

    def write(self, run: Run, image_id: str, value: Any) -> Path:
        raise NotImplementedError

    def read(self, run: Run, image_id: str) -> Any:
        raise NotImplementedError


class CamFiles(PerImage):
    """CamResult per image: keys, image size, the per-scale maps at feature resolution
    (float32, or uint8 codes and ranges: `cams.storage`); the stride-4 and full-size maps are made from them when read."""

    def write(self, run: Run, image_id: str, value: Any) -> Path:
        return save_npz(self.path(run, image_id), **value.to_npz_dict())

    def read(self, run: Run, image_id: str) -> Any:
        from .cam_maps import CamResult

        return CamResult.from_npz(self.path(run, image_id))


@dataclass(frozen=True)
class LabelMaps(PerImage):
    """uint8 class-id maps as PNGs (palette, or grayscale for the "lid" layout)."""

    layout: str = "voc"

    def write(self, run: Run, image_id: str, value: Any) -> Path:
        return write_label_png(self.path(run, image_id), value, self.layout)

    def read(self, run: Run, image_id: str) -> np.ndarray:
        return read_label_png(self.path(run, image_id))


class BoundaryMaps(PerImage):
    """Boundary probabilities in [0, 1] stored as 8-bit grayscale PNGs."""

    @staticmethod
    def quantize(value: Any) -> np.ndarray:
        """The values a stored map reads back as (multiples of 1/255)."""
        return (np.round(np.clip(np.asarray(value, np.float32), 0.0, 1.0) * 255) / 255).astype(np.float32)

    def write(self, run: Run, image_id: str, value: Any) -> Path:
        return save_png(self.path(run, image_id), np.round(self.quantize(value) * 255).astype(np.uint8))

    def read(self, run: Run, image_id: str) -> np.ndarray:
        return read_png(self.path(run, image_id), "boundary map", ("L",)).astype(np.float32) / 255.0


CAMS = CamFiles("cams", "cams", ".npz")
CONFIDENT_LABELS = LabelMaps("crf", "confident_labels", ".png")
BOUNDARY_MAPS = BoundaryMaps("pseudo_masks", "boundary", ".png")
PSEUDO_MASKS = LabelMaps("pseudo_masks", "masks", ".png")
WALK_MASKS = LabelMaps("pseudo_masks", "walk", ".png")  # the walk's masks before the CRF refinement


def predictions(split: str, layout: str = "voc") -> LabelMaps:
    """Predicted class-id maps of one split (07_predict/<split>/<id>.png)."""
    return LabelMaps("predict", split, ".png", layout)


# --------------------------------------------------------------------------- label filter
def write_kept_ids(run: Run, ids: Sequence[str]) -> Path:
    return write_text(run.make_folder("label_filter") / "kept.txt", "".join(f"{i}\n" for i in ids))


def read_kept_ids(run: Run) -> list[str]:
    """Train ids that later stages may use (label filter + excluded classes)."""
    from .data.ids import id_problem

    p = run.folder("label_filter") / "kept.txt"
    with file_errors(p, "reading"):
        ids = [line for line in p.read_text().splitlines() if line]
    bad = next((i for i in ids if id_problem(i)), None)
    if bad is not None:
        raise FileError(f"{p}: {bad!r} is not an image id ({id_problem(bad)}); rerun the label_filter stage")
    return ids


_SCORE_COLUMNS = ("image_id", "score", "labelled", "dropped_by_filter", "dropped_excluded", "kept")


def write_filter_scores(run: Run, table: dict[str, np.ndarray]) -> Path:
    """scores.csv: one row per train image (filter score, labelled, drop reasons, kept)."""
    rows = [",".join(_SCORE_COLUMNS)]
    for i, sid in enumerate(table["ids"]):
        rows.append(f"{sid},{table['score'][i]:.5f},{int(table['labelled'][i])},{int(table['dropped_by_filter'][i])},"
                    f"{int(table['dropped_excluded'][i])},{int(table['kept'][i])}")
    return write_text(run.make_folder("label_filter") / "scores.csv", "\n".join(rows) + "\n")


def read_filter_scores(run: Run) -> dict[str, np.ndarray]:
    """The label filter's scores.csv as arrays (ids, score, labelled, dropped, kept)."""
    p = run.folder("label_filter") / "scores.csv"
    with file_errors(p, "reading"):
        lines = p.read_text().splitlines()[1:]
    cols = list(zip(*(line.split(",") for line in lines))) if lines else [()] * len(_SCORE_COLUMNS)
    flag = lambda c: np.array(c, dtype=int).astype(bool)  # noqa: E731
    try:
        return {
            "ids": np.array(cols[0]),
            "score": np.array(cols[1], dtype=float),
            "labelled": flag(cols[2]),
            "dropped_by_filter": flag(cols[3]),
            "dropped_excluded": flag(cols[4]),
            "kept": flag(cols[5]),
        }
    except (ValueError, IndexError) as e:
        raise FileError(f"{p}: not the filter's score table ({e}); rerun the label_filter stage") from None


# --------------------------------------------------------------------------- classifier scores
def write_val_scores(run: Run, scores: np.ndarray, ids: Sequence[str], labels: np.ndarray) -> Path:
    """01_classifier/val_scores.npz: sigmoid scores and labels (N, K) in head order."""
    return save_npz(run.make_folder("classifier") / "val_scores.npz", scores=scores, ids=np.array(ids), labels=labels)


def read_val_scores(run: Run) -> dict[str, np.ndarray]:
    return read_npz(run.folder("classifier") / "val_scores.npz", "classifier val scores")


# --------------------------------------------------------------------------- scores and results
def write_scores(run: Run, stage: str, key: str, scores: Any) -> Path:
    """<stage>/scores/<key>.npz: an evaluation kept per image (`metrics.ImageScores`)."""
    return save_npz(run.make_folder(stage) / "scores" / f"{key}.npz", **scores.arrays())


def read_scores(run: Run, stage: str, key: str) -> Any:
    from .metrics import ImageScores

    path = run.folder(stage) / "scores" / f"{key}.npz"
    if not path.is_file():
        raise MissingResultError(f"{path}: no such scores; rerun the {stage} stage (wsss run --force {stage})")
    return ImageScores.from_arrays(read_npz(path, "scores file"))


def scores_of(run: Run, stage: str) -> dict[str, Any]:
    """Every evaluation a stage kept ({key: ImageScores}, by key)."""
    folder = run.folder(stage) / "scores"
    keys = sorted(p.stem for p in folder.glob("*.npz") if not p.name.startswith(".")) if folder.is_dir() else []
    return {k: read_scores(run, stage, k) for k in keys}


class MissingResultError(StaleUpstreamError):
    """A stage's typed result (or a value in it) is missing: the message names the stage to rerun."""


def write_result(run: Run, stage: str, result: Any) -> Path:
    """<stage>/result.json: the stage's typed result (a dataclass of plain values)."""
    return write_json(run.make_folder(stage) / "result.json", dataclasses.asdict(result))


def read_result(run: Run, stage: str, cls: type[T]) -> T:
    """A stage's typed result as `cls`; every field must be there (no silent defaults)."""
    path = run.folder(stage) / "result.json"
    rerun = f"rerun the {stage} stage (wsss run --force {stage})"
    if not path.is_file():
        raise MissingResultError(f"{path}: {stage} has no result yet; {rerun}")
    data = read_json(path)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    missing = [n for n in names if n not in data]
    if missing:
        raise MissingResultError(f"{path}: no {', '.join(missing)} (written by an older wsss?); {rerun}")
    return cls(**{n: data[n] for n in names})


# --------------------------------------------------------------------------- models
def history_path(run: Run, stage: str) -> Path:
    return run.folder(stage) / "history.json"


def read_history(run: Run, stage: str) -> list[dict[str, Any]] | None:
    """A training stage's history.json, one record per epoch (None before it trained)."""
    p = history_path(run, stage)
    return read_json(p) if p.is_file() else None


def write_history(run: Run, stage: str, history: list[dict[str, Any]]) -> Path:
    return write_json(run.make_folder(stage) / "history.json", history)


def read_fit_info(run: Run, stage: str) -> dict[str, Any]:
    """How a stage's model was fit (`param_checksums` per process, `resumed_from`); {} for a model trained
    before fit.json existed."""
    p = run.folder(stage) / "fit.json"
    return read_json(p) if p.is_file() else {}


def write_fit_info(run: Run, stage: str, info: dict[str, Any]) -> Path:
    return write_json(run.make_folder(stage) / "fit.json", info)


def write_samples_per_rank(run: Run, stage: str, samples: list[list[int]]) -> Path:
    """The sample indices each torchrun process trained on (a check that DDP shared the data out)."""
    return write_json(run.make_folder(stage) / "samples_per_rank.json", samples)


def read_best_weights(run: Run, stage: str) -> tuple[float, dict[str, Any]] | None:
    """(val mIoU, state dict) of the best epoch so far (checkpoint: best), or None. A best.pt written before
    it held its score (a bare state dict) is read with the score -1: the next evaluated epoch decides."""
    p = run.folder(stage) / "best.pt"
    if not p.is_file():
        return None
    data = read_torch(p, "best-epoch weights")
    if isinstance(data, dict) and set(data) == {"val_miou", "state_dict"}:
        return float(data["val_miou"]), data["state_dict"]
    return -1.0, data


def write_best_weights(run: Run, stage: str, val_miou: float, state_dict: dict[str, Any]) -> Path:
    return save_torch(run.make_folder(stage) / "best.pt", {"val_miou": float(val_miou), "state_dict": state_dict})


def write_data_summary(run: Run, summary: dict[str, Any]) -> Path:
    return write_json(run.make_folder("data") / "summary.json", summary)


def read_data_summary(run: Run) -> dict[str, Any]:
    """The data stage's summary (format, classes, per-split counts, the validation report)."""
    return read_json(run.folder("data") / "summary.json")


REPORT_HTML = "report.html"  # in the run folder: what a reader opens first


def write_report(run: Run, report: dict[str, Any]) -> Path:
    return write_json(run.make_folder("report") / "report.json", report)


def read_report(run: Run) -> dict[str, Any] | None:
    """The report stage's report.json (None before the stage ran)."""
    p = run.folder("report") / "report.json"
    return read_json(p) if p.is_file() else None


def write_report_html(run: Run, html: str) -> Path:
    return write_text(run.root / REPORT_HTML, html)


def add_throughput(run: Run, stage: str, subdir: str, computed: int, seconds: float) -> float | None:
    """Images per second of a per-image loop over every attempt that computed images (resumes add up)."""
    path = run.folder(stage) / f"throughput_{subdir.replace('/', '_')}.json"
    total = read_json(path) if path.is_file() else {"images": 0, "seconds": 0.0}
    if computed:
        total = {"images": total["images"] + computed, "seconds": total["seconds"] + seconds}
        write_json(path, total)
    return round(total["images"] / total["seconds"], 3) if total["seconds"] > 0 else None


def model_path(run: Run, stage: str) -> Path:
    """The trained model of a stage (classifier, boundary, segmentation, ...)."""
    return run.folder(stage) / "model.pt"
