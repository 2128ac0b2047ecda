"""The pipeline's stages: one registry, one way to run a stage.

Each stage is a function `stage(cfg, run) -> StageResult` in its own module
here, registered (`registry.register`) with its folder, the config sections
it uses and the one it declares, its upstream stages, its notebook and its
headline metric; the modules are found on import (`registry.discover`), and
the folder numbers give the pipeline order. Notebooks and the CLI call
`run_stage(name, cfg, run)`, which

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
from pathlib import Path
from typing import Any

from .. import runtime
from ..config import Config
from ..store import Run, StageResult, now_iso
from .inputs import check_split, dataset, stage_ids, stage_images
from .registry import EVERY, STAGES, Stage, check_discovered, discover, pipeline_order, register, specs, stage

__all__ = ["EVERY", "STAGES", "Stage", "check_discovered", "check_split", "check_stage", "dataset", "discover", "headline", "open_run",
           "pipeline_order", "register", "run_stage", "stage", "stage_ids", "stage_images", "summary_lines"]


def open_run(run_dir: str | Path, cfg: Config) -> Run:
    """The run directory for `cfg` (nothing is written until a stage starts)."""
    check_discovered()
    return Run(run_dir, cfg, specs())


def check_stage(name: str, cfg: Config, ds: Any = None) -> None:
    """The stage's up-front checks of its parameters against the dataset, and
    that a requested CUDA device exists."""
    s = stage(name)
    runtime.check_device(cfg.device)
    if s.check is not None:
        s.check(cfg, dataset(cfg) if ds is None else ds)


def run_stage(name: str, cfg: Config, run: Run, force: bool = False, quiet: bool = False) -> StageResult:
    """Run one stage unless it is already done with the same inputs.

    Refuses (StaleUpstreamError) when an upstream stage is missing or stale;
    `force` reruns it from scratch. Evaluation-only parameter changes
    re-evaluate the kept outputs. `quiet`: no "running / done" lines (`wsss run`
    prints its own).
    """
    s = stage(name)
    say = print if run.is_main and not quiet else (lambda *a, **k: None)  # not one line per torchrun process
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
        # a re-evaluation keeps the outputs, so the stage's time is the time that made them plus its own
        made_in = float((run.manifest(name) or {}).get("seconds") or 0.0) if reeval else 0.0
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
        took = time.perf_counter() - t0
        result.seconds = made_in + took
        run.finish(name, result, started)
    say(f"[wsss] {s.spec.folder}: done in {took:.1f} s -> {run.folder(name)}", flush=True)
    return result


def headline(name: str, metrics: dict) -> str:
    """The stage's one-line summary of its metrics ('' when it has none)."""
    fn = stage(name).headline
    try:
        return fn(metrics) if fn else ""
    except (KeyError, TypeError, ValueError):
        return ""


def summary_lines(run: Run) -> list[str]:
    """What the finished stages that have a summary (the report) say at the end of `wsss run`."""
    lines: list[str] = []
    for name, s in STAGES.items():
        if s.summary is not None and run.is_done(name):
            lines += s.summary(run)
    return lines


discover()  # every stage module of this package, and those named in $WSSS_STAGES
