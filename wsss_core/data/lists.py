"""Parsing the small text index files shared by the formats: class lists,
split id lists, trusted-id lists and image-level label CSVs."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError
from .ids import check_image_id

BACKGROUND = "background"
MAX_CLASSES = 255  # pixel value 255 is void


def existing_root(root: str | Path | None) -> Path:
    """The dataset folder as an absolute path; DataError if it does not exist."""
    if root is None:
        raise DataError("data.root: no dataset folder given")
    path = Path(os.path.abspath(os.path.expanduser(str(root))))
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: is a file, not a dataset folder (data.root)")
    if not path.is_dir():
        unset = re.search(r"\$\{?(\w+)", str(root))  # the config expands variables; an unset one stays
        if unset:
            raise DataError(f"data.root: ${unset.group(1)} is not set ({root}); export {unset.group(1)}=<the "
                            "dataset folder> or give the folder in the parameter file")
        raise DataError(f"{path}: dataset folder not found (data.root)")
    return path


def _read_text(path: Path, what: str) -> str:
    """File contents, or DataError naming the missing/unreadable file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from None


def read_classes(path: Path) -> tuple[str, ...]:
    """`classes.txt`: one name per line, line index = pixel value, line 1 = background."""
    lines = _read_text(path, "class list").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for n, name in enumerate(names, 1):
        if not name:
            raise DataError(f"{path}: line {n}: empty class name (the line number is the pixel value + 1)")
        if any(c.isspace() for c in name):
            raise DataError(f"{path}: line {n}: class name {name!r} contains whitespace, which the "
                            f"space-separated labels of image_labels_<split>.csv cannot name "
                            f"(write it as {'_'.join(name.split())!r})")
    check_classes(names, str(path))
    return tuple(names)


def check_classes(names: Sequence[str], where: str) -> None:
    """Background first, no duplicates, fewer than 255 classes (255 is void)."""
    if not names or names[0] != BACKGROUND:
        got = names[0] if names else "nothing"
        raise DataError(f"{where}: the first class (pixel value 0) must be {BACKGROUND!r}, got {got!r}")
    if len(names) < 2:
        raise DataError(f"{where}: needs at least one object class besides {BACKGROUND!r}")
    if len(names) > MAX_CLASSES:
        raise DataError(f"{where}: {len(names)} classes, at most {MAX_CLASSES} (pixel value 255 is void)")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(f"{where}: class {name!r} appears twice (pixel values {seen[name]} and {i})")
        seen[name] = i


def read_id_list(path: Path) -> list[str]:
    """A split list: one image id per non-empty line (spaces around it ignored),
    each a valid file name (`ids.check_image_id`); no duplicates."""
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(_read_text(path, "split list").splitlines(), 1):
        sid = line.strip(" \t\r")
        if not sid:
            continue
        check_image_id(sid, f"{path}: line {n}")
        if sid in first_line:
            raise DataError(f"{path}: line {n}: duplicate id {sid!r} (first on line {first_line[sid]})")
        first_line[sid] = n
        ids.append(sid)
    return ids


def read_trusted(path: Path, all_ids: Sequence[str], used_ids: Sequence[str]) -> frozenset[str] | None:
    """Ids listed in an optional trusted-labels file, restricted to the ids in
    use (after `limit`); None when the file does not exist."""
    if not path.is_file():
        return None
    known = set(all_ids)
    listed = set()
    for n, line in enumerate(_read_text(path, "trusted id list").splitlines(), 1):
        sid = line.strip(" \t\r")
        if not sid:
            continue
        check_image_id(sid, f"{path}: line {n}")
        if sid not in known:
            raise DataError(f"{path}: line {n}: id {sid!r} is not in the split")
        listed.add(sid)
    return frozenset(i for i in used_ids if i in listed)


def read_labels_csv(path: Path, classes: Sequence[str], ids: Sequence[str]) -> np.ndarray:
    """Multi-hot (N, C-1) float32 labels of `ids` from `image_id,labels` rows
    (labels: space-separated class names, empty = no object; background ignored)."""
    index = {name: k for k, name in enumerate(classes)}
    rows = _csv_rows(path)
    if not rows or [c.strip().lower() for c in rows[0]] != ["image_id", "labels"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(f"{path}: line 1: header must be 'image_id,labels', got {got!r}")
    found: dict[str, tuple[int, list[int]]] = {}
    for n, row in enumerate(rows[1:], 2):
        if not row or not row[0].strip():
            continue
        if len(row) > 2:
            raise DataError(f"{path}: line {n}: expected 2 fields 'image_id,labels', got {len(row)}")
        sid = check_image_id(row[0].strip(" \t"), f"{path}: line {n}")
        if sid in found:
            raise DataError(f"{path}: line {n}: duplicate image id {sid!r} (first on line {found[sid][0]})")
        found[sid] = (n, _class_ids(row[1] if len(row) > 1 else "", index, path, n))
    labels = np.zeros((len(ids), len(classes) - 1), np.float32)
    for i, sid in enumerate(ids):
        if sid not in found:
            raise DataError(f"{path}: no row for image id {sid!r} of the split")
        for k in found[sid][1]:
            labels[i, k - 1] = 1.0
    return labels


def _csv_rows(path: Path) -> list[list[str]]:
    text = _read_text(path, "image-level label file")
    try:
        return list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise DataError(f"{path}: not a valid CSV file ({e})") from None


def _class_ids(field: str, index: dict[str, int], path: Path, line: int) -> list[int]:
    """Class indices (>= 1) of a space-separated name list."""
    out = []
    for name in field.split():
        if name not in index:
            known = ", ".join(list(index)[1:])
            raise DataError(f"{path}: line {line}: unknown class name {name!r} (known: {known})")
        if index[name] > 0:
            out.append(index[name])
    return out
