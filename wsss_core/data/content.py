"""What a dataset holds, as a fingerprint: the bytes of its index files (split
lists, labels, classes) and of every image and mask when they are small
together (<= 256 MB: copying or regenerating a dataset does not make it
"changed"), else each file's size and modification time. The data stage hashes it, so an edited label or a replaced image makes
the data stage and everything downstream stale, and the message says what
changed ("image_labels_train.csv changed", "3 images changed in train")."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .base import Dataset
from .errors import DataError


def _file_digest(path: os.PathLike) -> str:
    from .images import not_a_regular_file

    special = not_a_regular_file(path)
    if special:  # a device would be hashed for ever, a FIFO would block
        raise DataError(f"{path}: {special}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


HASH_BYTES_UP_TO = 256 * 1024 * 1024


def _stat_word(path: os.PathLike) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _words(paths: list) -> list[str]:
    """One word per file: its content digest when the files are small together,
    else size:mtime."""
    sizes = []
    for p in paths:
        try:
            sizes.append(os.stat(p).st_size)
        except FileNotFoundError:
            sizes.append(None)
    if sum(s or 0 for s in sizes) > HASH_BYTES_UP_TO:
        return [_stat_word(p) for p in paths]
    return [_file_digest(p) if s is not None else "missing" for p, s in zip(paths, sizes)]


def dataset_content(ds: Dataset) -> dict[str, Any]:
    """{"hash", "files": {name: digest}, "images": {split: {id: word}},
    "masks": {split: {id: word}}} (see `_words`)."""
    files = {os.path.relpath(p, ds.root): _file_digest(p) for p in ds.index_files}
    images: dict[str, dict[str, str]] = {}
    masks: dict[str, dict[str, str]] = {}
    for split in ds.splits:
        s = ds.split_index(split)
        images[split] = dict(zip(s.ids, _words(s.image_paths)))
        if s.mask_paths is not None:
            masks[split] = dict(zip(s.ids, _words(s.mask_paths)))
    body = {"format": ds.format, "classes": list(ds.classes), "files": files, "images": images, "masks": masks}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, **body}


def content_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable differences between two `dataset_content` results."""
    out: list[str] = []
    if old.get("classes") != new.get("classes"):
        out.append("the class list changed")
    of, nf = old.get("files", {}), new.get("files", {})
    for name in sorted(set(of) | set(nf)):
        if name not in of:
            out.append(f"{name} was added")
        elif name not in nf:
            out.append(f"{name} was removed")
        elif of[name] != nf[name]:
            out.append(f"{name} changed")
    for what in ("images", "masks"):
        o, n = old.get(what, {}), new.get(what, {})
        for split in sorted(set(o) | set(n)):
            a, b = o.get(split, {}), n.get(split, {})
            changed = [i for i in b if i in a and a[i] != b[i]]
            added = [i for i in b if i not in a]
            removed = [i for i in a if i not in b]
            for count, verb in ((changed, "changed"), (added, "added"), (removed, "removed")):
                if count:
                    noun = what if len(count) > 1 else what[:-1]
                    out.append(f"{len(count)} {noun} {verb} in {split} (e.g. {count[0]})")
    return out
