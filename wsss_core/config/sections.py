"""The parameters of the built-in stages: one frozen dataclass per section.

Each stage names its section when it registers (`stages.registry.register`),
and the registry composes the run's `Config` from them (`config_class`); a
stage's section lives here when the method modules it calls take it too (the
classifier recipe, CAMs, the CRF, ...), else next to the stage. Field helpers
and kinds: `fields`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from .fields import (
    BATCH, COUNT, EPOCHS, LR, LR_MULT, OUTPUT_STRIDE, PIXELS, SCALE, SEED, WEIGHT, WEIGHT_DECAY, WORKERS, all_of,
    each, in_range, non_empty, optional, ordered_pair, param, positive_upto, probability, subsection, unit,
)

Weights = Literal["imagenet", "random"] | Path  # a weights spec: a word, or the path of a state-dict file


def stage_seed(feeds: str) -> int | None:
    """The `seed` of a stage that draws random numbers: unset (null), the run's top-level `seed`; set, this
    stage's own, so that replicates of one stage share everything upstream (`wsss sweep --seeds`). Added after
    runs were made: null is neutral (a run without it keeps its fingerprints)."""
    return param(None, optional(SEED), f"seed of {feeds}; null: the run's top-level seed", neutral=None, seed=True)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded demo dataset, generated deterministically from `seed`."""

    seed: int = param(0, SEED)
    n_train: int = param(240, COUNT)
    n_val: int = param(60, COUNT)
    image_size: int = param(128, in_range(32, 1024))
    max_objects: int = param(3, in_range(1, 6))
    person_label_drop: float = param(0.4, unit, "share of images with a person whose label is dropped")
    trusted_fraction: float = param(0.3, unit, "share of train images whose person label is always kept")
    cache_dir: Path | None = param(None, doc="default: $WSSS_CACHE or ~/.cache/wsss", kind="runtime")


@dataclass(frozen=True)
class LidConfig:
    """File names of the LID layout (ILSVRC DET JSON lists), relative to data.root."""

    idx_to_name: str = param("idx_to_name.json")
    train_list: str = param("train.json")
    val_list: str = param("val.json")
    train_images: str = param("train")
    val_images: str = param("val")
    val_masks: str = param("masks")
    image_ext: str = param(".JPEG")


@dataclass(frozen=True)
class DataConfig:
    format: Literal["synthetic", "voc", "lid"] = param("synthetic")
    root: Path | None = param(None, doc="dataset folder; relative paths are relative to the YAML file")
    train_split: str = param("train")
    val_split: str = param("val")
    limit: int | None = param(None, optional(COUNT), "use only the first N images of each split")
    synthetic: SyntheticConfig = subsection(SyntheticConfig)
    lid: LidConfig = subsection(LidConfig)

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) across fields, or None."""
        if self.format in ("voc", "lid") and not self.root:
            return "root", f"required when data.format is {self.format!r}"
        return None


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = param(True)
    scale_range: tuple[float, float] = param((0.7, 1.3), all_of(each(SCALE), ordered_pair))
    color_jitter: float = param(0.3, unit)


@dataclass(frozen=True)
class ClassifierConfig:
    backbone: Literal["efficientnet_lite0", "resnet50", "vgg16_gap"] = param("efficientnet_lite0")
    weights: Weights = param("imagenet", doc="imagenet | random | path to a state-dict file")
    output_stride: int = param(16, OUTPUT_STRIDE)
    image_size: int = param(320, in_range(32, 2048))
    epochs: int = param(6, EPOCHS)
    batch_size: int = param(16, BATCH)
    lr: float = param(1e-3, LR, "head learning rate; the backbone gets lr * backbone_lr_mult")
    backbone_lr_mult: float = param(0.1, LR_MULT)
    weight_decay: float = param(1e-5, WEIGHT_DECAY)
    optimizer: Literal["adam", "adamw", "sgd"] = param("adam")
    schedule: Literal["step", "poly", "constant"] = param("step")
    step_size: int = param(3, EPOCHS)
    gamma: float = param(0.2, unit)
    loss: Literal["bce", "soft_margin"] = param("bce")
    recam_weight: float = param(
        0.0, WEIGHT, "weight of ReCAM's softmax cross-entropy on CAM-weighted features (a second head, "
        "for cams.head: recam); 0: off", neutral=0.0)
    recam_epochs: int = param(
        4, in_range(0, 100_000), "with recam_weight > 0: epochs of ReCAM fine-tuning after `epochs` (a new "
        "poly schedule at recam_lr); 0: the ReCAM loss from the first epoch", neutral=4)
    recam_lr: float = param(1e-3, LR, "head learning rate of the ReCAM fine-tuning (backbone: * backbone_lr_mult); "
                            "on msrc 1e-3 beat 1e-4, where ReCAM's head barely learns", neutral=1e-3)
    balance: Literal["none", "class_aware", "repeat_factor"] = param("none")
    repeat_threshold: float = param(0.3, unit, "repeat-factor sampling threshold t")
    exclude_classes: tuple[str, ...] = param(())
    augment: AugmentConfig = subsection(AugmentConfig)
    seed: int | None = stage_seed("the classifier's head initialisation, sampling order and augmentation "
                                  "(and ReCAM's fine-tuning)")
    num_workers: int | None = param(None, optional(WORKERS), "loader workers; None: 0 on CPU, 4 on CUDA",
                                   kind="runtime")
    amp: bool = param(True, doc="mixed precision (used on CUDA only)")
    eval_threshold: float = param(0.5, unit, "score threshold of the F1 evaluation", kind="eval")


@dataclass(frozen=True)
class LabelFilterConfig:
    """The NoPeopleAllowed missing-label filter for one class."""

    enabled: bool = param(False)
    class_name: str = param("person")
    threshold: float = param(0.8, unit, "keep an unlabelled image only if P(class absent) >= threshold")
    trusted_list: Path | None = param(None, doc="file of ids with trusted labels; default: the dataset's own")
    epochs: int = param(4, EPOCHS)
    lr: float = param(1e-3, LR)
    backbone_lr_mult: float = param(0.1, LR_MULT, "1.0 fine-tunes the whole backbone (far-from-ImageNet data)")
    seed: int | None = stage_seed("the filter's classifier (head initialisation, sampling order, augmentation); "
                                  "classifier.seed does not reach it")


@dataclass(frozen=True)
class CamsConfig:
    method: Literal["gradcam", "gradcam++", "gradcam++exp"] = param(
        "gradcam", doc="gradcam++: pytorch-grad-cam's; gradcam++exp: the NoPeopleAllowed seed's (exp(score) gradients)")
    layer: str | None = param(None, doc="backbone layer for the CAMs; None: the last feature map")
    head: Literal["classifier", "recam"] = param(
        "classifier", doc="the head whose weights score the classes: the classifier's, or ReCAM's (needs "
        "classifier.recam_weight > 0)", neutral="classifier")
    scales: tuple[float, ...] = param((1.0, 0.5, 0.75, 2.0), all_of(non_empty, each(SCALE)))
    flip: bool = param(True)
    normalize: Literal["per_class", "global"] = param("per_class")
    storage: Literal["float32", "uint8"] = param(
        "float32", doc="how CAM files hold each scale's map: uint8 codes with a per-class range take 1/4 of the bytes",
        neutral="float32")
    classes: Literal["labels", "predicted"] = param("labels")
    pred_threshold: float = param(0.5, unit)
    bg_thresholds: tuple[float, ...] = param(
        (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7),
        all_of(non_empty, each(unit)), "background thresholds of the CAM mIoU sweep", kind="eval",
    )
    split: str = param("train")


@dataclass(frozen=True)
class CrfConfig:
    gt_prob: float = param(0.7, probability, "the CRF's trust in a pixel's initial label")
    gauss_sxy: float = param(3.0, PIXELS)
    gauss_compat: float = param(3.0, WEIGHT)
    bilateral_sxy: float = param(50.0, PIXELS)
    bilateral_srgb: float = param(5.0, PIXELS)
    bilateral_compat: float = param(10.0, WEIGHT)
    iterations: int = param(10, in_range(1, 1000))
    conf_fg_thres: float = param(0.30, unit)
    conf_bg_thres: float = param(0.05, unit)
    workers: int = param(2, WORKERS, "worker processes; 0 = in-process", kind="runtime")
    sweep_fg_thresholds: tuple[float, ...] = param((0.2, 0.3, 0.4, 0.5), each(unit),
                                                   "conf_fg_thres values of the precision/coverage sweep", kind="eval")
    sweep_bg_thresholds: tuple[float, ...] = param((0.02, 0.05, 0.1, 0.2), each(unit),
                                                   "conf_bg_thres values of the precision/coverage sweep", kind="eval")
    sweep_images: int = param(20, in_range(0, 10**9), "images the sweep uses (0: no sweep)", kind="eval")

    def problem(self) -> tuple[str, str] | None:
        if self.conf_bg_thres > self.conf_fg_thres:
            return "conf_bg_thres", f"must be <= crf.conf_fg_thres ({self.conf_bg_thres} > {self.conf_fg_thres})"
        return None


@dataclass(frozen=True)
class BoundaryConfig:
    """IRNet's boundary network (step 2c): a frozen ImageNet backbone and a small
    branch, trained on pixel-pair affinities of the confident labels."""

    backbone: Literal["efficientnet_lite0", "resnet50"] = param("efficientnet_lite0", doc="IRNet: resnet50")
    weights: Weights = param("imagenet", lambda v: None if v != "random" else (
        "the boundary backbone is frozen, so it needs trained weights ('imagenet' or a state-dict file), not 'random'"),
        "imagenet | path to a state-dict file; the backbone stays frozen")
    output_stride: int = param(16, OUTPUT_STRIDE)
    stem_input: bool = param(False, doc="the branch also reads the backbone's stride-2 stem, max-pooled to stride 4 "
                             "(IRNet's shallowest edge input)", neutral=False)
    crop_size: int = param(256, in_range(32, 2048), "training crop in pixels (IRNet: 512)")
    radius: int = param(10, in_range(2, 32), "pairs within this radius (stride-4 cells) are affinity labels")
    epochs: int = param(3, EPOCHS)
    batch_size: int = param(8, BATCH)
    lr: float = param(0.1, LR)
    weight_decay: float = param(1e-4, WEIGHT_DECAY)
    optimizer: Literal["adam", "adamw", "sgd"] = param("sgd")
    schedule: Literal["step", "poly", "constant"] = param("poly")
    augment: AugmentConfig = subsection(AugmentConfig, scale_range=(0.5, 1.5), color_jitter=0.0)
    seed: int | None = stage_seed("the boundary branch's initialisation, sampling order, crops and flips")
    num_workers: int | None = param(None, optional(WORKERS), "loader workers; None: 0 on CPU, 4 on CUDA",
                                 kind="runtime")
    amp: bool = param(True, doc="mixed precision (used on CUDA only)")
    eval_thresholds: tuple[float, ...] = param((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), all_of(non_empty, each(unit)),
                                            "boundary thresholds of the precision/recall evaluation", kind="eval")


@dataclass(frozen=True)
class PseudoMasksConfig:
    """IRNet's random walk from the CAMs over the boundary map (step 2c inference)."""

    radius: int = param(5, in_range(2, 16), "transition neighbourhood in stride-4 cells (IRNet: 5)")
    beta: float = param(10.0, positive_upto(1000.0), "affinities are raised to beta (IRNet: 10)")
    exp_times: int = param(8, in_range(0, 12), "the transition is applied 2^exp_times times (IRNet: 8)")
    sem_seg_bg_thres: float = param(0.25, unit, "background score after the walk, when bg_power is null (IRNet: 0.25)")
    bg_power: float | None = param(
        None, optional(positive_upto(100.0)),
        "a background (1 - max CAM) ** bg_power walked with the classes instead of the constant sem_seg_bg_thres "
        "(AffinityNet's rule); null: IRNet's constant", neutral=None)
    flip: bool = param(True, doc="boundary map averaged with that of the flipped image")
    crf_gt_prob: float | None = param(
        0.95, optional(probability),
        "the walk's mask refined by a dense CRF (crf section's pairwise terms) trusting each label this much; "
        "null: the walk's mask as it is (IRNet)")
    sweep_bg_thresholds: tuple[float, ...] = param((0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6), each(unit),
                                                   "sem_seg_bg_thres values of the mIoU sweep (when bg_power is null)",
                                                   kind="eval")
    sweep_bg_powers: tuple[float, ...] = param((2.0, 3.0, 4.0, 5.0, 6.0, 8.0), each(positive_upto(100.0)),
                                               "bg_power values of the mIoU sweep (when bg_power is set)", kind="eval",
                                               neutral=(2.0, 3.0, 4.0, 5.0, 6.0, 8.0))
    sweep_betas: tuple[float, ...] = param((3.0, 5.0, 10.0, 15.0), each(positive_upto(1000.0)),
                                           "beta values of the mIoU sweep", kind="eval")
    sweep_images: int = param(20, in_range(0, 10**9), "images the sweep uses (0: no sweep)", kind="eval")


@dataclass(frozen=True)
class SegmentationConfig:
    """Step 3: DeepLabV3+ (segmentation-models-pytorch) trained on the pseudo masks."""

    backbone: Literal["efficientnet_lite0", "resnet50"] = param("efficientnet_lite0")
    weights: Weights = param("imagenet", doc="imagenet | random | path to a state-dict file (encoder)")
    output_stride: int = param(16, OUTPUT_STRIDE)
    atrous_rates: tuple[int, int, int] = param((6, 12, 18), each(in_range(1, 100)), "ASPP rates (12/24/36 at stride 8)")
    crop_size: int = param(256, in_range(32, 2048))
    epochs: int = param(20, EPOCHS)
    bound_epochs: int | None = param(
        None, optional(EPOCHS), "the bound's epochs when they differ from the weak segmenter's (real masks keep "
        "teaching after pseudo masks stop: docs/QUALITY.md); null: `epochs`", neutral=None)
    batch_size: int = param(8, BATCH)
    lr: float = param(0.01, LR, "head learning rate; the encoder gets lr * backbone_lr_mult")
    backbone_lr_mult: float = param(0.1, LR_MULT)
    weight_decay: float = param(1e-4, WEIGHT_DECAY)
    optimizer: Literal["adam", "adamw", "sgd"] = param("sgd")
    schedule: Literal["step", "poly", "constant"] = param("poly")
    augment: AugmentConfig = subsection(AugmentConfig, scale_range=(0.5, 1.5), color_jitter=0.2)
    seed: int | None = stage_seed("both segmenters (the weak one and the bound): decoder initialisation, sampling "
                                  "order, crops, flips and colour jitter")
    checkpoint: Literal["last", "best"] = param(
        "last", doc="best: the epoch with the best val mIoU (a choice made on the val masks: report test numbers)")
    val_every: int = param(1, in_range(1, 10**6), "val mIoU after every N-th epoch and after the last (evaluation "
                           "only: the weights are the same for every N, but a change retrains, since checkpoint "
                           "best picks among the evaluated epochs); about 2 s a time on msrc", neutral=1)
    bound: bool = param(False, doc="also train on the real masks of the same images (stage bound)")
    ignore_disagreement: bool = param(
        False, doc="the weak segmenter ignores (255) pixels where the walk's mask or the confident labels (where "
        "confident) disagree with the refined pseudo mask", neutral=False)
    num_workers: int | None = param(None, optional(WORKERS), "loader workers; None: 0 on CPU, 4 on CUDA",
                                 kind="runtime")
    amp: bool = param(True, doc="mixed precision (used on CUDA only)")


@dataclass(frozen=True)
class PredictConfig:
    """Step 3 inference: test-time augmentation, class-index PNGs, evaluation."""

    splits: tuple[str, ...] = param(("train", "val"), non_empty,
                                    "splits to segment (scored where they have masks; train: the kept images, so "
                                    "the segmenter is scored on the images its pseudo masks were made for)")
    tta_scales: tuple[float, ...] = param((1.0,), all_of(non_empty, each(SCALE)),
                                       "logits averaged over these scales (reference: 0.5, 1, 2)")
    tta_flip: bool = param(True, doc="and over horizontal flips")
    max_side: int | None = param(1024, optional(in_range(32, 16384)),
                                 "images with a longer side are segmented at this long side and the mask resized "
                                 "back (memory bounded, objects nearer the training scale); null: full size")
    crf_gt_prob: float | None = param(
        None, optional(probability),
        "the predictions refined by a dense CRF (crf section's pairwise terms) over the classes each holds, "
        "trusting each label this much; null: the segmenter's argmax as it is", neutral=None)
    precision: Literal["float32", "bfloat16"] = param(
        "float32", doc="the segmenter's arithmetic: bfloat16 autocast is ~x1.9 faster on CPUs with AVX-512 BF16 (and "
        "on CUDA), far slower on CPUs without it", neutral="float32")
    layout: Literal["voc", "lid"] = param("voc", doc="lid: the LID submission layout (one PNG per listed image)")


@dataclass(frozen=True)
class Config:
    """What every run has; the stages' sections (`data`, `classifier`, `cams`, ...)
    are added by the stage registry (`config_class`): a stage declares its
    section when it registers."""

    name: str = param("demo", kind="runtime")
    seed: int = param(0, SEED, "the seed of every stage that draws random numbers and sets no seed of its own "
                      "(classifier, label_filter, boundary, segmentation: `<section>.seed`); the other stages are "
                      "deterministic", seed=True)
    device: Literal["auto", "cpu", "cuda"] = param("auto", kind="runtime")

    def seed_of(self, section: str) -> int:
        """The seed a random stage uses: its section's own `seed`, else the run's."""
        own = getattr(getattr(self, section), "seed", None)
        return self.seed if own is None else int(own)


SECTIONS: dict[str, type] = {}  # section name -> dataclass, in declaration order (the stage registry declares them)
_ORDER: dict[str, str] = {}  # section name -> its sort key (the declaring stage's folder: the pipeline order)


def add_section(name: str, cls: type, order: str = "") -> None:
    """Declare the config section `name` (a frozen dataclass of parameters); `order`: where it goes in
    `Config` and in a run's config.yaml (a stage's folder, "03_crf"; "" after every keyed section)."""
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"config section {name!r}: the name of a top-level parameter")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section {name!r}: {cls!r} is not a dataclass")
    SECTIONS[name] = cls
    _ORDER[name] = order


def ordered_sections() -> list[tuple[str, type]]:
    """The declared sections by their `order` key (ties, and sections without one, in declaration order)."""
    return sorted(SECTIONS.items(), key=lambda kv: (_ORDER[kv[0]] == "", _ORDER[kv[0]]))


@contextlib.contextmanager
def kept_sections() -> Iterator[None]:
    """Sections declared inside (tests' scratch stages) are forgotten after."""
    sections, order = dict(SECTIONS), dict(_ORDER)
    try:
        yield
    finally:
        SECTIONS.clear()
        SECTIONS.update(sections)
        _ORDER.clear()
        _ORDER.update(order)


_COMPOSED: dict[tuple, type] = {}


def config_class() -> type:
    """`Config` with a field per declared section, in pipeline order (`ordered_sections`)."""
    key = tuple(ordered_sections())
    if key not in _COMPOSED:
        _COMPOSED[key] = dataclasses.make_dataclass(
            "Config", [(name, cls, subsection(cls)) for name, cls in key], bases=(Config,), frozen=True,
            namespace={"__doc__": Config.__doc__, "__module__": __name__})
    return _COMPOSED[key]
