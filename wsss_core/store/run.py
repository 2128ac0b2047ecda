"""A run folder: its resolved config, one folder per stage, each stage's
manifest (status, parameters, upstream fingerprints, timings) and its lock.

`Run` records stage states (running, done, failed, interrupted) and keeps
the outputs that the current parameters still produce; whether they do is
`staleness.Staleness`'s question, the files are written by `files`, and one
process per run folder is `lock.FolderLock`. The layout and the rules are in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .. import runtime
from ..config import Config, ConfigError, dump_config
from .files import MANIFEST, FileError, file_errors, check_writable_folder, clear_folder, read_json, remove_temp_files, write_json, write_text
from .lock import FolderLock, now_iso
from .staleness import StageSpec, Staleness

ARCHIVE = "archive.json"  # `wsss archive` writes it: the folder holds what a run found, not what it made


_MANIFEST_TYPES = {"status": str, "fingerprint": str, "config": dict, "upstream": dict, "upstream_runs": dict,
                   "metrics": dict, "paths": dict, "seconds": (int, float), "timings": dict,
                   "version": int}


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest's shape (None when nothing is)."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    for key, kind in _MANIFEST_TYPES.items():
        if key in m and not isinstance(m[key], kind):
            wanted = "number" if isinstance(kind, tuple) else kind.__name__
            return f"{key!r} is a {type(m[key]).__name__}, not a {wanted}"
    return None if "status" in m else "no 'status'"


class UnknownStageError(ConfigError, KeyError):
    """A stage name that is not registered (a user error: one line, exit 2)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class StageResult:
    """What a stage returns: JSON-able metrics and the paths of its main outputs."""

    metrics: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class Run:
    """A run directory for one experiment.

    Creating a Run writes nothing; the folder and its config.yaml appear when
    a stage starts.
    """

    def __init__(self, root: str | Path, cfg: Config, specs: Mapping[str, StageSpec]):
        self.root = Path(root).resolve()
        self.cfg = cfg
        self.specs = dict(specs)
        self.rank = runtime.rank()
        self.staleness = Staleness(cfg, self.specs, self.manifest, self.folder)
        self._lock = FolderLock(self.root)

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes shared files when launched under torchrun."""
        return self.rank == 0

    def check_folder(self, write: bool = True) -> None:
        """Fail (one line) unless the run folder is, or can become, a folder this
        process may write in (`write=False`: only that no file is in the way).
        Creates nothing."""
        check_writable_folder(self.root, "the run folder", write)
        self.refuse_archive("running a stage")
        for folder in [*(s.folder for s in self.specs.values()), "notebooks"]:
            path = self.root / folder
            if os.path.lexists(path) and not path.is_dir():
                what = "a file, not a folder" if path.is_file() else "not a folder (a broken link or a special file)"
                raise FileError(f"{path}: is {what}; a run keeps {folder}'s outputs there (move it away)")
        if not write:
            return
        data_root = getattr(getattr(self.cfg, "data", None), "root", None)
        if data_root and (self.root == Path(data_root).resolve() or Path(data_root).resolve() in self.root.parents):
            raise FileError(f"{self.root}: is inside the dataset folder {data_root}; a run must not write into "
                            "its data (choose another --run-dir)")
        if self.root.is_dir() and not self._looks_like_a_run():
            raise FileError(f"{self.root}: is not a run folder and not empty (no config.yaml or stage folders "
                            "of wsss); choose an empty or new folder")

    def refuse_archive(self, doing: str) -> None:
        """Fail (one line) if this folder is an archive (`wsss archive`): it has no outputs to go on from."""
        if (self.root / ARCHIVE).is_file():
            raise FileError(f"{self.root}: is an archive of a run's results (wsss archive), without its images "
                            f"or models; {doing} needs the run folder itself")

    def _looks_like_a_run(self) -> bool:
        """Empty, or holding what wsss writes (config.yaml, a stage folder, its lock)."""
        names = {p.name for p in self.root.iterdir()}
        folders = {s.folder for s in self.specs.values()}
        return not names or "config.yaml" in names or bool(names & folders) or ".wsss.lock" in names

    def save_config(self) -> Path:
        """Write the resolved config (done when a stage starts, not before)."""
        path = self.root / "config.yaml"
        if self.is_main:
            write_text(path, dump_config(self.cfg))
        return path

    # -- paths and manifests
    def spec(self, name: str) -> StageSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownStageError(f"unknown stage {name!r}; stages: {', '.join(self.specs)}") from None

    def folder(self, name: str) -> Path:
        """The stage's folder (not created)."""
        return self.root / self.spec(name).folder

    def inside(self, path: Path) -> Path:
        """`path`, refused (FileError) when a symbolic link makes it lead outside the run folder:
        nothing of a run is written, or deleted, elsewhere."""
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise FileError(f"{path}: leads outside the run folder {self.root} (a symbolic link?); "
                            "remove the link and rerun")
        return path

    def make_folder(self, name: str) -> Path:
        """The stage's own folder, created if missing (never outside the run folder); `folder`: not created."""
        p = self.inside(self.folder(name))
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from .files import describe_os_error

            raise FileError(describe_os_error(e, p, "creating")) from None
        return p

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The stage's manifest, checked to have the shape wsss writes (None: not run)."""
        p = self.folder(name) / MANIFEST
        if not p.is_file():
            return None
        m = read_json(p)
        problem = _manifest_problem(m)
        if problem:
            raise FileError(f"{p}: not a manifest written by wsss ({problem}); rerun the stage "
                            f"(wsss run --force {name})")
        return m

    def forget_damaged_manifest(self, name: str) -> bool:
        """Delete the stage's manifest if it cannot be read (the user forces the stage: the rerun is the
        remedy the error advised); True if it did."""
        p = self.inside(self.folder(name)) / MANIFEST  # never delete through a link out of the run
        if not p.is_file():
            return False
        try:
            m = read_json(p)
        except FileError as e:
            if isinstance(e.__cause__, OSError):  # unreadable (permissions): not damage this may repair
                raise
            m = None
        if m is not None and _manifest_problem(m) is None:
            return False
        with file_errors(p, "removing"):
            p.unlink()
        return True

    # -- staleness (see staleness.py)
    def fingerprint(self, name: str) -> str:
        return self.staleness.fingerprint(self.spec(name).name)

    def eval_hash(self, name: str) -> str:
        return self.staleness.eval_hash(self.spec(name).name)

    def usable(self, name: str) -> bool:
        return self.staleness.usable(self.spec(name).name)

    def is_done(self, name: str) -> bool:
        return self.staleness.is_done(self.spec(name).name)

    def why_not_done(self, name: str) -> str | None:
        return self.staleness.why_not_done(self.spec(name).name)

    def check_upstream(self, name: str) -> None:
        self.staleness.check_upstream(self.spec(name).name)

    # -- lifecycle
    def begin(self, name: str, fresh: bool = False) -> Path:
        """Mark the stage running. Outputs made with other output parameters or
        upstream (or all outputs, when `fresh`) are deleted first, so resuming
        never mixes files from two configurations; outputs that the current
        parameters still produce (a model, finished images) are kept."""
        folder = self.make_folder(name)
        if self.is_main:
            if fresh:  # from scratch: nothing of the old stage is read (its manifest may be damaged)
                old, stale = None, True
            else:
                old, stale = self.manifest(name), self.staleness.outputs_stale(name)
            if stale:
                clear_folder(folder)
            remove_temp_files(folder)
            content = self.staleness.content(name)
            if content is not None:
                write_json(folder / "content.json", content)
            # A new run id tells downstream stages their inputs were remade; resuming or
            # re-evaluating keeps the outputs, so it keeps the id.
            run_id = uuid.uuid4().hex if stale or old is None else old.get("run_id")
            self._write_manifest(name, status="running", started=now_iso(), pid=os.getpid(),
                                 host=socket.gethostname(), run_id=run_id)
        return folder

    def finish(self, name: str, result: StageResult, started: str) -> None:
        if not self.is_main:
            return
        folder = self.make_folder(name)
        write_json(folder / "metrics.json", result.metrics)
        self._write_manifest(
            name,
            status="done",
            started=started,
            finished=now_iso(),
            seconds=round(result.seconds, 3),
            timings=result.timings,
            metrics=result.metrics,
            paths=result.paths,
        )

    def fail(self, name: str, error: BaseException, started: str) -> None:
        if self.is_main:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            with contextlib.suppress(FileError):  # a full disk must not hide the error that stopped the stage
                self._write_manifest(name, status=status, started=started, finished=now_iso(),
                                     error=f"{type(error).__name__}: {error}")

    def result(self, name: str) -> StageResult:
        """The stored result of a finished stage (used when it is skipped)."""
        m = self.manifest(name) or {}
        return StageResult(
            metrics=m.get("metrics", {}),
            paths=m.get("paths", {}),
            skipped=True,
            seconds=m.get("seconds", 0.0),
            timings=m.get("timings", {}),
        )

    def _write_manifest(self, name: str, **fields: Any) -> None:
        if "run_id" not in fields:  # the outputs' identity outlives a failure or an interruption
            fields["run_id"] = (self.manifest(name) or {}).get("run_id")
        spec = self.spec(name)
        manifest = {"stage": name, "folder": spec.folder, **self.staleness.manifest_fields(name), **fields}
        write_json(self.folder(name) / MANIFEST, manifest)

    # -- one process per run folder
    @contextlib.contextmanager
    def lock(self, command: str = "") -> Iterator[None]:
        """Hold the run folder's lock while working (rank 0 only; see lock.FolderLock)."""
        if not self.is_main:
            yield
            return
        with self._lock.hold(command):
            yield

    @property
    def lock_token(self) -> str | None:
        """The token of the lock this process holds (children may share it)."""
        return self._lock.token
