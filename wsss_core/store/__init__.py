"""The run store, one module per job:

- `files`: atomic writes, safe reads (`read_torch`: no code runs), one-line
  file-system errors (`FileError`);
- `lock`: one process per folder (`FolderLock`);
- `staleness`: fingerprints, evaluation hashes, upstream run ids, and why a
  stage is not done;
- `run`: the run folder, its stage states and manifests (`Run`).
"""

from .files import (
    MANIFEST,
    FileError,
    atomic_write,
    check_writable_folder,
    clear_folder,
    describe_os_error,
    file_errors,
    read_json,
    read_npz,
    read_torch,
    remove_temp_files,
    save_npz,
    save_png,
    save_torch,
    write_json,
    write_text,
)
from .lock import LOCK, LOCK_TOKEN_ENV, FolderLock, RunLockedError, now_iso, process_alive
from .run import ARCHIVE, Run, StageResult, UnknownStageError
from .staleness import StageSpec, StaleUpstreamError, Staleness, config_diff

__all__ = [
    "ARCHIVE", "LOCK", "LOCK_TOKEN_ENV", "MANIFEST", "FileError", "FolderLock", "Run", "RunLockedError", "StageResult",
    "StageSpec", "StaleUpstreamError", "Staleness", "UnknownStageError", "atomic_write", "check_writable_folder",
    "clear_folder", "config_diff", "describe_os_error", "file_errors", "now_iso", "process_alive", "read_json",
    "read_npz", "read_torch", "remove_temp_files", "save_npz", "save_png", "save_torch", "write_json", "write_text",
]
