"""The run directory: resolved config, one folder per stage, manifests, lock.

Every file is written atomically (temp file in the same folder + rename, the
usual permissions), so a crash never leaves a half-written output. Each stage
folder has a `manifest.json` recording its status, the parameters it used,
the fingerprints of its upstream stages and its timings.

A stage's fingerprint hashes only the parameters that change its outputs
("output" fields, see `config.sections`), the dataset's content for the data
stage, and its upstream fingerprints. A finished stage whose fingerprint and
evaluation parameters match is skipped; one whose evaluation parameters alone
changed re-evaluates its kept outputs; a stage whose upstream is missing,
interrupted or was made with other parameters refuses to run and says why.
One process works on a run folder at a time (`Run.lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from . import runtime
from .config import Config, ConfigError, config_to_dict, dump_config, section_hash, section_values

MANIFEST = "manifest.json"
_TMP_TAG = ".tmp-"


LOCK = ".wsss.lock"
LOCK_TOKEN_ENV = "WSSS_LOCK_TOKEN"  # a child of the lock holder (a pipeline's notebook) shares its lock


class StaleUpstreamError(RuntimeError):
    """An upstream stage is missing, unfinished, or was made with other parameters."""


class RunLockedError(RuntimeError):
    """Another live process is working on the same run folder."""


class UnknownStageError(ConfigError, KeyError):
    """A stage name that is not registered (a user error: one line, exit 2)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _file_mode() -> int:
    """0o666 minus the umask: what a plain `open(path, "w")` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# --------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place on success.

    The temp name keeps the suffix so writers that infer the format (PIL,
    numpy) behave. On any exception the temp file is removed and `path` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}{_TMP_TAG}", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; colleagues in the group may read a run
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return config_to_dict(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically; NaN becomes null so the file stays valid JSON."""
    text = json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False)
    return write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def save_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """Save a uint8 label map (optionally with a colour palette) or RGB image as PNG."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def save_torch(path: str | Path, obj: Any) -> Path:
    import torch

    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def remove_temp_files(folder: Path) -> int:
    """Delete leftovers of writes that were killed midway; returns how many."""
    n = 0
    if folder.is_dir():
        for p in folder.rglob(f".*{_TMP_TAG}*"):
            if p.is_file():
                p.unlink()
                n += 1
    return n


def clear_folder(folder: Path) -> None:
    """Delete everything inside `folder` (not the folder itself)."""
    import shutil

    manifest = folder / MANIFEST
    if manifest.exists():  # first: an interrupted clear must not leave a "done" stage with half its files
        manifest.unlink()
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# --------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class StageSpec:
    """What a stage is called, where it writes, and what it depends on.

    `sections`: top-level config sections (or fields) whose values it uses
    (minus the dotted fields in `ignore`);
    `content`: for the data stage, a function of the config describing the
    dataset's content (`data.content.dataset_content`), part of the fingerprint.
    """

    name: str
    folder: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    content: Callable[[Config], dict[str, Any]] | None = None
    explain_content: Callable[[dict, dict], list[str]] | None = None
    ignore: tuple[str, ...] = ()  # dotted fields of `sections` that do not change this stage's outputs
    reads_metrics: tuple[str, ...] = ()  # upstream stages whose evaluation this stage's evaluation uses


@dataclass
class StageResult:
    """What a stage returns: JSON-able metrics and the paths of its main outputs."""

    metrics: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            key = f"{prefix}.{k}" if prefix else k
            out += _diff(old.get(k), new.get(k), key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def process_alive(pid: int, host: str) -> bool:
    """Whether process `pid` on `host` still runs (another host: assumed alive)."""
    if host != socket.gethostname():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Run:
    """A run directory for one experiment (see DESIGN.md: the flow of data).

    Creating a Run writes nothing; the folder and its config.yaml appear when
    a stage starts.
    """

    def __init__(self, root: str | Path, cfg: Config, specs: Mapping[str, StageSpec]):
        self.root = Path(root).resolve()
        self.cfg = cfg
        self.specs = dict(specs)
        self.rank = runtime.rank()
        self._content: dict[str, dict[str, Any]] = {}
        self._lock_token: str | None = None
        self._lock_depth = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes shared files when launched under torchrun."""
        return self.rank == 0

    def save_config(self) -> Path:
        """Write the resolved config (done when a stage starts, not before)."""
        path = self.root / "config.yaml"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
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

    def path(self, name: str) -> Path:
        """The stage's own folder (created on demand)."""
        p = self.folder(name)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def manifest(self, name: str) -> dict[str, Any] | None:
        p = self.folder(name) / MANIFEST
        return read_json(p) if p.is_file() else None

    def content(self, name: str) -> dict[str, Any] | None:
        """The current content description of a stage with a `content` hook (cached)."""
        spec = self.spec(name)
        if spec.content is None:
            return None
        if name not in self._content:
            self._content[name] = spec.content(self.cfg)
        return self._content[name]

    def fingerprint(self, name: str) -> str:
        """Hash of the stage's output parameters (and content), and, recursively,
        of its upstream stages'."""
        spec = self.spec(name)
        content = self.content(name)
        parts = [name, section_hash(self.cfg, spec.sections, ignore=spec.ignore), content["hash"] if content else ""]
        return _hash(*parts, *(self.fingerprint(u) for u in spec.upstream))

    def _eval_sections(self, name: str) -> tuple[str, ...]:
        """A stage's own section (named like the stage) holds its evaluation
        parameters; sections it only borrows (the label filter uses the
        classifier's recipe) do not re-evaluate it."""
        return tuple(s for s in self.spec(name).sections if s == name)

    def eval_hash(self, name: str) -> str:
        """Hash of the stage's evaluation-only parameters (and of those of the
        upstream stages whose metrics its evaluation reads)."""
        own = section_hash(self.cfg, self._eval_sections(name), kind="eval")
        return _hash(own, *(self.eval_hash(u) for u in self.spec(name).reads_metrics))

    def _upstream_runs(self, name: str) -> dict[str, str | None]:
        """The run id of each upstream stage's current outputs."""
        return {u: (self.manifest(u) or {}).get("run_id") for u in self.spec(name).upstream}

    def _rerun_upstream(self, name: str) -> str | None:
        """An upstream stage redone (e.g. --force) since `name` used its outputs."""
        recorded = (self.manifest(name) or {}).get("upstream_runs", {})
        for u, rid in self._upstream_runs(name).items():
            if recorded.get(u) != rid:
                return u
        return None

    def usable(self, name: str) -> bool:
        """Finished, and its outputs are those the current parameters and upstream make."""
        m = self.manifest(name)
        return bool(m) and m.get("status") == "done" and m.get("fingerprint") == self.fingerprint(name) \
            and self._rerun_upstream(name) is None

    def is_done(self, name: str) -> bool:
        """Usable and evaluated with the current evaluation parameters: nothing to do."""
        m = self.manifest(name)
        return self.usable(name) and m.get("eval_hash") == self.eval_hash(name)  # type: ignore[union-attr]

    def why_not_done(self, name: str) -> str | None:
        """A sentence saying why `name`'s outputs are not usable, or None."""
        m = self.manifest(name)
        folder = self.spec(name).folder
        if m is None:
            return f"{folder} has not been run"
        status = m.get("status")
        if status == "running" and not process_alive(m.get("pid", -1), m.get("host", "")):
            return f"{folder} was interrupted (process {m.get('pid')} stopped before it finished)"
        if status != "done":
            return f"{folder} did not finish (status: {status})"
        if m.get("fingerprint") == self.fingerprint(name):
            redone = self._rerun_upstream(name)
            return None if redone is None else \
                f"{folder} is stale because its input was redone since: {self.spec(redone).folder}"
        spec = self.spec(name)
        changes = _diff(m.get("config", {}), section_values(self.cfg, spec.sections, ignore=spec.ignore))
        if changes:
            return f"{folder} was made with other parameters ({'; '.join(changes)})"
        content = self.content(name)
        if content is not None and m.get("content_hash") != content["hash"]:
            return f"{folder} was made from other data ({self._content_changes(name)})"
        for up in self.spec(name).upstream:
            if m.get("upstream", {}).get(up) != self.fingerprint(up):
                reason = self.why_not_done(up) or f"{self.spec(up).folder} was rerun since"
                return f"{folder} is stale because its input changed: {reason}"
        return f"{folder} is stale"

    def _content_changes(self, name: str) -> str:
        spec = self.spec(name)
        old_path = self.folder(name) / "content.json"
        if spec.explain_content is None or not old_path.is_file():
            return "the dataset changed"
        changes = spec.explain_content(read_json(old_path), self.content(name) or {})
        return "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "") \
            if changes else "the dataset changed"

    def check_upstream(self, name: str) -> None:
        """Raise StaleUpstreamError naming each unusable upstream stage and why."""
        problems = [(u, r) for u in self.spec(name).upstream if (r := self.why_not_done(u))]
        if problems:
            first = problems[0][0]
            raise StaleUpstreamError(
                f"stage {name!r} refuses to run on stale inputs: {'; '.join(r for _, r in problems)}. "
                f"Rerun from {first!r} first (wsss run --from {first})."
            )

    # -- lifecycle
    def begin(self, name: str, fresh: bool = False) -> Path:
        """Mark the stage running. Outputs made with other output parameters or
        upstream (or all outputs, when `fresh`) are deleted first, so resuming
        never mixes files from two configurations; outputs that the current
        parameters still produce (a model, finished images) are kept."""
        folder = self.path(name)
        if self.is_main:
            old = self.manifest(name)
            stale = old is not None and (old.get("fingerprint") != self.fingerprint(name)
                                         or self._rerun_upstream(name) is not None)
            if fresh or stale:
                clear_folder(folder)
            remove_temp_files(folder)
            content = self.content(name)
            if content is not None:
                write_json(folder / "content.json", content)
            # A new run id tells downstream stages their inputs were remade; resuming or
            # re-evaluating keeps the outputs, so it keeps the id.
            run_id = uuid.uuid4().hex if fresh or stale or old is None else old.get("run_id")
            self._write_manifest(name, status="running", started=now_iso(), pid=os.getpid(),
                                 host=socket.gethostname(), run_id=run_id)
        return folder

    def finish(self, name: str, result: StageResult, started: str) -> None:
        if not self.is_main:
            return
        folder = self.path(name)
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
            self._write_manifest(
                name, status=status, started=started, finished=now_iso(), error=f"{type(error).__name__}: {error}"
            )

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
        content = self.content(name)
        manifest = {
            "stage": name,
            "folder": spec.folder,
            "fingerprint": self.fingerprint(name),
            "eval_hash": self.eval_hash(name),
            "config": section_values(self.cfg, spec.sections, ignore=spec.ignore),
            "eval_config": section_values(self.cfg, self._eval_sections(name), kind="eval"),
            "content_hash": content["hash"] if content else None,
            "upstream": {u: self.fingerprint(u) for u in spec.upstream},
            "upstream_runs": self._upstream_runs(name),
            **fields,
        }
        write_json(self.folder(name) / MANIFEST, manifest)

    # -- one process per run folder
    @contextlib.contextmanager
    def lock(self, command: str = "") -> Iterator[None]:
        """Hold the run folder's lock file (pid, host, token) while working.

        Re-entrant in this process, and shared with child processes that carry
        the holder's token in $WSSS_LOCK_TOKEN (the notebooks of `wsss run`).
        A lock left by a dead process is taken over with a message; a live
        holder makes this raise RunLockedError naming its pid. Rank 0 only.
        """
        if not self.is_main or self._lock_depth or self._inherited_lock():
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": token, "started": now_iso(),
                "command": command}
        # the lock appears complete or not at all: written to a private file, then hard-linked into place
        # (link fails if the lock exists, atomically, so two processes cannot both take it)
        mine = self.root / f".wsss.lock.{os.getpid()}.{token[:8]}"
        mine.write_text(json.dumps(info))
        try:
            self._link_lock(mine, path)
        finally:
            mine.unlink()
        self._lock_token, self._lock_depth = token, 1
        try:
            yield
        finally:
            self._lock_depth = 0
            self._lock_token = None
            held = self._read_lock(path)
            if held and held.get("token") == token:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _link_lock(self, mine: Path, path: Path) -> None:
        """Link our lock file into place; take over a lock whose process is gone."""
        for _ in range(3):
            try:
                os.link(mine, path)
                return
            except FileExistsError:
                held = self._read_lock(path)  # complete by construction (linked), or gone
                if held and process_alive(int(held.get("pid", -1)), str(held.get("host", ""))):
                    raise RunLockedError(
                        f"{self.root}: in use by pid {held.get('pid')} on {held.get('host')} since "
                        f"{held.get('started')} ({held.get('command') or 'wsss'}); wait for it to finish or stop it"
                    ) from None
                print(f"[wsss] {self.root}: taking over the lock left by pid {held.get('pid') if held else '?'} "
                      "(no longer running)", flush=True)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        raise RunLockedError(f"{self.root}: could not take the run lock {path}")

    @property
    def lock_token(self) -> str | None:
        """The token of the lock this process holds (children may share it)."""
        return self._lock_token

    def _inherited_lock(self) -> bool:
        token = os.environ.get(LOCK_TOKEN_ENV)
        held = self._read_lock(self.root / LOCK)
        return bool(token) and bool(held) and held.get("token") == token  # type: ignore[union-attr]

    @staticmethod
    def _read_lock(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
