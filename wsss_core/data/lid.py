"""LID 2020 challenge layout (ILSVRC DET), file names from LidConfig relative to the root:

    idx_to_name.json     {"1": "accordion", ...}: 1-based class ids (= mask pixel values)
    train.json, val.json [[relative_path_without_ext, [class ids]], ...]
    <train_images>/<path><image_ext>, <val_images>/<path><image_ext>
    <val_masks>/<basename of path>.png   grayscale class indices (val only)

Image ids are the basenames of the paths (unique within a split), so that
they can name output files directly.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LidConfig
from .base import Dataset, SplitIndex
from .errors import DataError
from .images import not_a_regular_file
from .ids import check_image_id, path_inside
from .lists import BACKGROUND, check_classes, existing_root, read_trusted


def open_lid(
    root: str | Path, lid: LidConfig, train_split: str = "train", val_split: str = "val", limit: int | None = None
) -> Dataset:
    """Read the LID index files: `train_split` from the train list and image
    folder, `val_split` from the val ones (with masks when that folder exists)."""
    root = existing_root(root)
    classes = _read_classes(root / lid.idx_to_name)
    index = {
        train_split: _read_split(root, train_split, root / lid.train_list, root / lid.train_images, None,
                                 lid.image_ext, classes, limit),
    }
    if val_split != train_split:
        index[val_split] = _read_split(root, val_split, root / lid.val_list, root / lid.val_images,
                                       root / lid.val_masks, lid.image_ext, classes, limit)
    candidates = [root / lid.idx_to_name, root / lid.train_list, root / lid.val_list] + [
        root / f"trusted_{s}.txt" for s in index]
    return Dataset("lid", root, classes, index, index_files=[p for p in dict.fromkeys(candidates) if p.is_file()])


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.load keeps the last of two equal keys without a word; a dataset's files must not."""
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def _load_json(path: Path, what: str) -> Any:
    special = not_a_regular_file(path)
    if special:
        raise DataError(f"{path}: {special}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: cannot read {what} (nested too deeply)") from None


def _read_classes(path: Path) -> tuple[str, ...]:
    """("background",) + names ordered by their 1-based ids, which must be 1..K."""
    raw = _load_json(path, "class index file")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: must be a non-empty JSON object {{\"1\": \"name\", ...}}")
    by_id: dict[int, str] = {}
    key_of: dict[int, str] = {}
    for key, name in raw.items():
        try:
            k = int(key)
        except ValueError:
            raise DataError(f"{path}: key {key!r}: class ids must be integers") from None
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: key {key!r}: class name must be a non-empty string, got {name!r}")
        if k in by_id:  # "1" and "01": one class would silently replace the other
            raise DataError(f"{path}: keys {key_of[k]!r} and {key!r} are both class id {k}")
        by_id[k], key_of[k] = name.strip(), key
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise DataError(f"{path}: class ids must be exactly 1..{len(by_id)}, got {sorted(by_id)[:5]}...")
    classes = (BACKGROUND,) + tuple(by_id[k] for k in range(1, len(by_id) + 1))
    check_classes(classes, str(path))
    return classes


def _read_split(
    root: Path, split: str, list_file: Path, image_dir: Path, mask_dir: Path | None, ext: str,
    classes: tuple[str, ...], limit: int | None,
) -> SplitIndex:
    entries = _read_entries(list_file, len(classes) - 1)
    all_ids = [sid for sid, _, _ in entries]
    used = entries[:limit] if limit else entries
    ids = [sid for sid, _, _ in used]
    labels = np.zeros((len(used), len(classes) - 1), np.float32)
    for i, (_, _, class_ids) in enumerate(used):
        labels[i, np.asarray(class_ids, dtype=np.int64) - 1] = 1.0
    image_paths = [path_inside(image_dir, rel, ext) for _, rel, _ in used]
    mask_paths = [path_inside(mask_dir, sid, ".png") for sid in ids] \
        if mask_dir is not None and mask_dir.is_dir() else None
    trusted = read_trusted(root / f"trusted_{split}.txt", all_ids, ids)
    return SplitIndex(split, ids, image_paths, mask_paths, "json", labels, trusted)


def _read_entries(path: Path, num_fg: int) -> list[tuple[str, str, list[int]]]:
    """(id, relative path, class ids) per entry, checked: ids unique, labels in 1..num_fg."""
    raw = _load_json(path, "image list")
    if not isinstance(raw, list):
        raise DataError(f"{path}: must be a JSON list of [relative_path, [class ids]] entries")
    out, seen = [], {}
    for n, entry in enumerate(raw):
        rel, class_ids = _parse_entry(path, n, entry)
        for c in class_ids:
            if not 1 <= c <= num_fg:
                raise DataError(f"{path}: entry {n} ({rel!r}): class id {c} out of range 1..{num_fg}")
        sid = posixpath.basename(rel)
        if sid in seen:
            raise DataError(f"{path}: entry {n} ({rel!r}): image id {sid!r} already used by entry {seen[sid]}")
        seen[sid] = n
        out.append((sid, rel, list(dict.fromkeys(class_ids))))
    return out


def _parse_entry(path: Path, n: int, entry: Any) -> tuple[str, list[int]]:
    ok = (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str) and entry[0].strip()
          and isinstance(entry[1], (list, tuple)))
    if not ok:
        raise DataError(f"{path}: entry {n}: must be [relative_path, [class ids]], got {str(entry)[:80]}")
    rel = check_image_id(entry[0], f"{path}: entry {n}", subfolders=True)
    ids = entry[1]
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in ids):
        raise DataError(f"{path}: entry {n} ({rel!r}): class ids must be integers, got {ids!r}")
    return rel, list(ids)
