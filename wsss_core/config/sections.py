"""The experiment parameters: one frozen dataclass per stage section.

Every field says what changing it does (`kind` in the field metadata):
- "output" (default): the stage's outputs change; the stage and everything
  downstream become stale and are recomputed.
- "eval": only the evaluation of the outputs changes (a threshold sweep); the
  stage re-evaluates its existing outputs without recomputing them.
- "runtime": neither (worker counts, device, cache folder); never stale.
Fingerprints (`store`) hash only "output" fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names file and key.

    `key`: the dotted key at fault, when there is one (the loader then names
    the `--set` that set it rather than the YAML file)."""

    def __init__(self, message: str = "", key: str | None = None):
        super().__init__(message)
        self.key = key


KINDS = ("output", "eval", "runtime")

# --------------------------------------------------------------------------- checks
Check = Callable[[Any], "str | None"]


def _unit(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v!r}"


def _non_empty(v: Any) -> str | None:
    return None if len(v) > 0 else "must not be empty"


def _each(check: Check) -> Check:
    def run(values: Any) -> str | None:
        for i, v in enumerate(values):
            msg = check(v)
            if msg:
                return f"item {i}: {msg}"
        return None

    return run


def _all(*checks: Check) -> Check:
    def run(v: Any) -> str | None:
        for c in checks:
            msg = c(v)
            if msg:
                return msg
        return None

    return run


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _range(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v!r}"


def _positive_upto(hi: float) -> Check:
    return lambda v: None if 0 < v <= hi else f"must be > 0 and <= {hi}, got {v!r}"


# Every number has a range: a value that passes the config layer can never crash a stage after it
# cleared the previous results (an overflowing seed, an epoch count no run reaches, an infinite rate).
_SEED: Check = _range(0, 2**32 - 1)  # numpy's and torch's generators take any seed in this range
_COUNT: Check = _range(1, 10**9)
_EPOCHS: Check = _range(1, 100_000)
_BATCH: Check = _range(1, 65_536)
_LR: Check = _positive_upto(10.0)
_LR_MULT: Check = _positive_upto(100.0)
_WEIGHT_DECAY: Check = _range(0.0, 1.0)
_WORKERS: Check = _range(0, 256)
_SCALE: Check = _positive_upto(8.0)
_PIXELS: Check = _positive_upto(1000.0)
_WEIGHT: Check = _range(0.0, 1000.0)


def _ordered_pair(v: Any) -> str | None:
    if len(v) != 2:
        return f"must have exactly 2 values, got {len(v)}"
    return None if v[0] <= v[1] else f"must be (low, high) with low <= high, got {list(v)}"


def _p(default: Any, check: Check | None = None, doc: str = "", kind: str = "output") -> Any:
    """A parameter with a default value, an optional check, a short doc and
    its kind (what changing it makes stale, see the module docstring)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    if kind not in KINDS:
        raise TypeError(f"kind must be one of {KINDS}")
    return field(default=default, metadata={"check": check, "doc": doc, "kind": kind})


def _section(cls: type, **defaults: Any) -> Any:
    """A sub-section; `defaults` override the section class's own defaults here
    (keys the YAML leaves out keep these values)."""
    return field(default_factory=(lambda: cls(**defaults)) if defaults else cls)


_OUTPUT_STRIDE: Check = lambda v: None if v in (8, 16) else f"must be 8 or 16, got {v!r}"  # noqa: E731


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded demo dataset, generated deterministically from `seed`."""

    seed: int = _p(0, _SEED)
    n_train: int = _p(240, _COUNT)
    n_val: int = _p(60, _COUNT)
    image_size: int = _p(128, _range(32, 1024))
    max_objects: int = _p(3, _range(1, 6))
    person_label_drop: float = _p(0.4, _unit, "share of images with a person whose label is dropped")
    trusted_fraction: float = _p(0.3, _unit, "share of train images whose person label is always kept")
    cache_dir: str | None = _p(None, doc="default: $WSSS_CACHE or ~/.cache/wsss", kind="runtime")


@dataclass(frozen=True)
class LidConfig:
    """File names of the LID layout (ILSVRC DET JSON lists), relative to data.root."""

    idx_to_name: str = _p("idx_to_name.json")
    train_list: str = _p("train.json")
    val_list: str = _p("val.json")
    train_images: str = _p("train")
    val_images: str = _p("val")
    val_masks: str = _p("masks")
    image_ext: str = _p(".JPEG")


@dataclass(frozen=True)
class DataConfig:
    format: Literal["synthetic", "voc", "lid"] = _p("synthetic")
    root: str | None = _p(None, doc="dataset folder; relative paths are relative to the YAML file")
    train_split: str = _p("train")
    val_split: str = _p("val")
    limit: int | None = _p(None, _optional(_COUNT), "use only the first N images of each split")
    synthetic: SyntheticConfig = _section(SyntheticConfig)
    lid: LidConfig = _section(LidConfig)


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = _p(True)
    scale_range: tuple[float, float] = _p((0.7, 1.3), _all(_each(_SCALE), _ordered_pair))
    color_jitter: float = _p(0.3, _unit)


@dataclass(frozen=True)
class ClassifierConfig:
    backbone: Literal["efficientnet_lite0", "resnet50", "vgg16_gap"] = _p("efficientnet_lite0")
    weights: str = _p("imagenet", doc="imagenet | random | path to a state-dict file")
    output_stride: int = _p(16, _OUTPUT_STRIDE)
    image_size: int = _p(320, _range(32, 2048))
    epochs: int = _p(6, _EPOCHS)
    batch_size: int = _p(16, _BATCH)
    lr: float = _p(1e-3, _LR, "head learning rate; the backbone gets lr * backbone_lr_mult")
    backbone_lr_mult: float = _p(0.1, _LR_MULT)
    weight_decay: float = _p(1e-5, _WEIGHT_DECAY)
    optimizer: Literal["adam", "sgd"] = _p("adam")
    schedule: Literal["step", "poly", "constant"] = _p("step")
    step_size: int = _p(3, _EPOCHS)
    gamma: float = _p(0.2, _unit)
    loss: Literal["bce", "soft_margin"] = _p("bce")
    balance: Literal["none", "class_aware", "repeat_factor"] = _p("none")
    repeat_threshold: float = _p(0.3, _unit, "repeat-factor sampling threshold t")
    exclude_classes: tuple[str, ...] = _p(())
    augment: AugmentConfig = _section(AugmentConfig)
    num_workers: int | None = _p(None, _optional(_WORKERS), "loader workers; None: 0 on CPU, 4 on CUDA",
                                   kind="runtime")
    amp: bool = _p(True, doc="mixed precision (used on CUDA only)")
    eval_threshold: float = _p(0.5, _unit, "score threshold of the F1 evaluation", kind="eval")


@dataclass(frozen=True)
class LabelFilterConfig:
    """The NoPeopleAllowed missing-label filter for one class."""

    enabled: bool = _p(False)
    class_name: str = _p("person")
    threshold: float = _p(0.8, _unit, "keep an unlabelled image only if P(class absent) >= threshold")
    trusted_list: str | None = _p(None, doc="file of ids with trusted labels; default: the dataset's own")
    epochs: int = _p(4, _EPOCHS)
    lr: float = _p(1e-3, _LR)
    backbone_lr_mult: float = _p(0.1, _LR_MULT, "1.0 fine-tunes the whole backbone (far-from-ImageNet data)")


@dataclass(frozen=True)
class CamsConfig:
    method: Literal["gradcam", "gradcam++"] = _p("gradcam")
    layer: str | None = _p(None, doc="backbone layer for the CAMs; None: the last feature map")
    scales: tuple[float, ...] = _p((1.0, 0.5, 0.75, 2.0), _all(_non_empty, _each(_SCALE)))
    flip: bool = _p(True)
    normalize: Literal["per_class", "global"] = _p("per_class")
    classes: Literal["labels", "predicted"] = _p("labels")
    pred_threshold: float = _p(0.5, _unit)
    bg_thresholds: tuple[float, ...] = _p(
        (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7),
        _all(_non_empty, _each(_unit)), "background thresholds of the CAM mIoU sweep", kind="eval",
    )
    split: str = _p("train")


@dataclass(frozen=True)
class CrfConfig:
    gt_prob: float = _p(0.7, _range(0.0, 1.0))
    gauss_sxy: float = _p(3.0, _PIXELS)
    gauss_compat: float = _p(3.0, _WEIGHT)
    bilateral_sxy: float = _p(50.0, _PIXELS)
    bilateral_srgb: float = _p(5.0, _PIXELS)
    bilateral_compat: float = _p(10.0, _WEIGHT)
    iterations: int = _p(10, _range(1, 1000))
    conf_fg_thres: float = _p(0.30, _unit)
    conf_bg_thres: float = _p(0.05, _unit)
    workers: int = _p(2, _WORKERS, "worker processes; 0 = in-process", kind="runtime")


@dataclass(frozen=True)
class BoundaryConfig:
    """IRNet's boundary network (step 2c): a frozen ImageNet backbone and a small
    branch, trained on pixel-pair affinities of the confident labels."""

    backbone: Literal["efficientnet_lite0", "resnet50"] = _p("efficientnet_lite0", doc="IRNet: resnet50")
    weights: str = _p("imagenet", doc="imagenet | path to a state-dict file; the backbone stays frozen")
    output_stride: int = _p(16, _OUTPUT_STRIDE)
    crop_size: int = _p(256, _range(32, 2048), "training crop in pixels (IRNet: 512)")
    radius: int = _p(10, _range(2, 32), "pairs within this radius (stride-4 cells) are affinity labels")
    epochs: int = _p(3, _EPOCHS)
    batch_size: int = _p(8, _BATCH)
    lr: float = _p(0.1, _LR)
    weight_decay: float = _p(1e-4, _WEIGHT_DECAY)
    optimizer: Literal["adam", "sgd"] = _p("sgd")
    schedule: Literal["step", "poly", "constant"] = _p("poly")
    augment: AugmentConfig = _section(AugmentConfig, scale_range=(0.5, 1.5), color_jitter=0.0)
    num_workers: int | None = _p(None, _optional(_WORKERS), "loader workers; None: 0 on CPU, 4 on CUDA",
                                 kind="runtime")
    amp: bool = _p(True, doc="mixed precision (used on CUDA only)")
    eval_thresholds: tuple[float, ...] = _p((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), _all(_non_empty, _each(_unit)),
                                            "boundary thresholds of the precision/recall evaluation", kind="eval")


@dataclass(frozen=True)
class PseudoMasksConfig:
    """IRNet's random walk from the CAMs over the boundary map (step 2c inference)."""

    radius: int = _p(5, _range(2, 16), "transition neighbourhood in stride-4 cells (IRNet: 5)")
    beta: float = _p(10.0, _positive_upto(1000.0), "affinities are raised to beta (IRNet: 10)")
    exp_times: int = _p(8, _range(0, 12), "the transition is applied 2^exp_times times (IRNet: 8)")
    sem_seg_bg_thres: float = _p(0.25, _unit, "background score after the walk (IRNet: 0.25)")
    flip: bool = _p(True, doc="boundary map averaged with that of the flipped image")


@dataclass(frozen=True)
class SegmentationConfig:
    """Step 3: DeepLabV3+ (segmentation-models-pytorch) trained on the pseudo masks."""

    backbone: Literal["efficientnet_lite0", "resnet50"] = _p("efficientnet_lite0")
    weights: str = _p("imagenet", doc="imagenet | random | path to a state-dict file (encoder)")
    output_stride: int = _p(16, _OUTPUT_STRIDE)
    atrous_rates: tuple[int, int, int] = _p((6, 12, 18), _each(_range(1, 100)), "ASPP rates (12/24/36 at stride 8)")
    crop_size: int = _p(256, _range(32, 2048))
    epochs: int = _p(20, _EPOCHS)
    batch_size: int = _p(8, _BATCH)
    lr: float = _p(0.01, _LR, "head learning rate; the encoder gets lr * backbone_lr_mult")
    backbone_lr_mult: float = _p(0.1, _LR_MULT)
    weight_decay: float = _p(1e-4, _WEIGHT_DECAY)
    optimizer: Literal["adam", "sgd"] = _p("sgd")
    schedule: Literal["step", "poly", "constant"] = _p("poly")
    augment: AugmentConfig = _section(AugmentConfig, scale_range=(0.5, 1.5), color_jitter=0.2)
    checkpoint: Literal["last", "best"] = _p(
        "last", doc="best: the epoch with the best val mIoU (a choice made on the val masks: report test numbers)")
    upper_bound: bool = _p(False, doc="also train on the real masks of the same images (stage segmentation_full)")
    num_workers: int | None = _p(None, _optional(_WORKERS), "loader workers; None: 0 on CPU, 4 on CUDA",
                                 kind="runtime")
    amp: bool = _p(True, doc="mixed precision (used on CUDA only)")


@dataclass(frozen=True)
class PredictConfig:
    """Step 3 inference: test-time augmentation, class-index PNGs, evaluation."""

    splits: tuple[str, ...] = _p(("val",), _non_empty, "splits to segment (scored where they have masks)")
    tta_scales: tuple[float, ...] = _p((1.0,), _all(_non_empty, _each(_SCALE)),
                                       "logits averaged over these scales (reference: 0.5, 1, 2)")
    tta_flip: bool = _p(True, doc="and over horizontal flips")
    layout: Literal["voc", "lid"] = _p("voc", doc="lid: the LID submission layout (one PNG per listed image)")


@dataclass(frozen=True)
class Config:
    name: str = _p("demo", kind="runtime")
    seed: int = _p(0, _SEED)
    device: Literal["auto", "cpu", "cuda"] = _p("auto", kind="runtime")
    data: DataConfig = _section(DataConfig)
    classifier: ClassifierConfig = _section(ClassifierConfig)
    label_filter: LabelFilterConfig = _section(LabelFilterConfig)
    cams: CamsConfig = _section(CamsConfig)
    crf: CrfConfig = _section(CrfConfig)
    boundary: BoundaryConfig = _section(BoundaryConfig)
    pseudo_masks: PseudoMasksConfig = _section(PseudoMasksConfig)
    segmentation: SegmentationConfig = _section(SegmentationConfig)
    predict: PredictConfig = _section(PredictConfig)
