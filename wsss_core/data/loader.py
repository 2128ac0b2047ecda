"""`open_dataset`: pick the reader for `data.format`, then validate."""

from __future__ import annotations

from ..config import DataConfig
from .base import Dataset
from .errors import DataError
from .lid import open_lid
from .synthetic import ensure_synthetic
from .validate import validate_dataset
from .voc import open_voc


def open_dataset(cfg: DataConfig, validate: bool = True) -> Dataset:
    """Open the dataset described by `cfg` with splits (train_split, val_split),
    each cut to its first `cfg.limit` ids. The synthetic demo is generated
    into the cache first if needed. With `validate`, every file is checked
    up front (DataError on the first problem)."""
    splits = tuple(dict.fromkeys((cfg.train_split, cfg.val_split)))
    if cfg.format == "synthetic":
        ds = open_voc(ensure_synthetic(cfg.synthetic), splits, cfg.limit, format="synthetic")
    elif cfg.format == "voc":
        ds = open_voc(_root(cfg), splits, cfg.limit)
    elif cfg.format == "lid":
        ds = open_lid(_root(cfg), cfg.lid, cfg.train_split, cfg.val_split, cfg.limit)
    else:
        raise DataError(f"data.format: unknown format {cfg.format!r} (synthetic | voc | lid)")
    if validate:
        validate_dataset(ds)
    return ds


def _root(cfg: DataConfig) -> str:
    if not cfg.root:
        raise DataError(f"data.root: required when data.format is {cfg.format!r}")
    return cfg.root
