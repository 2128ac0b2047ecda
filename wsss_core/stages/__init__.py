"""The pipeline's stages: one registry, one way to run a stage.

Each stage is a function `stage(cfg, run) -> StageResult` in its own module
here, registered with its folder, the config sections it uses, its upstream
stages, its notebook and its headline metric. The registration order is the
pipeline order. Notebooks and the CLI call `run_stage(name, cfg, run)`, which

1. refuses when an upstream stage is missing, interrupted or stale (naming why),
2. skips a stage that is done with the same inputs and parameters,
3. checks the stage's parameters against the dataset before any work
   (a bad value leaves the previous results intact),
4. takes the run folder's lock, records the manifest, and runs the stage.

A stage never runs another stage: `wsss run` runs them in order.

Stage modules import torch and the models inside the functions that use them,
so importing the registry stays light (0.1 s, not 2.5 s) for the data stage
and for a rerun that skips every stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import runtime
from ..config import Config, ConfigError
from ..store import Run, StageResult, StageSpec, UnknownStageError, now_iso

StageFn = Callable[[Config, Run], StageResult]
CheckFn = Callable[[Config, Any], None]  # (cfg, dataset) -> None or ConfigError/DataError
HeadlineFn = Callable[[dict], str]


@dataclass(frozen=True)
class Stage:
    """A registered stage: what the run store needs (`spec`) and what runs and shows it."""

    spec: StageSpec
    fn: StageFn
    notebook: str | None = None  # notebooks/<file>; None: no notebook (run by the CLI only)
    check: CheckFn | None = None
    headline: HeadlineFn | None = None

    @property
    def name(self) -> str:
        return self.spec.name


STAGES: dict[str, Stage] = {}


def register(name: str, folder: str, sections: tuple[str, ...], upstream: tuple[str, ...] = (), *,
             notebook: str | None = None, check: CheckFn | None = None, headline: HeadlineFn | None = None,
             content: Callable[[Config], dict] | None = None,
             explain_content: Callable[[dict, dict], list[str]] | None = None, ignore: tuple[str, ...] = (),
             reads_metrics: tuple[str, ...] = ()) -> Callable[[StageFn], StageFn]:
    """Decorator adding a stage function to the registry (in pipeline order).

    `ignore`: dotted fields of `sections` that do not change this stage's
    outputs; `reads_metrics`: upstream stages whose evaluation results this
    stage's evaluation uses (their evaluation parameters re-evaluate it too)."""

    def deco(fn: StageFn) -> StageFn:
        spec = StageSpec(name, folder, tuple(sections), tuple(upstream), content, explain_content, tuple(ignore),
                         tuple(reads_metrics))
        STAGES[name] = Stage(spec, fn, notebook, check, headline)
        return fn

    return deco


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def pipeline_order() -> list[str]:
    """Stage names in the order the pipeline runs them."""
    return list(STAGES)


def open_run(run_dir: str | Path, cfg: Config) -> Run:
    """The run directory for `cfg` (nothing is written until a stage starts)."""
    return Run(run_dir, cfg, {n: s.spec for n, s in STAGES.items()})


def dataset(cfg: Config):
    """The dataset without re-validating every file (the data stage did)."""
    from ..data import open_dataset

    return open_dataset(cfg.data, validate=False)


def check_stage(name: str, cfg: Config, ds: Any = None) -> None:
    """The stage's up-front checks of its parameters against the dataset, and
    that a requested CUDA device exists."""
    s = stage(name)
    runtime.check_device(cfg.device)
    if s.check is not None:
        s.check(cfg, dataset(cfg) if ds is None else ds)


def run_stage(name: str, cfg: Config, run: Run, force: bool = False) -> StageResult:
    """Run one stage unless it is already done with the same inputs.

    Refuses (StaleUpstreamError) when an upstream stage is missing or stale;
    `force` reruns it from scratch. Evaluation-only parameter changes
    re-evaluate the kept outputs.
    """
    s = stage(name)
    say = print if run.is_main else (lambda *a, **k: None)  # one line per stage, not one per torchrun process
    run.check_folder(write=False)
    run.check_upstream(name)
    if not force and run.is_done(name):
        say(f"[wsss] {s.spec.folder}: already done with these parameters, skipped", flush=True)
        return run.result(name)
    check_stage(name, cfg)
    run.check_folder()
    if runtime.world_size() > 1:  # torchrun: join the process group before the barrier below
        runtime.init_distributed(runtime.resolve_device(cfg.device))
    with run.lock(f"wsss stage {name}"):
        started = now_iso()
        t0 = time.perf_counter()
        reeval = not force and run.usable(name)
        run.save_config()
        run.begin(name, fresh=force)
        runtime.barrier()  # rank 0 has cleared stale outputs before anyone writes
        what = "re-evaluating (only evaluation parameters changed)" if reeval else "running"
        say(f"[wsss] {s.spec.folder}: {what}", flush=True)
        try:
            result = s.fn(cfg, run)
        except BaseException as e:
            run.fail(name, e, started)
            raise
        result.seconds = time.perf_counter() - t0
        run.finish(name, result, started)
    say(f"[wsss] {s.spec.folder}: done in {result.seconds:.1f} s -> {run.folder(name)}", flush=True)
    return result


def headline(name: str, metrics: dict) -> str:
    """The stage's one-line summary of its metrics ('' when it has none)."""
    fn = stage(name).headline
    try:
        return fn(metrics) if fn else ""
    except (KeyError, TypeError, ValueError):
        return ""


def stage_ids(cfg: Config, run: Run, split: str) -> list[str]:
    """The ids a stage works on: for the train split, those the label filter kept."""
    from ..artifacts import read_kept_ids

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
                          f"{', '.join(ds.splits)})")


# registration order = pipeline order
from . import data, classifier, label_filter, cams, crf, boundary, pseudo_masks, segmentation, predict, report  # noqa: E402,F401,I001
