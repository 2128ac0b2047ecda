"""A config's values as plain data: dumping, the values of one kind, hashes.

`section_values(cfg, sections, kind)` is what a stage's manifest records and
`section_hash` what its fingerprint hashes ("output" fields) or its
evaluation hash ("eval" fields); see `fields` for the kinds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml


def plain(v: Any) -> Any:
    """Dataclasses as dicts, tuples as lists, paths as strings: YAML / JSON data."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as plain YAML/JSON-able data."""
    return plain(cfg)


def dump_config(cfg: Any) -> str:
    """The config as YAML that `parsing.parse_yaml` reads back unchanged (a string like "1e5" is quoted)."""
    from .parsing import Dumper

    return yaml.dump(config_to_dict(cfg), Dumper=Dumper, sort_keys=False)


def field_kind(cls: type, name: str) -> str:
    """"output" | "eval" | "runtime" of a field (see `fields`)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("kind", "output")


def seed_keys(cls: type) -> list[str]:
    """The dotted keys of a config class's training seeds (`param(seed=True)`): the top-level `seed` and
    each section's own; a dataset generator's seed (`data.synthetic.seed`) is not one (other data)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("seed"):
            out.append(f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(hints[f.name]) if g.metadata.get("seed")]
    return out


def kind_of(cls: type, dotted: str) -> str:
    """The kind of a dotted key (`pseudo_masks.beta`) of a config class."""
    import typing

    *parents, last = dotted.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
    return field_kind(cls, last)


def flow_yaml(value: Any) -> str:
    """A value as one line of YAML (`[1.0, 0.5]`, `gradcam++`), as a user types it after `--set KEY=`."""
    from .parsing import Dumper

    text = yaml.dump(plain(value), Dumper=Dumper, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def values_of_kind(v: Any, kind: str) -> Any:
    """Plain values of the fields of one kind, recursively (sub-sections kept
    when they hold any such field; fields at their neutral value left out)."""
    if not dataclasses.is_dataclass(v):
        return plain(v)
    out = {}
    for f in dataclasses.fields(v):
        value = getattr(v, f.name)
        if dataclasses.is_dataclass(value):
            sub = values_of_kind(value, kind)
            if sub:
                out[f.name] = sub
        elif f.metadata.get("kind", "output") == kind and \
                not ("neutral" in f.metadata and plain(value) == plain(f.metadata["neutral"])):
            out[f.name] = plain(value)
    return out


def section_values(cfg: Any, sections: tuple[str, ...] | list[str], kind: str = "output",
                   ignore: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """{section: values of its `kind` fields} for top-level sections or fields,
    without the dotted fields in `ignore` (fields of a section a stage does not use)."""
    out = {}
    for s in sections:
        value = getattr(cfg, s)
        if dataclasses.is_dataclass(value):
            out[s] = values_of_kind(value, kind)
        elif field_kind(type(cfg), s) == kind:
            out[s] = plain(value)
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node: Any = out
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def with_neutral(values: dict[str, Any], cfg: Any, sections: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`section_values` output with the fields left out at their neutral value
    put back (for saying what changed: `cams.storage: 'float32' -> 'uint8'`)."""
    def fill(out: dict[str, Any], v: Any) -> dict[str, Any]:
        out = dict(out)
        for f in dataclasses.fields(v):
            value = getattr(v, f.name)
            if dataclasses.is_dataclass(value):
                sub = fill(out.get(f.name, {}), value)
                if sub:
                    out[f.name] = sub
            elif "neutral" in f.metadata and f.name not in out:
                out[f.name] = plain(f.metadata["neutral"])
        return out

    return {**values, **{s: fill(values.get(s, {}), getattr(cfg, s)) for s in sections
                         if dataclasses.is_dataclass(getattr(cfg, s)) and s in values}}


def section_hash(cfg: Any, sections: tuple[str, ...] | list[str], kind: str = "output",
                 ignore: tuple[str, ...] | list[str] = ()) -> str:
    """Stable hash of the `kind` fields of the named sections (what a stage depends on)."""
    blob = json.dumps(section_values(cfg, sections, kind, ignore), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_root(cache_dir: Path | None) -> Path:
    """Folder for generated data (synthetic datasets): `cache_dir`, else $WSSS_CACHE, else ~/.cache/wsss."""
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("WSSS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wsss"
