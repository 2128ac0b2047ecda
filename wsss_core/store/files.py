"""Files of a run folder: atomic writes, safe reads, one-line file-system errors.

Every file is written atomically (a temp file in the same folder, flushed,
then renamed into place with the usual permissions), so a crash or a full
disk never leaves a half-written output and never touches the previous
version. `exclusive=True` creates the file only if it does not exist yet
(two writers: the second fails instead of silently replacing).

Nothing read here runs code: model files load with `weights_only=True`
(tensors and plain values only), JSON and YAML are data. Every
file-system failure becomes a `FileError` whose message is one line naming
the path and what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MANIFEST = "manifest.json"
_TMP_TAG = ".tmp-"


class FileError(RuntimeError):
    """A file or folder cannot be read, written or trusted; the message is one
    line naming the path (the CLI prints it and exits 2)."""


_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a file is in the way where a folder is needed",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "not found",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
    errno.EDQUOT: "disk quota exceeded",
}


def describe_os_error(e: OSError, path: str | Path | None = None, action: str = "") -> str:
    """One line for an OSError: `path: what is wrong` (disk full says how to resume).

    `action` is what was being done ("writing", "reading", "creating"); the
    path defaults to the one the error names."""
    where = str(path if path is not None else (e.filename or "?"))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while {action or 'writing'} {where}; free space and rerun the same command to resume"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = _REASONS.get(e.errno or -1) or (e.strerror.lower() if e.strerror else text)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and action:
        reason = f"not {'readable' if action == 'reading' else 'writable'} ({reason})"
    return f"{where}: {reason}"


@contextlib.contextmanager
def file_errors(path: str | Path, action: str) -> Iterator[None]:
    """Turn an OSError inside the block into a one-line FileError about `path`."""
    try:
        yield
    except FileError:
        raise
    except OSError as e:
        raise FileError(describe_os_error(e, path, action)) from e


def _file_mode() -> int:
    """0o666 minus the umask: what a plain `open(path, "w")` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _first_bytes(name: str, n: int) -> str:
    """The longest start of `name` that is at most `n` bytes in the file system's encoding: a 255-byte
    name (3-byte characters too) must not give a temporary name longer than the folder allows."""
    return os.fsencode(name)[:n].decode("utf-8", "ignore")


@contextlib.contextmanager
def atomic_write(path: str | Path, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place on success.

    The temp name keeps the suffix so writers that infer the format (PIL,
    numpy) behave. On any exception the temp file is removed and `path` is
    left as it was. `exclusive`: fail (FileError) if `path` exists when the
    write completes, rather than replacing it. A file-system failure (disk
    full, permissions) is a FileError naming `path`.
    """
    path = Path(path)
    with file_errors(path.parent, "creating"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with file_errors(path, "writing"):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{_first_bytes(path.stem, 100)}{_TMP_TAG}",
                                        suffix=_first_bytes(path.suffix, 20), dir=path.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with file_errors(path, "writing"):
            with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
                os.fsync(fh.fileno())
            os.chmod(tmp, _file_mode())  # mkstemp makes 0600; colleagues in the group may read a run
            if exclusive:
                try:
                    os.link(tmp, path)  # atomic, and fails if `path` exists
                except FileExistsError:
                    raise FileError(f"{path}: already exists (written by another process meanwhile?); "
                                    "nothing was replaced") from None
                tmp.unlink()
            else:
                os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, FileError):
            raise FileError(describe_os_error(e, path, "writing")) from e
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
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        from ..config import config_to_dict

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


def write_text(path: str | Path, text: str, exclusive: bool = False) -> Path:
    with atomic_write(path, exclusive) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically; NaN becomes null so the file stays valid JSON."""
    text = json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False)
    return write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file of a run (FileError naming it if unreadable or not JSON)."""
    with file_errors(path, "reading"):
        raw = Path(path).read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FileError(f"{path}: not valid JSON (not UTF-8 text); rerun the stage that wrote it") from None
    except json.JSONDecodeError as e:
        raise FileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); "
                        "rerun the stage that wrote it") from None
    except RecursionError:
        raise FileError(f"{path}: not valid JSON (nested too deeply); rerun the stage that wrote it") from None


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def read_npz(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (never pickled objects), or a FileError naming it."""
    path = Path(path)
    if not path.is_file():  # written by a finished stage, so deleted since: the stage must be redone
        raise FileError(f"{path}: {what} not found; rerun the stage that wrote it (--force)")
    try:
        with file_errors(path, "reading"), np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileError:
        raise
    except Exception as e:  # truncated, not an npz, or object arrays (which need pickle)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileError(f"{path}: cannot read this {what} ({first}); rerun the stage that wrote it") from None


def save_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None,
             exclusive: bool = False) -> Path:
    """Save a uint8 label map (optionally with a colour palette) or RGB image as PNG."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    with atomic_write(path, exclusive) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def save_torch(path: str | Path, obj: Any) -> Path:
    """Tensors and plain values (dict, list, str, int, float, bool, None) only,
    so that `read_torch` can load the file without running code."""
    import torch

    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def read_torch(path: str | Path, what: str) -> Any:
    """Load a torch file with `weights_only=True`: tensors and plain values,
    never code. A file that asks for anything else (a pickled object, a
    function call) is refused with one line naming it."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: {what} not found")
    try:
        with file_errors(path, "reading"):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL (\S+)", str(e))
        if wanted is None:  # not a pickle at all (text, an image, a truncated file)
            raise FileError(f"{path}: cannot read this {what} (not a file torch saved)") from None
        raise FileError(f"{path}: refused to load this {what}: it holds more than tensors and plain values "
                        f"(it asks for {wanted.group(1)}); only files written by wsss load") from None
    except FileError:
        raise
    except Exception as e:  # truncated, not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileError(f"{path}: cannot read this {what} ({first})") from None


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
    """Delete everything inside `folder` (not the folder itself; never through a symbolic link)."""
    if folder.is_symlink():
        raise FileError(f"{folder}: is a symbolic link; refusing to delete what it points to")
    manifest = folder / MANIFEST
    with file_errors(folder, "clearing"):
        if manifest.exists():  # first: an interrupted clear must not leave a "done" stage with half its files
            manifest.unlink()
        for p in folder.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def check_writable_folder(folder: str | Path, what: str, write: bool = True) -> Path:
    """Fail (FileError, one line) unless `folder` is, or can be created as, a
    folder this process may write in (`write=False`: only that no file is in
    the way). Creates nothing that stays: a probe file is made and removed in
    the nearest existing folder."""
    folder = Path(folder)
    probe_in = folder
    while not probe_in.exists():
        if probe_in.is_symlink():  # a dangling link
            raise FileError(f"{probe_in}: a broken symbolic link is in the way of {what} {folder}")
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        where = "is a file, not a folder" if probe_in == folder else f"is a file, so {folder} cannot be created"
        raise FileError(f"{probe_in}: {where} ({what})")
    if not write:
        return folder
    try:
        with tempfile.TemporaryFile(dir=probe_in, prefix=".wsss-probe-"):
            pass
    except OSError as e:
        raise FileError(describe_os_error(e, probe_in, "writing")) from None
    return folder
