"""Image ids, and the paths built from them.

An image id names files: `JPEGImages/<id>.jpg` in a dataset and
`02_cams/cams/<id>.npz` in a run. So an id is a plain file name: no folder
separators (a relative path inside the images folder in the LID layout, where
the id itself is the last component), no `..`, no leading `.` (hidden names
are wsss' temporary files), no whitespace or control characters, no `\\`.
Every path built from an id goes through `path_inside`, which refuses one
that would leave its folder, whatever the id's origin.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .errors import DataError


def id_problem(image_id: str, subfolders: bool = False) -> str | None:
    """What is wrong with `image_id` as a file name (None when nothing is).

    `subfolders`: the id is a relative path (`a/b/c`, LID image lists)."""
    if not image_id:
        return "is empty"
    if any(unicodedata.category(c) == "Cc" for c in image_id):
        return "contains a control character"
    if any(c.isspace() for c in image_id):
        return "contains whitespace (ids name files; rename the file and its entry)"
    if "\\" in image_id:
        return "contains '\\' (use '/' between folders)" if subfolders else "contains '\\'"
    if image_id.startswith("/"):
        return "is an absolute path (ids are relative to the images folder)"
    parts = image_id.split("/")
    if len(parts) > 1 and not subfolders:
        return "contains '/' (ids are file names, without folders, in this layout)"
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' path component (it would leave its folder)"
    if any(p.startswith(".") for p in parts):
        return "starts with '.' (hidden names are reserved for temporary files)"
    return None


def check_image_id(image_id: str, where: str, subfolders: bool = False) -> str:
    """`image_id` if it is a valid id, else DataError `where: image id 'x' <problem>`."""
    problem = id_problem(image_id, subfolders)
    if problem:
        raise DataError(f"{where}: image id {image_id!r} {problem}")
    return image_id


def path_inside(folder: str | Path, relative: str, suffix: str = "") -> Path:
    """`folder / (relative + suffix)`, refused (DataError) if it would lie outside `folder`."""
    folder = Path(folder)
    path = folder / f"{relative}{suffix}"
    base = os.path.normpath(os.path.abspath(folder))
    full = os.path.normpath(os.path.abspath(path))
    if full == base or os.path.commonpath([full, base]) != base:
        raise DataError(f"{path}: refused, the image id {relative!r} leads outside {folder}")
    return path
