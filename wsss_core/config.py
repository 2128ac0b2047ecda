"""Typed experiment parameters.

One YAML file per experiment, one section per stage, loaded into frozen
dataclasses. Unknown keys, wrong types and impossible values fail at load time
with the file and the dotted key path, and so do dotted overrides, which go
through the same validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names file and key."""


# --------------------------------------------------------------------------- checks
Check = Callable[[Any], "str | None"]


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v!r}"


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


def _ordered_pair(v: Any) -> str | None:
    if len(v) != 2:
        return f"must have exactly 2 values, got {len(v)}"
    return None if v[0] <= v[1] else f"must be (low, high) with low <= high, got {list(v)}"


def _p(default: Any, check: Check | None = None, doc: str = "") -> Any:
    """A parameter with a default value, an optional check and a short doc."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"check": check, "doc": doc})


def _section(cls: type) -> Any:
    return field(default_factory=cls)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded demo dataset, generated deterministically from `seed`."""

    seed: int = _p(0)
    n_train: int = _p(240, _positive)
    n_val: int = _p(60, _positive)
    image_size: int = _p(128, _range(32, 1024))
    max_objects: int = _p(3, _range(1, 6))
    person_label_drop: float = _p(0.4, _unit, "share of images with a person whose label is dropped")
    trusted_fraction: float = _p(0.3, _unit, "share of train images whose person label is always kept")
    cache_dir: str | None = _p(None, doc="default: $WSSS_CACHE or ~/.cache/wsss")


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
    limit: int | None = _p(None, _optional(_positive), "use only the first N images of each split")
    synthetic: SyntheticConfig = _section(SyntheticConfig)
    lid: LidConfig = _section(LidConfig)


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = _p(True)
    scale_range: tuple[float, float] = _p((0.7, 1.3), _all(_each(_positive), _ordered_pair))
    color_jitter: float = _p(0.3, _unit)


@dataclass(frozen=True)
class ClassifierConfig:
    backbone: Literal["efficientnet_lite0", "resnet50", "vgg16_gap"] = _p("efficientnet_lite0")
    weights: str = _p("imagenet", doc="imagenet | random | path to a state-dict file")
    output_stride: int = _p(16, lambda v: None if v in (8, 16) else f"must be 8 or 16, got {v!r}")
    image_size: int = _p(320, _range(32, 2048))
    epochs: int = _p(6, _positive)
    batch_size: int = _p(16, _positive)
    lr: float = _p(1e-3, _positive, "head learning rate; the backbone gets lr * backbone_lr_mult")
    backbone_lr_mult: float = _p(0.1, _positive)
    weight_decay: float = _p(1e-5, _non_negative)
    optimizer: Literal["adam", "sgd"] = _p("adam")
    schedule: Literal["step", "poly", "constant"] = _p("step")
    step_size: int = _p(3, _positive)
    gamma: float = _p(0.2, _unit)
    loss: Literal["bce", "soft_margin"] = _p("bce")
    balance: Literal["none", "class_aware", "repeat_factor"] = _p("none")
    repeat_threshold: float = _p(0.3, _unit, "repeat-factor sampling threshold t")
    exclude_classes: tuple[str, ...] = _p(())
    augment: AugmentConfig = _section(AugmentConfig)
    num_workers: int | None = _p(None, _optional(_non_negative), "loader workers; None: 0 on CPU, 4 on CUDA")
    amp: bool = _p(True, doc="mixed precision (used on CUDA only)")
    eval_threshold: float = _p(0.5, _unit)


@dataclass(frozen=True)
class LabelFilterConfig:
    """The NoPeopleAllowed missing-label filter for one class."""

    enabled: bool = _p(False)
    class_name: str = _p("person")
    threshold: float = _p(0.8, _unit, "keep an unlabelled image only if P(class absent) >= threshold")
    trusted_list: str | None = _p(None, doc="file of ids with trusted labels; default: the dataset's own")
    epochs: int = _p(4, _positive)
    lr: float = _p(1e-3, _positive)
    backbone_lr_mult: float = _p(0.1, _positive, "1.0 fine-tunes the whole backbone (far-from-ImageNet data)")


@dataclass(frozen=True)
class CamsConfig:
    method: Literal["gradcam", "gradcam++"] = _p("gradcam")
    layer: str | None = _p(None, doc="backbone layer for the CAMs; None: the last feature map")
    scales: tuple[float, ...] = _p((1.0, 0.5, 0.75, 2.0), _all(_non_empty, _each(_positive)))
    flip: bool = _p(True)
    normalize: Literal["per_class", "global"] = _p("per_class")
    classes: Literal["labels", "predicted"] = _p("labels")
    pred_threshold: float = _p(0.5, _unit)
    bg_thresholds: tuple[float, ...] = _p(
        (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7),
        _all(_non_empty, _each(_unit)),
    )
    split: str = _p("train")


@dataclass(frozen=True)
class CrfConfig:
    gt_prob: float = _p(0.7, _range(0.0, 1.0))
    gauss_sxy: float = _p(3.0, _positive)
    gauss_compat: float = _p(3.0, _non_negative)
    bilateral_sxy: float = _p(50.0, _positive)
    bilateral_srgb: float = _p(5.0, _positive)
    bilateral_compat: float = _p(10.0, _non_negative)
    iterations: int = _p(10, _positive)
    conf_fg_thres: float = _p(0.30, _unit)
    conf_bg_thres: float = _p(0.05, _unit)
    workers: int = _p(2, _non_negative, "worker processes; 0 = in-process")


@dataclass(frozen=True)
class Config:
    name: str = _p("demo")
    seed: int = _p(0)
    device: Literal["auto", "cpu", "cuda"] = _p("auto")
    data: DataConfig = _section(DataConfig)
    classifier: ClassifierConfig = _section(ClassifierConfig)
    label_filter: LabelFilterConfig = _section(LabelFilterConfig)
    cams: CamsConfig = _section(CamsConfig)
    crf: CrfConfig = _section(CrfConfig)


# --------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"list of {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError(key)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: must have exactly {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported parameter type {tp!r} at {key}")  # programming error


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known keys in "
            f"{prefix or 'the top level'}: {', '.join(sorted(fields))})"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            v = _coerce(raw[name], hints[name], key)
        else:
            v = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        check = f.metadata.get("check")
        if check is not None:
            msg = check(v)
            if msg:
                raise ConfigError(f"{key}: {msg}")
        values[name] = v
    return cls(**values)


def parse_override_value(text: str) -> Any:
    """Parse a command-line override value (`1e-3`, `[1.0, 0.5]`, `true`) as YAML."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`cams.scales`) in a copy of the raw mapping."""
    out = json.loads(json.dumps(raw)) if raw else {}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override {dotted!r}: empty key component")
        cls: Any = Config
        node = out
        for i, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
            if part not in names:
                path = ".".join(parts[: i + 1])
                raise ConfigError(f"{path}: unknown key (override {dotted!r})")
            if i == len(parts) - 1:
                node[part] = list(value) if isinstance(value, tuple) else value
            else:
                cls = typing.get_type_hints(cls)[part]
                nxt = node.get(part)
                if nxt is None:
                    nxt = node[part] = {}
                elif not isinstance(nxt, dict):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section")
                node = nxt
    return out


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Make data paths absolute, relative to the YAML file's folder."""
    data = cfg.data
    root = data.root
    if root is not None:
        p = Path(os.path.expandvars(os.path.expanduser(root)))
        root = str(p if p.is_absolute() else (base / p).resolve())
    syn = data.synthetic
    cache = syn.cache_dir
    if cache is not None:
        p = Path(os.path.expandvars(os.path.expanduser(cache)))
        cache = str(p if p.is_absolute() else (base / p).resolve())
    lf = cfg.label_filter
    trusted = lf.trusted_list
    if trusted is not None:
        p = Path(os.path.expandvars(os.path.expanduser(trusted)))
        trusted = str(p if p.is_absolute() else (base / p).resolve())
    weights = cfg.classifier.weights
    if weights not in ("imagenet", "random"):
        p = Path(os.path.expandvars(os.path.expanduser(weights)))
        weights = str(p if p.is_absolute() else (base / p).resolve())
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(data, root=root, synthetic=dataclasses.replace(syn, cache_dir=cache)),
        label_filter=dataclasses.replace(lf, trusted_list=trusted),
        classifier=dataclasses.replace(cfg.classifier, weights=weights),
    )


def _cross_checks(cfg: Config) -> None:
    w = cfg.classifier.weights
    if w not in ("imagenet", "random") and not Path(w).is_file():
        raise ConfigError(f"classifier.weights: weights file not found: {w} (or use 'imagenet' / 'random')")
    if cfg.data.format in ("voc", "lid") and not cfg.data.root:
        raise ConfigError(f"data.root: required when data.format is {cfg.data.format!r}")
    if cfg.crf.conf_bg_thres > cfg.crf.conf_fg_thres:
        raise ConfigError(
            "crf.conf_bg_thres: must be <= crf.conf_fg_thres "
            f"({cfg.crf.conf_bg_thres} > {cfg.crf.conf_fg_thres})"
        )


def config_from_dict(
    raw: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    base_dir: str | Path = ".",
) -> Config:
    """Build and validate a Config from a raw mapping (plus dotted overrides)."""
    raw = dict(raw or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
    cfg = _build(Config, raw, "")
    cfg = _resolve_paths(cfg, Path(base_dir).resolve())
    _cross_checks(cfg)
    return cfg


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load an experiment YAML into a validated, frozen Config.

    Errors name the file and the dotted key: `params/x.yaml: cams.scales: must not be empty`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- output
def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as plain YAML/JSON-able data."""
    return _plain(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def section_hash(cfg: Config, sections: tuple[str, ...] | list[str]) -> str:
    """Stable hash of the named top-level sections (what a stage depends on)."""
    payload = {s: config_to_dict(getattr(cfg, s)) for s in sections}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_root(cfg: Config) -> Path:
    """Folder for generated data (synthetic datasets)."""
    if cfg.data.synthetic.cache_dir:
        return Path(cfg.data.synthetic.cache_dir)
    env = os.environ.get("WSSS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wsss"
