"""Fit or load: the one protocol of the trained stages (classifier, boundary
net, both segmenters).

A stage's `model.pt` is written last, after `history.json` and `fit.json`
(all through `artifacts.py`, rank 0 only), so its presence means training
finished with these parameters: a rerun of the stage (an evaluation-only
change) loads the model and its records instead of training. Without it the
stage trains, resuming from the fit loop's `checkpoint.pt` when a killed run
left one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from .artifacts import model_path, read_fit_info, read_history, write_fit_info, write_history, write_samples_per_rank
from .store import FileError, Run

M = TypeVar("M")


@dataclass
class Trained(Generic[M]):
    """A stage's model with its epoch records and how it was fit (`fit.json`: `param_checksums`, ...)."""

    model: M
    history: list[dict[str, Any]]
    fit: dict[str, Any]
    trained_now: bool


def fit_or_load(run: Run, stage: str, train: Callable[[], tuple[M, list[dict[str, Any]], dict[str, Any]]],
                save: Callable[[Path, M, list[dict[str, Any]]], None], load: Callable[[Path], M]) -> Trained[M]:
    """Load `stage`'s finished model, or `train()` it -> (model, history, fit info) and store it: history,
    fit info (under torchrun its `samples_per_rank` also in a file of their own), then the model
    (`save(path, model, history)`)."""
    model_file = model_path(run, stage)
    if model_file.is_file():
        history = read_history(run, stage)
        if history is None:
            raise FileError(f"{run.folder(stage) / 'history.json'}: missing beside {model_file.name}; rerun the "
                            f"{stage} stage (wsss run --force {stage})")
        return Trained(load(model_file), history, read_fit_info(run, stage), trained_now=False)
    model, history, info = train()
    samples = info.get("samples_per_rank")
    if run.is_main:
        write_history(run, stage, history)
        write_fit_info(run, stage, info)
        if samples is not None and len(samples) > 1:
            write_samples_per_rank(run, stage, samples)
        save(model_file, model, history)  # last: its presence means training is complete
    return Trained(model, history, info, trained_now=True)
