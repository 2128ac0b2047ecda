"""The run directory: resolved config, one folder per stage, manifests.

Every file is written atomically (temp file in the same folder + rename), so a
crash never leaves a half-written output. Each stage folder has a
`manifest.json` recording its status, the config sections it used, the
fingerprints of its upstream stages and its timings. A finished stage whose
fingerprint still matches is skipped; a stage whose upstream is missing or
was produced with other parameters refuses to run and says what changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .config import Config, config_to_dict, dump_config, section_hash

MANIFEST = "manifest.json"
_TMP_TAG = ".tmp-"


class StaleUpstreamError(RuntimeError):
    """An upstream stage is missing, unfinished, or was made with other parameters."""


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

    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# --------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class StageSpec:
    """What a stage is called, where it writes, and what it depends on."""

    name: str
    folder: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()


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


class Run:
    """A run directory for one experiment (see DESIGN.md: the flow of data)."""

    def __init__(self, root: str | Path, cfg: Config, specs: Mapping[str, StageSpec]):
        self.root = Path(root).resolve()
        self.cfg = cfg
        self.specs = dict(specs)
        self.rank = int(os.environ.get("RANK", "0"))

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes shared files when launched under torchrun."""
        return self.rank == 0

    def save_config(self) -> Path:
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
            raise KeyError(f"unknown stage {name!r}; stages: {', '.join(self.specs)}") from None

    def path(self, name: str) -> Path:
        """The stage's own folder (created on demand)."""
        p = self.root / self.spec(name).folder
        p.mkdir(parents=True, exist_ok=True)
        return p

    def manifest(self, name: str) -> dict[str, Any] | None:
        p = self.root / self.spec(name).folder / MANIFEST
        return read_json(p) if p.is_file() else None

    def _section_values(self, name: str) -> dict[str, Any]:
        return {s: config_to_dict(getattr(self.cfg, s)) for s in self.spec(name).sections}

    def fingerprint(self, name: str) -> str:
        """Hash of this stage's config sections and, recursively, its upstream's."""
        spec = self.spec(name)
        parts = [section_hash(self.cfg, spec.sections)] + [self.fingerprint(u) for u in spec.upstream]
        return hashlib.sha256("|".join([name, *parts]).encode()).hexdigest()[:16]

    def is_done(self, name: str) -> bool:
        """Finished with the current parameters and current upstream outputs."""
        m = self.manifest(name)
        return bool(m) and m.get("status") == "done" and m.get("fingerprint") == self.fingerprint(name)

    def why_not_done(self, name: str) -> str | None:
        """A sentence saying why `name` is not usable as an upstream, or None."""
        m = self.manifest(name)
        folder = self.spec(name).folder
        if m is None:
            return f"{folder} has not been run"
        if m.get("status") != "done":
            return f"{folder} did not finish (status: {m.get('status')})"
        if m.get("fingerprint") == self.fingerprint(name):
            return None
        changes = _diff(m.get("config", {}), self._section_values(name))
        if changes:
            return f"{folder} was made with other parameters ({'; '.join(changes)})"
        for up in self.spec(name).upstream:
            if m.get("upstream", {}).get(up) != self.fingerprint(up):
                reason = self.why_not_done(up) or f"{self.spec(up).folder} was rerun since"
                return f"{folder} is stale because its input changed: {reason}"
        return f"{folder} is stale"

    def check_upstream(self, name: str) -> None:
        """Raise StaleUpstreamError naming each unusable upstream stage and why."""
        problems = [r for u in self.spec(name).upstream if (r := self.why_not_done(u))]
        if problems:
            first = next(u for u in self.spec(name).upstream if self.why_not_done(u))
            raise StaleUpstreamError(
                f"stage {name!r} refuses to run on stale inputs: {'; '.join(problems)}. "
                f"Rerun from {first!r} first (wsss run --from {first})."
            )

    # -- lifecycle
    def begin(self, name: str, fresh: bool = False) -> Path:
        """Mark the stage running. Outputs left by an attempt with other
        parameters (or all outputs, when `fresh`) are deleted first, so resuming
        never mixes files from two configurations."""
        folder = self.path(name)
        if self.is_main:
            old = self.manifest(name)
            if fresh or (old is not None and old.get("fingerprint") != self.fingerprint(name)):
                clear_folder(folder)
            remove_temp_files(folder)
            self._write_manifest(name, status="running", started=now_iso())
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
            self._write_manifest(
                name, status="failed", started=started, finished=now_iso(), error=f"{type(error).__name__}: {error}"
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
        spec = self.spec(name)
        manifest = {
            "stage": name,
            "folder": spec.folder,
            "fingerprint": self.fingerprint(name),
            "config_hash": section_hash(self.cfg, spec.sections),
            "config": self._section_values(name),
            "upstream": {u: self.fingerprint(u) for u in spec.upstream},
            **fields,
        }
        write_json(self.root / spec.folder / MANIFEST, manifest)
