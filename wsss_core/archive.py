"""`wsss archive RUN --out DEST`: what a run found, without what it made.

A run folder holds images, CAMs, masks and models (about 200 MB for msrc);
what `wsss compare` and a reader need weighs under 1 MB (0.8 MB for msrc): the resolved
config, and for each finished stage its manifest (parameters, fingerprints,
time), metrics, typed result and per-image evaluation counts
(`scores/*.npz`). An archive holds exactly those, so results made on machines
whose run folders do not last (seed replicates run across sessions) can be
kept in git and compared later with `wsss compare ARCHIVE ...`, exactly as
the run folders would be (the same fingerprints: the dataset is still needed
to check its content). An archive says so in `archive.json` and refuses to be
run into, reused by a sweep or predicted with: it has no outputs to go on from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import ConfigError, load_config
from .store import ARCHIVE, FileError, file_errors, now_iso, write_json

KEPT = ("manifest.json", "metrics.json", "result.json", "summary.json", "content.json")  # per stage folder


def archive_run(run_dir: str | Path, out: str | Path) -> Path:
    """Copy what `run_dir` found (config, and each finished stage's records and scores) into the new folder
    `out`, complete or not at all; returns `out`."""
    from .stages import open_run, pipeline_order

    root, out = Path(run_dir), Path(out)
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"{root}: not a run folder (no config.yaml)")
    if (root / ARCHIVE).is_file():
        raise ConfigError(f"{root}: is an archive already (copy the folder to move it)")
    if os.path.lexists(out):
        raise FileError(f"--out {out}: already exists; an archive goes into a new folder")
    real_root, real_out = os.path.realpath(root), os.path.realpath(out)
    if real_out == real_root or real_out.startswith(real_root.rstrip(os.sep) + os.sep):
        raise FileError(f"--out {out}: inside the run {root}; archive it elsewhere")
    run = open_run(root, load_config(root / "config.yaml"))
    done = [name for name in pipeline_order() if run.is_done(name)]
    if not done:
        raise ConfigError(f"{root}: no stage is finished with the run's parameters; nothing to archive")
    staging = out.with_name(f".{out.name}.archiving")  # complete, then renamed into place
    with file_errors(out, "archiving"):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging)  # a killed archive's leftover
        staging.mkdir(parents=True)
        shutil.copyfile(root / "config.yaml", staging / "config.yaml")
        for name in done:
            src, dst = run.folder(name), staging / run.spec(name).folder
            dst.mkdir()
            for kept in KEPT:
                if (src / kept).is_file():
                    shutil.copyfile(src / kept, dst / kept)
            scores = sorted(p for p in (src / "scores").glob("*.npz") if not p.name.startswith("."))
            if scores:
                (dst / "scores").mkdir()
                for p in scores:
                    shutil.copyfile(p, dst / "scores" / p.name)
    write_json(staging / ARCHIVE, {"archived": now_iso(), "from": str(root.resolve()), "stages": done})
    with file_errors(out, "archiving"):
        os.rename(staging, out)
    return out
