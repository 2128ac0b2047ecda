"""Stage `boundary` (04_boundary): IRNet's class-boundary network, trained on
pixel-pair affinities of the confident labels (03_crf/confident_labels) of the kept
train images; model.pt and history.json. Evaluated (masks, evaluation only)
by boundary precision / recall against the class edges of the val masks."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import runtime
from ..artifacts import CONFIDENT_LABELS, history_path, model_path, read_kept_ids
from ..config import BoundaryConfig, Config, ConfigError
from ..data.pairs import ImagesWithLabels
from ..evaluate import boundary_scores
from ..store import Run, StageResult
from ..trained import fit_or_load
from .inputs import dataset
from .registry import register


def check_boundary(cfg: Config, ds: Any) -> None:
    """The boundary net learns from the train images' confident labels."""
    if cfg.cams.split != cfg.data.train_split:
        raise ConfigError(f"cams.split: the second half (boundary, pseudo masks) works on the train images; "
                          f"cams.split is {cfg.cams.split!r}, data.train_split {cfg.data.train_split!r}")


def _headline(m: dict) -> str:
    e = m.get("val_boundary")
    return f"val boundary F {e['best_f']:.3f} (P {e['best_precision']:.3f}, R {e['best_recall']:.3f})" if e else \
        f"{m['epochs']} epochs"


@register("boundary", "04_boundary", sections=("seed", "boundary"), upstream=("data", "label_filter", "crf"),
          config=BoundaryConfig, notebook="04_boundary.ipynb", check=check_boundary, headline=_headline)
def boundary_stage(cfg: Config, run: Run) -> StageResult:
    """Train the boundary branch on affinity labels of the confident labels."""
    from ..affinity import AffinityTargets, affinity_training_loss
    from ..data.transforms import JointTensors, joint_train_transform
    from ..models import build_backbone
    from ..models.boundary import BoundaryNet, boundary_map, load_boundary, save_boundary
    from ..train import FitConfig, fit

    b = cfg.boundary
    ds = dataset(cfg)
    device = runtime.resolve_device(cfg.device)
    model_file = model_path(run, "boundary")

    def train() -> tuple[Any, list[dict], dict]:
        seed = cfg.seed_of("boundary")
        runtime.seed_everything(seed)  # the branch's initialisation is part of the run
        model = BoundaryNet(build_backbone(b.backbone, b.weights, b.output_stride), stem_input=b.stem_input)
        mean, std = model.normalization
        pairs = ImagesWithLabels(ds.labelled(cfg.data.train_split), read_kept_ids(run),
                                 lambda sid: CONFIDENT_LABELS.read(run, sid))
        data = JointTensors(pairs, joint_train_transform(b.crop_size, b.augment, mean, std), seed,
                            target=AffinityTargets(b.radius))
        result = fit(model, data, affinity_training_loss(b.radius), model.param_groups(b.lr, b.weight_decay),
                     b.optimizer, b.lr, b.weight_decay,
                     FitConfig(epochs=b.epochs, batch_size=b.batch_size, seed=seed,
                               num_workers=runtime.loader_workers(b.num_workers, device), amp=b.amp,
                               schedule=b.schedule, desc="boundary"),
                     run.make_folder("boundary"), device)
        return model, result.history, {"param_checksums": result.param_checksums}

    t = fit_or_load(run, "boundary", train,
                    lambda path, model, _: save_boundary(path, model, b.backbone, b.output_stride, b.weights),
                    lambda path: load_boundary(path, device))
    model, history = t.model, t.history
    checksums = t.fit.get("param_checksums", [])  # []: trained before the checksums were recorded
    metrics: dict[str, Any] = {
        "epochs": len(history),
        "loss": history[-1]["loss"] if history else None,
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "train_images": len(read_kept_ids(run)),
        "world_size": len(checksums) or None,  # None: trained before the checksums were recorded
        "param_checksums": checksums,  # of the trained weights on each process (DDP keeps them equal)
    }
    val = cfg.data.val_split
    if run.is_main and val in ds.splits and ds.has_masks(val):
        model.eval()
        masks = ds.masks(val)
        items = ((boundary_map(model, masks.image(i), device), masks.mask(i)) for i in ds.ids(val))
        metrics["val_boundary"] = boundary_scores(items, b.eval_thresholds)
    return StageResult(metrics=metrics, paths={"model": str(model_file), "history": str(history_path(run, "boundary"))})


def boundary_examples(cfg: Config, run: Run, ids: list[str]) -> list[list[tuple[str, np.ndarray]]]:
    """Per train image: the image, its confident labels and its boundary map (for pictures)."""
    from ..models.boundary import boundary_map, load_boundary

    device = runtime.resolve_device(cfg.device)
    model = load_boundary(model_path(run, "boundary"), device)
    images = dataset(cfg).labelled(cfg.data.train_split)
    rows = []
    for sid in ids:
        image = images.image(sid)
        rows.append([(sid, image), ("confident labels (white: 255)", CONFIDENT_LABELS.read(run, sid)),
                     ("boundary map (stride 4)", boundary_map(model, image, device))])
    return rows
