"""What a stage reads besides its upstream artifacts: the dataset (index files,
validated once by the data stage) and the ids it works on."""

from __future__ import annotations

from typing import Any

from ..artifacts import read_kept_ids
from ..config import Config, ConfigError
from ..store import Run


def dataset(cfg: Config) -> Any:
    """The dataset without re-validating every file (the data stage did)."""
    from ..data import open_dataset

    return open_dataset(cfg.data, validate=False)


def stage_ids(cfg: Config, run: Run, split: str) -> list[str]:
    """The ids a stage works on: for the train split, those the label filter kept."""
    if split == cfg.data.train_split:
        return read_kept_ids(run)
    return dataset(cfg).ids(split)


def stage_images(cfg: Config, run: Run, split: str) -> tuple[Any, list[str]]:
    """(the split's LabelledImages, the ids the stage works on)."""
    return dataset(cfg).labelled(split), stage_ids(cfg, run, split)


def check_split(cfg: Config, ds: Any, key: str, split: str) -> None:
    """A stage's split must be one the run opens (train_split or val_split)."""
    if split not in ds.splits:
        raise ConfigError(f"{key}: {split!r} is not a split of this run (data.train_split / data.val_split: "
                          f"{', '.join(ds.splits)})", key)
